"""Policy through Services in the sandbox, with its real kube-proxy in both modes: the operator
hands the nodes the Service address space (`STOCKADE_SERVICE_SPACE=on`), the agents run in
netfilter mode, and connections to ClusterIPs are judged on the backend kube-proxy picked.

- egress: a namespace with a default-deny egress policy and an allow to its database pods on
  the named port reaches the database through its ClusterIP (Service port 80, targetPort `pg`),
  and not another Service's backend;
- ingress: a database that admits only the client refuses another pod coming through the
  ClusterIP from the other node, and itself through its own Service (a hairpin, which kube-proxy
  masquerades: it is judged as the pod it is, before the masquerade);
- an egress ipBlock of one backend's address (/32) opens its ClusterIP and no other;
- in fallback mode (`STOCKADE_SERVICE_MODE=fallback`), the client's egress to a ClusterIP is
  judged at its veth by the operator's verdict over the Service's ready backends: the database
  allowed, the other Service not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.sandbox.controlplane.server import kubectl
from tests.e2e.stack_fixtures import sandbox_state_dir, stockade
from tests.fixtures.controlplane import wait_for

APP = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ns: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {ns: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: node-2
  containers: [{name: db, image: echo, ports: [{containerPort: 5432, name: pg}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: cache, namespace: shop, labels: {app: cache}}
spec:
  nodeName: node-1
  containers: [{name: cache, image: echo, ports: [{containerPort: 6379}]}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {selector: {app: db}, ports: [{port: 80, targetPort: pg}]}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: shop}
spec: {selector: {app: cache}, ports: [{port: 80, targetPort: 6379}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: web, labels: {app: client}}
spec:
  nodeName: node-1
  containers: [{name: client, image: echo, ports: [{containerPort: 8080}]}]
"""
EGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-only, namespace: web}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {ns: shop}}
      podSelector: {matchLabels: {app: db}}
    ports: [{port: 5432}]
"""
INGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: web}}
      podSelector: {matchLabels: {app: client}}
    ports: [{port: 5432}]
"""
IPBLOCK = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-by-address, namespace: web}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: DB_POD/32}}]
    ports: [{port: 5432}]
"""
CONVERGE_S = 30.0


@pytest.fixture(params=["nftables", "iptables"])
def sandbox(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    """(state dir, kubeconfig) of a 2-node sandbox whose operator hands out the Service space."""
    monkeypatch.setenv("STOCKADE_SERVICE_SPACE", "on")
    with sandbox_state_dir(tmp_path) as state_dir:
        started = stockade(state_dir, "up", "--nodes", "2", "--proxy-mode", request.param)
        assert started.returncode == 0, started.stderr
        yield state_dir, Path(started.stdout.strip().splitlines()[-1])


def _probe(state_dir: Path, namespace: str, pod: str, address: str) -> str:
    out = stockade(state_dir, "probe", "-n", namespace, pod, address, "80", timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr


def _until(state_dir: Path, namespace: str, pod: str, address: str, outcome: str) -> None:
    wait_for(
        f"{namespace}/{pod} -> {address}:80 {outcome}",
        lambda: _probe(state_dir, namespace, pod, address) == outcome,
        CONVERGE_S,
    )


def _cluster_ip(kubeconfig: Path, name: str) -> str:
    return kubectl(
        kubeconfig, "get", "svc", "-n", "shop", name, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout


def _running(kubeconfig: Path) -> bool:
    pods = json.loads(kubectl(kubeconfig, "get", "pods", "-A", "-o", "json").stdout)["items"]
    ours = [p for p in pods if p["metadata"]["namespace"] in ("shop", "web")]
    return len(ours) == 3 and all(p["status"].get("phase") == "Running" for p in ours)


def test_connections_to_cluster_ips_are_judged_on_their_backends(
    sandbox: tuple[Path, Path],
) -> None:
    state_dir, kubeconfig = sandbox
    kubectl(kubeconfig, "apply", "-f", "-", input=APP)
    wait_for("the pods running", lambda: _running(kubeconfig), 60)
    db, cache = _cluster_ip(kubeconfig, "db"), _cluster_ip(kubeconfig, "cache")
    for name in ("node-1", "node-2"):
        status = json.loads(
            kubectl(kubeconfig, "get", "sdt", f"{name}.program.0", "-o", "json").stdout
        )["status"]
        assert status.get("serviceMode") == "netfilter", status
    _until(state_dir, "web", "client", db, "connected")
    _until(state_dir, "web", "client", cache, "connected")

    kubectl(kubeconfig, "apply", "-f", "-", input=EGRESS)
    _until(state_dir, "web", "client", cache, "timed out")
    assert _probe(state_dir, "web", "client", db) == "connected"  # the allowed backend's pod

    kubectl(kubeconfig, "delete", "-f", "-", input=EGRESS)
    kubectl(kubeconfig, "apply", "-f", "-", input=INGRESS)
    _until(state_dir, "shop", "cache", db, "timed out")
    assert _probe(state_dir, "shop", "db", db) == "timed out"  # hairpin: judged as db itself
    assert _probe(state_dir, "web", "client", db) == "connected"

    kubectl(kubeconfig, "delete", "-f", "-", input=INGRESS)
    db_pod = kubectl(
        kubeconfig, "get", "pod", "-n", "shop", "db", "-o", "jsonpath={.status.podIP}"
    ).stdout
    kubectl(kubeconfig, "apply", "-f", "-", input=IPBLOCK.replace("DB_POD", db_pod))
    _until(state_dir, "web", "client", cache, "timed out")
    assert _probe(state_dir, "web", "client", db) == "connected"  # the /32 of the backend


@pytest.fixture
def fallback_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    """(state dir, kubeconfig) of a 2-node sandbox (kube-proxy in nftables mode) whose agents
    run the Service fallback."""
    monkeypatch.setenv("STOCKADE_SERVICE_SPACE", "on")
    monkeypatch.setenv("STOCKADE_SERVICE_MODE", "fallback")
    with sandbox_state_dir(tmp_path) as state_dir:
        started = stockade(state_dir, "up", "--nodes", "2", "--proxy-mode", "nftables")
        assert started.returncode == 0, started.stderr
        yield state_dir, Path(started.stdout.strip().splitlines()[-1])


def test_in_fallback_mode_a_cluster_ip_is_judged_on_every_ready_backend_at_the_veth(
    fallback_sandbox: tuple[Path, Path],
) -> None:
    state_dir, kubeconfig = fallback_sandbox
    kubectl(kubeconfig, "apply", "-f", "-", input=APP)
    wait_for("the pods running", lambda: _running(kubeconfig), 60)
    db, cache = _cluster_ip(kubeconfig, "db"), _cluster_ip(kubeconfig, "cache")
    for name in ("node-1", "node-2"):
        status = json.loads(
            kubectl(kubeconfig, "get", "sdt", f"{name}.program.0", "-o", "json").stdout
        )["status"]
        assert status.get("serviceMode") == "fallback", status
    _until(state_dir, "web", "client", db, "connected")
    _until(state_dir, "web", "client", cache, "connected")

    kubectl(kubeconfig, "apply", "-f", "-", input=EGRESS)
    _until(state_dir, "web", "client", cache, "timed out")
    # the ClusterIP matches no podSelector: only the verdict over its backend (db) opens it
    _until(state_dir, "web", "client", db, "connected")
