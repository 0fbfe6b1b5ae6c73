"""A user's own app on the sandbox, in both topologies: `stockade sandbox up`, then `kubectl apply`
of a Deployment, a Service and a client Pod. The scheduler places the pods, the kubelet stand-ins
run them through the CNI reference plugins, the controller manager lists them in an
EndpointSlice, kube-proxy routes the Service's ClusterIP, and the cluster DNS resolves its name.
A NetworkPolicy then closes the Service as seen from the client, `kubectl delete namespace`
completes, and `down` leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.sandbox import netns
from stockade.sandbox.controlplane.server import kubectl
from stockade.sandbox.processes import is_alive
from stockade.sandbox.session import TOPOLOGY_FILE, SandboxState
from stockade.sandbox.topology import Topology
from tests.e2e.stack_fixtures import sandbox_state_dir, stockade
from tests.fixtures.controlplane import wait_for

NAMESPACE = "shop"
REPLICAS = 3
APP = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NAMESPACE}}}
spec:
  replicas: {REPLICAS}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
          labelSelector: {{matchLabels: {{app: web}}}}}}
      containers:
      - name: web
        image: registry.example/shop/web:1.0
        ports: [{{containerPort: 8080, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NAMESPACE}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NAMESPACE}, labels: {{app: client}}}}
spec:
  containers: [{{name: client, image: registry.example/shop/client:1.0}}]
"""
DENY_WEB = f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-closed, namespace: {NAMESPACE}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
"""


def get(kubeconfig: Path, *args: str) -> Any:
    return json.loads(kubectl(kubeconfig, "get", *args, "-o", "json").stdout)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    with sandbox_state_dir(tmp_path) as path:
        yield path


def probe(state_dir: Path, target: str, port: int) -> subprocess.CompletedProcess[str]:
    return stockade(
        state_dir, "probe", "-n", NAMESPACE, "client", target, str(port), "--timeout", "2"
    )


@pytest.mark.parametrize("topology", ["routed", "bridge"])
def test_an_app_applied_with_kubectl_runs_is_reachable_by_service_name_and_is_enforced(
    state_dir: Path, topology: str
) -> None:
    started = stockade(state_dir, "up", "--nodes", "2", "--topology", topology)
    assert started.returncode == 0, started.stderr
    kubeconfig = Path(started.stdout.strip().splitlines()[-1])
    kubectl(kubeconfig, "apply", "-f", "-", input=APP)

    def running_web() -> list[Any] | None:
        pods = get(kubeconfig, "pods", "-n", NAMESPACE, "-l", "app=web")["items"]
        ready = [p for p in pods if p["status"].get("phase") == "Running" and p["status"]["podIP"]]
        return ready if len(ready) == REPLICAS else None

    web = wait_for(f"{REPLICAS} web pods Running", running_web, timeout=90)
    assert len({p["spec"]["nodeName"] for p in web}) == 2, "spread over both nodes"
    ips = {p["status"]["podIP"] for p in web}

    def listed() -> set[str] | None:
        slices = get(kubeconfig, "endpointslices", "-n", NAMESPACE)["items"]
        found = {
            a for s in slices for e in s.get("endpoints") or () for a in e.get("addresses", ())
        }
        return found if found == ips else None

    wait_for("an EndpointSlice lists the web pods", listed, timeout=60)
    wait_for(
        "the client runs",
        lambda: (
            get(kubeconfig, "pod", "client", "-n", NAMESPACE)["status"].get("phase") == "Running"
        ),
    )
    cluster_ip = get(kubeconfig, "service", "web", "-n", NAMESPACE)["spec"]["clusterIP"]
    for target in (f"web.{NAMESPACE}", f"web.{NAMESPACE}.svc.cluster.local", cluster_ip):
        result = probe(state_dir, target, 80)
        assert (result.returncode, result.stdout.strip()) == (0, "connected"), (
            target,
            result.stdout,
            result.stderr,
        )

    kubectl(kubeconfig, "apply", "-f", "-", input=DENY_WEB)
    closed = wait_for(
        "the policy closes the Service",
        lambda: (r := probe(state_dir, f"web.{NAMESPACE}", 80)).returncode == 4 and r,
        timeout=30,
    )
    assert closed.stdout.strip() == "timed out"
    by_ip = probe(state_dir, cluster_ip, 80)
    assert (by_ip.returncode, by_ip.stdout.strip()) == (4, "timed out")

    kubectl(kubeconfig, "delete", "namespace", NAMESPACE, "--timeout=90s")
    names = {n["metadata"]["name"] for n in get(kubeconfig, "namespaces")["items"]}
    assert NAMESPACE not in names

    state = SandboxState.load(state_dir)
    assert state is not None and state.control_plane is not None
    topo = Topology.load(state_dir / TOPOLOGY_FILE)
    processes = [*state.control_plane.processes, *state.kubelets, *state.proxies]
    stopped = stockade(state_dir, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(is_alive(p) for p in processes)
    assert netns.list_names(f"stk-{topo.run_id}-") == []
    assert not state_dir.exists()
