"""Policy through Services in the sandbox, with its real kube-proxy in both modes: the operator
hands the nodes the Service address space (its default), the agents run in netfilter mode, and
connections to ClusterIPs and NodePorts are judged on the backend kube-proxy picked.

- egress: a namespace with a default-deny egress policy and an allow to its database pods on
  the named port reaches the database through its ClusterIP (Service port 80, targetPort `pg`),
  and not another Service's backend;
- ingress: a database that admits only the client refuses another pod coming through the
  ClusterIP from the other node, and itself through its own Service (a hairpin, which kube-proxy
  masquerades: it is judged as the pod it is, before the masquerade);
- an egress ipBlock of one backend's address (/32) opens its ClusterIP and no other;
- two backends behind one ClusterIP, a client allowed to one of them: each connection's outcome
  follows the backend kube-proxy picked, and the node's conntrack shows that every connection
  went to the allowed backend and that the other backend's node never saw the client;
- a selector-less Service whose EndpointSlice names a non-pod address (a node's): a
  `namespaceSelector: {}` peer selects pods only, so the client cannot reach it, while a pod on
  the same port can be reached;
- a NodePort reached from a pod on its own node is judged on its backend, and one reached from
  another node's host network is judged on the backend's ingress (a node that the backend's
  policy does not admit cannot reach it through the NodePort);
- in fallback mode (`STOCKADE_SERVICE_MODE=fallback`), the client's egress to a ClusterIP is
  judged at its veth by the operator's verdict over the Service's ready backends: the database
  allowed, the other Service not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.sandbox.controlplane.server import kubectl
from stockade.sandbox.session import TOPOLOGY_FILE
from stockade.sandbox.topology import Topology
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


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def sandbox(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """(state dir, kubeconfig) of a 2-node sandbox whose operator hands out the Service space
    (its default), shared by the tests of one kube-proxy mode (each in namespaces of its own)."""
    with sandbox_state_dir(tmp_path_factory.mktemp(request.param)) as state_dir:
        started = stockade(state_dir, "up", "--nodes", "2", "--proxy-mode", request.param)
        assert started.returncode == 0, started.stderr
        yield state_dir, Path(started.stdout.strip().splitlines()[-1])


def _probe(
    state_dir: Path, namespace: str, pod: str, address: str, port: int = 80, timeout: str = "2"
) -> str:
    args = ("probe", "-n", namespace, pod, address, str(port), "--timeout", timeout)
    out = stockade(state_dir, *args, timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr


def _until(state_dir: Path, namespace: str, pod: str, address: str, outcome: str) -> None:
    wait_for(
        f"{namespace}/{pod} -> {address}:80 {outcome}",
        lambda: _probe(state_dir, namespace, pod, address) == outcome,
        CONVERGE_S,
    )


def _cluster_ip(kubeconfig: Path, name: str, namespace: str = "shop") -> str:
    return kubectl(
        kubeconfig, "get", "svc", "-n", namespace, name, "-o", "jsonpath={.spec.clusterIP}"
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


PAIR = """
apiVersion: v1
kind: Namespace
metadata: {name: pair, labels: {ns: pair}}
---
apiVersion: v1
kind: Namespace
metadata: {name: patron, labels: {ns: patron}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: pair, labels: {app: pair, name: a}}
spec:
  nodeName: node-2
  containers: [{name: a, image: echo, ports: [{containerPort: 5432}, {containerPort: 7070}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: pair, labels: {app: pair, name: b}}
spec:
  nodeName: node-2
  containers: [{name: b, image: echo, ports: [{containerPort: 5432}]}]
---
apiVersion: v1
kind: Service
metadata: {name: pair, namespace: pair}
spec: {selector: {app: pair}, ports: [{port: 80, targetPort: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: a-np, namespace: pair}
spec: {type: NodePort, selector: {name: a}, ports: [{port: 80, targetPort: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-np, namespace: pair}
spec: {type: NodePort, selector: {name: b}, ports: [{port: 80, targetPort: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: pair}
spec: {ports: [{name: echo, port: 80, targetPort: 7070}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: outside
  namespace: pair
  labels: {kubernetes.io/service-name: outside}
addressType: IPv4
endpoints: [{addresses: [NODE_2], conditions: {ready: true}}]
ports: [{name: echo, port: 7070, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: patron, labels: {app: client}}
spec:
  nodeName: node-1
  containers: [{name: client, image: echo, ports: [{containerPort: 8080}]}]
"""
ONLY_A = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: patron}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{port: 7070}]
  - to:
    - namespaceSelector: {matchLabels: {ns: pair}}
      podSelector: {matchLabels: {name: a}}
    ports: [{port: 5432}]
"""
A_FROM_PATRON = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-patron, namespace: pair}
spec:
  podSelector: {matchLabels: {name: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: patron}}}]
    ports: [{port: 5432}]
"""
# echoes one message per connection on the node's address until killed (the selector-less
# Service's backend, answering as the probes expect)
LISTEN = """
import socket, sys
s = socket.create_server((sys.argv[1], 7070))
while True:
    c = s.accept()[0]
    c.settimeout(2.0)
    try:
        c.sendall(c.recv(4096))
    except OSError:
        pass
    c.close()
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("timed out")
"""
TWO_BACKEND_PROBES = 12
# a flow is in /proc/net/nf_conntrack as "... src=C dst=V sport=S dport=P src=B dst=C ...":
# its original tuple, then its reply tuple (whose source is the backend DNAT picked)
CONNTRACK = re.compile(r"src=(\S+) dst=(\S+) sport=\d+ dport=(\d+) .*?src=(\S+) dst=")


def _host_probe(netns: str, address: str, port: int) -> str:
    """One TCP connection from a node's own network namespace (its host network)."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", CONNECT, address, str(port)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def _flows(netns: str) -> list[tuple[str, str, int, str]]:
    """(client, original destination, its port, reply source) of the node's TCP flows."""
    argv = ["ip", "netns", "exec", netns, "cat", "/proc/net/nf_conntrack"]
    table = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    found = (CONNTRACK.search(line) for line in table.splitlines() if " tcp " in line)
    return [(m[1], m[2], int(m[3]), m[4]) for m in found if m is not None]


def _pod_ip(kubeconfig: Path, namespace: str, name: str) -> str:
    return kubectl(
        kubeconfig, "get", "pod", "-n", namespace, name, "-o", "jsonpath={.status.podIP}"
    ).stdout


def _node_port(kubeconfig: Path, name: str) -> int:
    path = "jsonpath={.spec.ports[0].nodePort}"
    return int(kubectl(kubeconfig, "get", "svc", "-n", "pair", name, "-o", path).stdout)


def _pods_running(kubeconfig: Path, namespaces: tuple[str, ...], count: int) -> bool:
    pods = json.loads(kubectl(kubeconfig, "get", "pods", "-A", "-o", "json").stdout)["items"]
    ours = [p for p in pods if p["metadata"]["namespace"] in namespaces]
    return len(ours) == count and all(p["status"].get("phase") == "Running" for p in ours)


def test_what_only_services_show_is_judged_on_the_backend_really_reached(
    sandbox: tuple[Path, Path],
) -> None:
    state_dir, kubeconfig = sandbox
    topology = Topology.load(state_dir / TOPOLOGY_FILE)
    node_1, node_2 = topology.node("node-1"), topology.node("node-2")
    listener = subprocess.Popen(
        ["ip", "netns", "exec", node_2.netns, sys.executable, "-c", LISTEN, node_2.ip_v4]
    )
    try:
        kubectl(kubeconfig, "apply", "-f", "-", input=PAIR.replace("NODE_2", node_2.ip_v4))
        wait_for("the pods running", lambda: _pods_running(kubeconfig, ("pair", "patron"), 3), 60)
        pair = _cluster_ip(kubeconfig, "pair", "pair")
        outside = _cluster_ip(kubeconfig, "outside", "pair")
        a_ip, b_ip = _pod_ip(kubeconfig, "pair", "a"), _pod_ip(kubeconfig, "pair", "b")
        client = _pod_ip(kubeconfig, "patron", "client")
        a_np, b_np = _node_port(kubeconfig, "a-np"), _node_port(kubeconfig, "b-np")
        _until(state_dir, "patron", "client", outside, "connected")

        # a namespaceSelector {} peer selects pods, not the non-pod backend of a Service
        kubectl(kubeconfig, "apply", "-f", "-", input=ONLY_A)
        _until(state_dir, "patron", "client", outside, "timed out")
        assert _probe(state_dir, "patron", "client", a_ip, 7070) == "connected"

        # two backends, one allowed: each connection follows the backend kube-proxy picked
        seen = [
            _probe(state_dir, "patron", "client", pair, timeout="0.8")
            for _ in range(TWO_BACKEND_PROBES)
        ]
        assert set(seen) == {"connected", "timed out"}, seen  # both backends were picked
        here = [backend for *flow, backend in _flows(node_1.netns) if flow == [client, pair, 80]]
        # (a flow that ended with a reset may have left the table already: no count to match)
        assert set(here) == {a_ip}, here
        there = [f for f in _flows(node_2.netns) if f[0] == client]
        assert b_ip not in {dst for _, dst, _, _ in there} | {b for *_, b in there}, there

        # a NodePort from a pod on its own node: judged on its backend (one on another node is
        # judged on that node's address: docs/services.md)
        assert _probe(state_dir, "patron", "client", node_1.ip_v4, a_np) == "connected"
        assert _probe(state_dir, "patron", "client", node_1.ip_v4, b_np) == "timed out"

        # a NodePort from another node's host network: judged by the backend's ingress
        assert _host_probe(node_1.netns, node_2.ip_v4, a_np) == "connected"
        kubectl(kubeconfig, "apply", "-f", "-", input=A_FROM_PATRON)
        wait_for(
            "node-1 refused by a's ingress through the NodePort",
            lambda: _host_probe(node_1.netns, node_2.ip_v4, a_np) == "timed out",
            CONVERGE_S,
        )
        assert _probe(state_dir, "patron", "client", a_ip, 5432) == "connected"
    finally:
        listener.kill()
        listener.wait()
        kubectl(kubeconfig, "delete", "namespace", "pair", "patron", "--wait=false")


@pytest.fixture
def fallback_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path]]:
    """(state dir, kubeconfig) of a 2-node sandbox (kube-proxy in nftables mode) whose agents
    run the Service fallback."""
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
