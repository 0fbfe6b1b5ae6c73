"""Shared by the agent tests (tests/bpf/test_agent_*.py, tests/e2e/test_agent*.py): a small
cluster on a sandbox `Topology`, its tables from the operator's own lowering (`lower_node`) and
hand-off objects from the operator's own codec and object builder, a private pin root, and
in-process construction of the agent's `Syncer`.

Scenario: namespace `demo`; `web` (role=web) on node-1; `client` (role=client) and `other`
(role=other) on node-2; the standard NetworkPolicy `web` lets role=client reach role=web on TCP
8080 and isolates web for ingress otherwise.
"""

from __future__ import annotations

import ipaddress
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from stockade import handoff
from stockade.agent.attachments import LINKS_DIR, Attachments
from stockade.agent.programs import Programs
from stockade.agent.sync import Syncer
from stockade.compiler import ir
from stockade.compiler.lower import Ids, lower_node
from stockade.compiler.shape import Shape
from stockade.datapath import attach
from stockade.datapath.clang import Compiler
from stockade.datapath.clock import TickClock
from stockade.datapath.netns import NetnsExecutor
from stockade.handoff import TableObject
from stockade.harness.loader import conntrack_clock
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.fastopen import fast_open_namespaces
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy
from stockade.sandbox.topology import Topology
from stockade.sandbox.workloads.traffic import Outcome, PodProcesses, Probe
from tests.fixtures.netns import MakeProcesses, MakeTopology

BPFFS = Path("/sys/fs/bpf")
CACHE_DIR = Path("/tmp/stockade-test-bpf-cache")
NAMESPACE = "demo"
PORT = 8080
ROLES = {"demo/web": ("node-1", "web"), "demo/client": ("node-2", "client")}
ROLES |= {"demo/other": ("node-2", "other")}
POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "web", "namespace": NAMESPACE},
    "spec": {
        "podSelector": {"matchLabels": {"role": "web"}},
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": PORT, "protocol": "TCP"}],
            }
        ],
    },
}


def private_pin_root() -> Path:
    root = BPFFS / f"stockade-test-{uuid.uuid4().hex[:12]}"
    root.mkdir()
    return root


def remove_pin_root(root: Path) -> None:
    """Detach every link pinned under `root`, then remove every pin."""
    links = root / LINKS_DIR
    if links.is_dir():
        for folder in links.iterdir():
            for pin in folder.iterdir():
                attach.detach_tcx(pin)
    shutil.rmtree(root, ignore_errors=True)


@contextmanager
def pin_root() -> Iterator[Path]:
    root = private_pin_root()
    try:
        yield root
    finally:
        remove_pin_root(root)


@dataclass
class Cluster:
    """The scenario's cluster state over a topology; `labels` may be changed by tests."""

    topo: Topology
    node_name: str  # the node name the tables are published under (unique per test)
    labels: dict[str, str] = field(default_factory=dict)  # pod key -> role
    ids: Ids | None = None
    generation: int = 0
    deleted: set[str] = field(default_factory=set)  # pods deleted in the API, veth still there

    @classmethod
    def create(cls, topo: Topology, node_name: str = "node-1") -> Self:
        for key, (node, _) in ROLES.items():
            topo.add_pod(key, node)
        return cls(topo, node_name, {key: role for key, (_, role) in ROLES.items()})

    def _node(self, name: str) -> str:
        return self.node_name if name == "node-1" else f"{self.node_name}-peer"

    def state(self) -> ClusterState:
        pods = []
        for key, pod in self.topo.pods.items():
            if key in self.deleted:
                continue
            ns, name = key.split("/")
            ips = (ipaddress.ip_address(pod.ip_v4), ipaddress.ip_address(pod.ip_v6))
            role = self.labels.get(key, "none")
            pods.append(Pod(ns, name, {"role": role}, ips, self._node(pod.node)))
        nodes = [
            Node(self._node(n.name), (ipaddress.ip_address(n.ip_v4), ipaddress.ip_address(n.ip_v6)))
            for n in self.topo.nodes
        ]
        names = {NAMESPACE} | {key.split("/")[0] for key in self.topo.pods}  # deleted pods' too
        namespaces = [Namespace(n, {"kubernetes.io/metadata.name": n}) for n in sorted(names)]
        return ClusterState(namespaces, pods, nodes)

    def policies(self) -> list[Policy]:
        return [parse_policy(POLICY)]

    def tables(self) -> ir.NodeTables:
        lowered = lower_node(self.state(), self.policies(), self.node_name, self.ids)
        self.ids = lowered.ids
        return lowered.tables

    def objects(self, shape: Shape | None = None) -> list[dict[str, Any]]:
        """The DatapathTable objects of node-1 at the next generation (every part, as the
        operator's plan builds them with `TableObject.build`), in shards as a large node's are."""
        self.generation += 1
        opened = fast_open_namespaces(self.state(), self.policies())
        parts = handoff.encode(self.tables(), shape, inline_max=0, open_namespaces=opened)
        return [
            TableObject.build(
                self.node_name, part, number, len(shards), self.generation, shard
            ).body()
            for part, shards in parts.items()
            for number, shard in shards.items()
        ]

    def table_objects(self, shape: Shape | None = None) -> dict[str, TableObject]:
        return {o["metadata"]["name"]: TableObject.from_api(o) for o in self.objects(shape)}

    def ip(self, key: str) -> str:
        return self.topo.pods[key].ip_v4


def probe_web(procs: PodProcesses, cluster: Cluster, timeout: float = 1.0) -> dict[str, Outcome]:
    """client -> web and other -> web on TCP 8080, concurrently."""
    web = cluster.ip("demo/web")
    srcs = ["demo/client", "demo/other"]
    results = procs.probe_many([Probe(s, web, PORT, "tcp", timeout) for s in srcs])
    return {s.split("/")[1]: r.outcome for s, r in zip(srcs, results, strict=True)}


def serve_web(procs: PodProcesses) -> None:
    procs.serve("demo/web", [(PORT, "TCP")])


def serving_scenario(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str = "routed"
) -> tuple[Topology, Cluster, PodProcesses]:
    """The scenario on a fresh two-node topology, with the pods' processes and web serving."""
    topo = topology(nodes=2, mode=mode)
    cluster = Cluster.create(topo)
    procs = pod_processes(topo)
    serve_web(procs)
    return topo, cluster, procs


def make_syncer(
    root: Path,
    topo: Topology,
    objects: Mapping[str, TableObject],
    node: str = "node-1",
    clock: TickClock | None = None,
) -> tuple[Syncer, NetnsExecutor]:
    """The agent's Syncer for node-1 without an API server (no reporter), its conntrack
    reading `clock` (default: the jiffies clock, as the agent's)."""
    executor = NetnsExecutor.named(topo.node("node-1").netns)
    programs = Programs(Compiler(CACHE_DIR), root)
    syncer = Syncer(
        node,
        lambda: objects,
        programs,
        Attachments(root, executor),
        None,
        root,
        conntrack_clock=clock or conntrack_clock(),
    )
    return syncer, executor


@contextmanager
def running_syncer(
    root: Path,
    topo: Topology,
    objects: Mapping[str, TableObject],
    node: str = "node-1",
    clock: TickClock | None = None,
) -> Iterator[tuple[Syncer, NetnsExecutor]]:
    """`make_syncer`'s syncer and executor, both closed when the block ends (also on failure)."""
    syncer, executor = make_syncer(root, topo, objects, node, clock)
    try:
        yield syncer, executor
    finally:
        syncer.close()
        executor.close()


def tcx_programs(executor: NetnsExecutor, ifname: str) -> dict[str, list[int]]:
    """Program ids on both tcx hooks of `ifname` in the node namespace."""

    def query() -> dict[str, list[int]]:
        import socket

        index = socket.if_nametoindex(ifname)
        return {
            "ingress": attach.tcx_query(index, attach.AttachPoint.INGRESS),
            "egress": attach.tcx_query(index, attach.AttachPoint.EGRESS),
        }

    return executor.run(query)
