"""Policy through Services in the sandbox, with its real kube-proxy in both modes, over IPv4 and
IPv6: the operator hands the nodes the Service address space (its default) and connections to
ClusterIPs and NodePorts are judged on their backends, by the agents in netfilter mode (the
backend kube-proxy picked) and in fallback mode (`STOCKADE_SERVICE_MODE=fallback`: every ready
backend of the Service, at the client's veth). One module-scoped sandbox per setup (kube-proxy
nftables and iptables with netfilter, nftables with the fallback) runs every case in both
families (dual-stack Services, the pods' and nodes' addresses of each family):

- egress: a namespace with a default-deny egress policy and an allow to its database pods on
  the named port reaches the database through its ClusterIP (Service port 80, targetPort `pg`),
  and not another Service's backend;
- ingress: a database that admits only the client refuses another pod coming through the
  ClusterIP from the other node, and itself through its own Service (a hairpin, which kube-proxy
  masquerades: netfilter judges it as the pod it is, before the masquerade; the fallback's
  backend veth judges it on the masqueraded node address, which the policy does not admit
  either); a database that admits itself reaches itself through its Service in netfilter mode
  (the backend's entry moved to the masqueraded tuple after SNAT), not in fallback mode (the
  masqueraded node address is judged: a documented divergence);
- an egress ipBlock of one backend's address (/32, /128) opens its ClusterIP and no other;
- two backends behind one ClusterIP, a peer label that is not part of the Service's selector
  allowing one of them: in netfilter mode each connection's outcome follows the backend
  kube-proxy picked (the node's conntrack shows every connection went to the allowed backend
  and the other backend's node never saw the client); in fallback mode every connection is
  denied at the client's veth, with the drop reason `service` in the flow log (the documented
  divergence), and no backend sees the client;
- a named targetPort whose number differs between two backends, allowed by a named-port rule:
  every connection passes, to both backends each on its own number;
- a selector-less Service whose EndpointSlice names a non-pod address (a node's): a
  `namespaceSelector: {}` peer selects pods only, so the client cannot reach it, while a pod on
  the same port can be reached;
- a NodePort reached from a pod on its own node is judged on its backend, and one reached from
  another node's host network is judged on the backend's ingress (a node that the backend's
  policy does not admit cannot reach it through the NodePort).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import pytest

from stockade.sandbox.controlplane.server import kubectl
from stockade.sandbox.session import TOPOLOGY_FILE, SandboxState
from stockade.sandbox.topology import NodeNet, Topology
from tests.e2e.stack_fixtures import sandbox_state_dir, stockade
from tests.fixtures.controlplane import wait_for

NETFILTER, FALLBACK = "netfilter", "fallback"
FAMILIES = (4, 6)
CONNECTED, TIMED_OUT = "connected", "timed out"
# What each case must give in each mode (netfilter, fallback): the outcomes its probes see.
# netfilter judges the backend kube-proxy picked; the fallback allows a flow to a Service only
# when the client may reach every ready backend on its target port and denies it otherwise
# (docs/services.md). The backend's ingress is judged at the backend's veth in both (netfilter
# before the masquerade, the fallback on the address the packet arrives with), and a NodePort
# reached from another node's host network is judged there by the backend's ingress in both.
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "egress to another Service's backend": ({TIMED_OUT}, {TIMED_OUT}),
    "egress to the allowed backend on its named port": ({CONNECTED}, {CONNECTED}),
    "ingress from a pod the backend does not admit": ({TIMED_OUT}, {TIMED_OUT}),
    "a hairpin the backend does not admit": ({TIMED_OUT}, {TIMED_OUT}),
    # the fallback's backend veth sees the masqueraded node address (docs/services.md)
    "a hairpin the backend admits": ({CONNECTED}, {TIMED_OUT}),
    "ingress from the admitted pod": ({CONNECTED}, {CONNECTED}),
    "ipBlock of one backend, another Service": ({TIMED_OUT}, {TIMED_OUT}),
    "ipBlock of one backend, its Service": ({CONNECTED}, {CONNECTED}),
    "a non-pod backend and a namespaceSelector {} peer": ({TIMED_OUT}, {TIMED_OUT}),
    "two backends, one allowed": ({CONNECTED, TIMED_OUT}, {TIMED_OUT}),
    "a named targetPort of two numbers, both allowed": ({CONNECTED}, {CONNECTED}),
    "the allowed backend's NodePort from a pod": ({CONNECTED}, {CONNECTED}),
    "the denied backend's NodePort from a pod": ({TIMED_OUT}, {TIMED_OUT}),
    "a NodePort from another node's host network": ({CONNECTED}, {CONNECTED}),
    "that NodePort once the backend admits no node": ({TIMED_OUT}, {TIMED_OUT}),
}
CONVERGE_S = 30.0


@dataclass(frozen=True)
class Sandbox:
    state_dir: Path
    kubeconfig: Path
    mode: str  # NETFILTER | FALLBACK: the agents' Service mode

    def expect(self, case: str) -> set[str]:
        netfilter, fallback = EXPECTED[case]
        return netfilter if self.mode == NETFILTER else fallback

    def one(self, case: str) -> str:
        (outcome,) = self.expect(case)
        return outcome

    def check(self, case: str, namespace: str, pod: str, address: str, port: int = 80) -> None:
        """One probe from the pod, which must give what `case` gives in this mode."""
        seen = _probe(self.state_dir, namespace, pod, address, port)
        assert seen == self.one(case), f"{case}: {namespace}/{pod} -> [{address}]:{port} {seen}"

    def until(self, case: str, namespace: str, pod: str, address: str) -> None:
        """Probes until one gives what `case` gives in this mode (a policy change converging)."""
        _until(self.state_dir, namespace, pod, address, self.one(case))


@pytest.fixture(
    scope="module",
    params=[("nftables", NETFILTER), ("iptables", NETFILTER), ("nftables", FALLBACK)],
    ids=["nftables", "iptables", "nftables-fallback"],
)
def sandbox(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sandbox]:
    """A 2-node sandbox whose operator hands out the Service space (its default), shared by the
    tests of one setup (each in namespaces of its own)."""
    proxy_mode, service_mode = request.param
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STOCKADE_SERVICE_MODE", service_mode)
        with sandbox_state_dir(tmp_path_factory.mktemp(f"{proxy_mode}-{service_mode}")) as path:
            started = stockade(path, "up", "--nodes", "2", "--proxy-mode", proxy_mode)
            assert started.returncode == 0, started.stderr
            yield Sandbox(path, Path(started.stdout.strip().splitlines()[-1]), service_mode)


def _ip(text: str) -> str:
    """An address in one spelling (conntrack writes IPv6 uncompressed)."""
    return str(ipaddress.ip_address(text))


def _by_family(texts: list[str]) -> dict[int, str]:
    return {ipaddress.ip_address(t).version: _ip(t) for t in texts}


def _node_ip(node: NodeNet, family: int) -> str:
    return _ip(node.ip_v4 if family == 4 else node.ip_v6)


# COUNT TCP connections one after the other, each printing what happened
CONNECT = """
import socket, sys
address, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for _ in range(count):
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        print("connected")
    except ConnectionRefusedError:
        print("refused")
    except OSError:
        print("timed out")
"""


def _connect(
    netns: str, address: str, port: int, count: int = 1, timeout: float = 1.0
) -> list[str]:
    """`count` TCP connections from a network namespace, in one process: what each gave."""
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", CONNECT, address, str(port)]
    done = subprocess.run(
        [*argv, str(count), str(timeout)], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.splitlines()


@cache
def _pod_netns(state_dir: Path, namespace: str, pod: str) -> str:
    """The pod's network namespace (asked once: the probes then run in it directly)."""
    done = stockade(state_dir, "exec", "-n", namespace, pod, "--", "ip", "netns", "identify")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    return done.stdout.strip()


def _probe(state_dir: Path, namespace: str, pod: str, address: str, port: int = 80) -> str:
    """One TCP connection from the pod (1 s for one that times out)."""
    (outcome,) = _connect(_pod_netns(state_dir, namespace, pod), address, port)
    return outcome


def _until(state_dir: Path, namespace: str, pod: str, address: str, outcome: str) -> None:
    wait_for(
        f"{namespace}/{pod} -> {address}:80 {outcome}",
        lambda: _probe(state_dir, namespace, pod, address) == outcome,
        CONVERGE_S,
    )


def _cluster_ips(kubeconfig: Path, name: str, namespace: str) -> dict[int, str]:
    path = "jsonpath={.spec.clusterIPs}"
    ips = json.loads(kubectl(kubeconfig, "get", "svc", "-n", namespace, name, "-o", path).stdout)
    assert len(ips) == 2, ips  # dual stack: one per family
    return _by_family(ips)


def _pod_ips(kubeconfig: Path, namespace: str, name: str) -> dict[int, str]:
    path = "jsonpath={.status.podIPs[*].ip}"
    ips = kubectl(kubeconfig, "get", "pod", "-n", namespace, name, "-o", path).stdout.split()
    assert len(ips) == 2, ips
    return _by_family(ips)


def _pods_running(kubeconfig: Path, namespaces: tuple[str, ...], count: int) -> bool:
    pods = json.loads(kubectl(kubeconfig, "get", "pods", "-A", "-o", "json").stdout)["items"]
    ours = [p for p in pods if p["metadata"]["namespace"] in namespaces]
    return len(ours) == count and all(p["status"].get("phase") == "Running" for p in ours)


def _service_mode(sandbox: Sandbox, node: str) -> str | None:
    table = kubectl(sandbox.kubeconfig, "get", "sdt", f"{node}.program.0", "-o", "json").stdout
    mode: str | None = json.loads(table)["status"].get("serviceMode")
    return mode


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
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: db}
  ports: [{port: 80, targetPort: pg}]
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: shop}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: cache}
  ports: [{port: 80, targetPort: 6379}]
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
ITSELF = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-itself, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: db}}}]
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
  - to: [{ipBlock: {cidr: DB_V4/32}}, {ipBlock: {cidr: DB_V6/128}}]
    ports: [{port: 5432}]
"""


def test_connections_to_cluster_ips_are_judged_on_their_backends(sandbox: Sandbox) -> None:
    state_dir, kubeconfig = sandbox.state_dir, sandbox.kubeconfig
    kubectl(kubeconfig, "apply", "-f", "-", input=APP)
    wait_for("the pods running", lambda: _pods_running(kubeconfig, ("shop", "web"), 3), 60)
    db, cache = _cluster_ips(kubeconfig, "db", "shop"), _cluster_ips(kubeconfig, "cache", "shop")
    assert [_service_mode(sandbox, n) for n in ("node-1", "node-2")] == [sandbox.mode] * 2
    for family in FAMILIES:  # kube-proxy programs each family on its own
        _until(state_dir, "web", "client", db[family], CONNECTED)
        _until(state_dir, "web", "client", cache[family], CONNECTED)

    kubectl(kubeconfig, "apply", "-f", "-", input=EGRESS)
    sandbox.until("egress to another Service's backend", "web", "client", cache[4])
    for family in FAMILIES:
        sandbox.check("egress to another Service's backend", "web", "client", cache[family])
        sandbox.check(
            "egress to the allowed backend on its named port", "web", "client", db[family]
        )

    kubectl(kubeconfig, "delete", "-f", "-", input=EGRESS)
    kubectl(kubeconfig, "apply", "-f", "-", input=INGRESS)
    sandbox.until("ingress from a pod the backend does not admit", "shop", "cache", db[4])
    for family in FAMILIES:
        sandbox.check("ingress from a pod the backend does not admit", "shop", "cache", db[family])
        sandbox.check("a hairpin the backend does not admit", "shop", "db", db[family])
        sandbox.check("ingress from the admitted pod", "web", "client", db[family])

    kubectl(kubeconfig, "delete", "-f", "-", input=INGRESS)
    kubectl(kubeconfig, "apply", "-f", "-", input=ITSELF)
    # the client is admitted no more: ITSELF is in force
    sandbox.until("ingress from a pod the backend does not admit", "web", "client", db[4])
    for family in FAMILIES:
        sandbox.check("a hairpin the backend admits", "shop", "db", db[family])
        sandbox.check("ingress from a pod the backend does not admit", "web", "client", db[family])

    kubectl(kubeconfig, "delete", "-f", "-", input=ITSELF)
    db_pod = _pod_ips(kubeconfig, "shop", "db")
    policy = IPBLOCK.replace("DB_V4", db_pod[4]).replace("DB_V6", db_pod[6])
    kubectl(kubeconfig, "apply", "-f", "-", input=policy)
    sandbox.until("ipBlock of one backend, another Service", "web", "client", cache[4])
    for family in FAMILIES:
        sandbox.check("ipBlock of one backend, another Service", "web", "client", cache[family])
        sandbox.check("ipBlock of one backend, its Service", "web", "client", db[family])


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
  containers:
  - name: a
    image: echo
    ports: [{containerPort: 5432}, {containerPort: 7070}, {containerPort: 5433, name: srv}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: pair, labels: {app: pair, name: b}}
spec:
  nodeName: node-2
  containers:
  - name: b
    image: echo
    ports: [{containerPort: 5432}, {containerPort: 6433, name: srv}]
---
apiVersion: v1
kind: Service
metadata: {name: pair, namespace: pair}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: pair}
  ports: [{port: 80, targetPort: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: named, namespace: pair}
spec:
  ipFamilyPolicy: RequireDualStack
  selector: {app: pair}
  ports: [{port: 80, targetPort: srv}]
---
apiVersion: v1
kind: Service
metadata: {name: a-np, namespace: pair}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector: {name: a}
  ports: [{port: 80, targetPort: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: b-np, namespace: pair}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector: {name: b}
  ports: [{port: 80, targetPort: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: pair}
spec:
  ipFamilyPolicy: RequireDualStack
  ports: [{name: echo, port: 80, targetPort: 7070}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: outside-v4
  namespace: pair
  labels: {kubernetes.io/service-name: outside}
addressType: IPv4
endpoints: [{addresses: [NODE_2_V4], conditions: {ready: true}}]
ports: [{name: echo, port: 7070, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: outside-v6
  namespace: pair
  labels: {kubernetes.io/service-name: outside}
addressType: IPv6
endpoints: [{addresses: [NODE_2_V6], conditions: {ready: true}}]
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
  - to: [{namespaceSelector: {matchLabels: {ns: pair}}}]
    ports: [{port: srv}]
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
# echoes one message per connection on one of the node's addresses until killed (the
# selector-less Service's backend, answering as the probes expect)
LISTEN = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.create_server((sys.argv[1], 7070), family=family)
while True:
    c = s.accept()[0]
    c.settimeout(2.0)
    try:
        c.sendall(c.recv(4096))
    except OSError:
        pass
    c.close()
"""
MANY = 12  # connections to a two-backend Service: both are picked but once in 2,048
# a flow is in /proc/net/nf_conntrack as "... src=C dst=V sport=S dport=P src=B dst=C sport=BP
# ...": its original tuple, then its reply tuple (whose source is the backend DNAT picked)
CONNTRACK = re.compile(
    r"src=(\S+) dst=(\S+) sport=\d+ dport=(\d+) .*?src=(\S+) dst=\S+ sport=(\d+)"
)


@dataclass(frozen=True)
class Flow:
    client: str
    dst: str  # as the client sent it
    port: int
    backend: str  # as DNAT left it
    backend_port: int


def _host_probe(netns: str, address: str, port: int) -> str:
    """One TCP connection from a node's own network namespace (its host network)."""
    (outcome,) = _connect(netns, address, port)
    return outcome


def _connections(sandbox: Sandbox, namespace: str, pod: str, address: str, port: int) -> list[str]:
    """MANY TCP connections from a pod (0.8 s for each that times out)."""
    return _connect(_pod_netns(sandbox.state_dir, namespace, pod), address, port, MANY, 0.8)


def _flows(netns: str) -> list[Flow]:
    """The node's TCP flows."""
    argv = ["ip", "netns", "exec", netns, "cat", "/proc/net/nf_conntrack"]
    table = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    found = (CONNTRACK.search(line) for line in table.splitlines() if " tcp " in line)
    return [
        Flow(_ip(m[1]), _ip(m[2]), int(m[3]), _ip(m[4]), int(m[5])) for m in found if m is not None
    ]


def _service_drops(sandbox: Sandbox, node: str, client: str, dst: str, port: int) -> int:
    """How many of the client's packets to dst:port the node's agent logged as dropped by the
    Service fallback (drop events with reason `service`, for the client's egress)."""
    state = SandboxState.load(sandbox.state_dir)
    assert state is not None and state.stack is not None
    url = f"{state.stack.agent_urls()[node]}/flows?cursor=0"
    with urllib.request.urlopen(url, timeout=10) as answer:
        records = json.load(answer)["flows"]
    return sum(
        r["count"]
        for r in records
        if (r["event"], r["reason"], r["direction"]) == ("drop", "service", "egress")
        and (_ip(r["src"]), _ip(r["dst"]), r["port"]) == (client, dst, port)
    )


CLIENT = ("patron", "client")
SERVICES = ("pair", "named", "outside")  # the ClusterIP Services of PAIR


def _node_port(kubeconfig: Path, name: str) -> int:
    path = "jsonpath={.spec.ports[0].nodePort}"
    return int(kubectl(kubeconfig, "get", "svc", "-n", "pair", name, "-o", path).stdout)


def test_what_only_services_show_is_judged_on_the_backend_really_reached(
    sandbox: Sandbox,
) -> None:
    state_dir, kubeconfig = sandbox.state_dir, sandbox.kubeconfig
    topology = Topology.load(state_dir / TOPOLOGY_FILE)
    node_1, node_2 = topology.node("node-1"), topology.node("node-2")
    listeners = [
        subprocess.Popen(["ip", "netns", "exec", node_2.netns, sys.executable, "-c", LISTEN, ip])
        for ip in (node_2.ip_v4, node_2.ip_v6)
    ]
    try:
        app = PAIR.replace("NODE_2_V4", node_2.ip_v4).replace("NODE_2_V6", node_2.ip_v6)
        kubectl(kubeconfig, "apply", "-f", "-", input=app)
        wait_for("the pods running", lambda: _pods_running(kubeconfig, ("pair", "patron"), 3), 60)
        pair, named, outside = (_cluster_ips(kubeconfig, n, "pair") for n in SERVICES)
        a_ip, b_ip = _pod_ips(kubeconfig, "pair", "a"), _pod_ips(kubeconfig, "pair", "b")
        client = _pod_ips(kubeconfig, "patron", "client")
        a_np, b_np = _node_port(kubeconfig, "a-np"), _node_port(kubeconfig, "b-np")
        for family in FAMILIES:
            _until(state_dir, *CLIENT, outside[family], CONNECTED)

        kubectl(kubeconfig, "apply", "-f", "-", input=ONLY_A)
        for family in FAMILIES:
            sandbox.until(
                "a non-pod backend and a namespaceSelector {} peer", *CLIENT, outside[family]
            )
            # the same peer selects a pod on that port
            assert _probe(state_dir, *CLIENT, a_ip[family], 7070) == CONNECTED

            # two backends, a peer label that is not the Service's selector allowing one
            seen = _connections(sandbox, *CLIENT, pair[family], 80)
            assert set(seen) == sandbox.expect("two backends, one allowed"), (family, seen)
            # netfilter lets through the connections kube-proxy sent to a, the fallback none
            # (a flow that ended with a reset may have left the table already: no count to match)
            reached = {a_ip[family]} if sandbox.mode == NETFILTER else set()
            here = {
                f.backend
                for f in _flows(node_1.netns)
                if (f.client, f.dst, f.port) == (client[family], pair[family], 80)
            }
            assert here == reached, here
            there = {
                address
                for f in _flows(node_2.netns)
                if f.client == client[family] and f.port == 5432
                for address in (f.dst, f.backend)
            }
            assert there <= reached, there  # b's node never saw the client
            if sandbox.mode == FALLBACK:  # the divergence, said in the flow log
                wait_for(
                    "the fallback's drops in node-1's flow log, reason service",
                    partial(_service_drops, sandbox, "node-1", client[family], pair[family], 80),
                    10,
                )

            # a named targetPort: each backend on its own number, both allowed by the name
            seen = _connections(sandbox, *CLIENT, named[family], 80)
            expected = sandbox.expect("a named targetPort of two numbers, both allowed")
            assert set(seen) == expected, (family, seen)
            reached = {
                (f.backend, f.backend_port)
                for f in _flows(node_1.netns)
                if (f.client, f.dst, f.port) == (client[family], named[family], 80)
            }
            assert reached == {(a_ip[family], 5433), (b_ip[family], 6433)}, reached

            # a NodePort from a pod on its own node: judged on its backend (one on another
            # node is judged on that node's address: docs/services.md)
            node_ip = _node_ip(node_1, family)
            sandbox.check("the allowed backend's NodePort from a pod", *CLIENT, node_ip, a_np)
            sandbox.check("the denied backend's NodePort from a pod", *CLIENT, node_ip, b_np)

            # a NodePort from another node's host network: judged by the backend's ingress
            assert _host_probe(node_1.netns, _node_ip(node_2, family), a_np) == sandbox.one(
                "a NodePort from another node's host network"
            ), family

        kubectl(kubeconfig, "apply", "-f", "-", input=A_FROM_PATRON)
        outcome = sandbox.one("that NodePort once the backend admits no node")
        wait_for(
            f"node-1 {outcome} by a's ingress through the NodePort",
            lambda: _host_probe(node_1.netns, node_2.ip_v4, a_np) == outcome,
            CONVERGE_S,
        )
        assert _host_probe(node_1.netns, _node_ip(node_2, 6), a_np) == outcome
        for family in FAMILIES:
            assert _probe(state_dir, *CLIENT, a_ip[family], 5432) == CONNECTED
    finally:
        for listener in listeners:
            listener.kill()
            listener.wait()
        kubectl(kubeconfig, "delete", "namespace", "pair", "patron", "--wait=false")
