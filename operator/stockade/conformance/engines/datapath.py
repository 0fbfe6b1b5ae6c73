"""The `datapath` engine: conformance cases judged by the real compiled tc programs.

Each node gets its own programs and maps (one pin root per node), loaded from the same C that
the agent compiles. Loading costs about a second, so a node's programs are loaded when a case
first names the node and serve every later case of the run; `setup()` resets them to their state
right after loading (empty tables, no conntrack entries, the config as loaded, zero counters, an
empty event ring) and starts the lowering's ids afresh, so no case sees another's state.
`close()` (called by the command when the run ends, and at exit) closes them and removes the pin
root. For every step the engine lowers the world with the operator's
own lowering (`stockade.compiler.lower.lower_node`) and writes each node's tables through the
agent's map writer. A check then runs the connection's first packet (TCP SYN, UDP datagram, SCTP
INIT, ICMP echo) from the source pod's address through the source node's FROM_POD program (the
pod's egress) and the destination node's TO_POD program (its ingress) with BPF_PROG_TEST_RUN,
and the reply back through the destination's FROM_POD and the source's TO_POD, as conntrack
must let it pass. A drop anywhere is a timeout; otherwise the connection is made when the
destination serves the port (else refused), as the reference engine says.

Addresses, placement and the world come from the reference engine, so both judge the same
topology. Needs root, clang and bpffs.
"""

from __future__ import annotations

import atexit
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from stockade.compiler import ir
from stockade.compiler.lower import Ids, lower_node
from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.conformance.casefile import Case, Check, Topology
from stockade.conformance.engine import Addresses, Observed, Outcome
from stockade.conformance.engines.reference import ReferenceEngine
from stockade.datapath import packets
from stockade.datapath.clang import Compiler
from stockade.harness.loader import NodePrograms
from stockade.harness.testrun import TcVerdict
from stockade.model.policy import IPAddress, Protocol

BPFFS = Path("/sys/fs/bpf")
CACHE_DIR = Path("/var/cache/stockade/bpf")
FIRST_SPORT = 20000  # each check's source port is the next one


class DatapathEngine(ReferenceEngine):
    name = "datapath"

    def __init__(self, ip_family: int = 4, shape: Shape | None = None) -> None:
        super().__init__(ip_family)
        self.shape = shape or Shape()
        self.compiler = Compiler(CACHE_DIR)
        self.root: Path | None = None
        self.nodes: dict[str, NodePrograms] = {}
        self.ids: dict[str, Ids] = {}
        self.case_nodes: list[str] = []  # the nodes of the current case
        self.sport = FIRST_SPORT

    def setup(self, topology: Topology, case: Case) -> Addresses:
        addresses = super().setup(topology, case)
        self.case_nodes = list(addresses.nodes)
        self.sport = FIRST_SPORT  # the flows of a fresh load: same tuples, same verdicts
        try:
            for node in self.case_nodes:
                programs = self.nodes.get(node)
                if programs is None:
                    self.nodes[node] = self._load(node)
                else:
                    self._reset(node, programs)
                self.ids[node] = Ids()
        except BaseException:
            self.teardown()
            raise
        return addresses

    def _load(self, node: str) -> NodePrograms:
        if self.root is None:
            root = BPFFS / f"stockade-conformance-{uuid.uuid4().hex[:10]}"
            root.mkdir(parents=True)
            self.root = root
            atexit.register(self.close)
        pin_root = self.root / node
        pin_root.mkdir()
        try:
            return NodePrograms(self.shape, pin_root, self.compiler)
        except BaseException:
            shutil.rmtree(pin_root, ignore_errors=True)  # a later load must not adopt its maps
            raise

    def _reset(self, node: str, programs: NodePrograms) -> None:
        try:
            programs.reset()
        except BaseException:
            # State unknown: forget the node, so that the next case that names it loads afresh.
            del self.nodes[node]
            programs.close()
            shutil.rmtree(programs.pin_root, ignore_errors=True)
            raise

    def probe(self, checks: Sequence[Check]) -> list[Observed]:
        world, addresses = self._world(), self.addresses
        assert addresses is not None
        state = world.cluster_state(addresses)
        policies = list(world.policies.values())
        for node in self.case_nodes:
            programs = self.nodes[node]
            lowered = lower_node(state, policies, node, self.ids[node])
            self.ids[node] = lowered.ids
            programs.write(lowered.tables)
        observed = []
        for check in checks:
            src, dst = addresses.pod_ip(check.src), addresses.pod_ip(check.dst)
            src_node = self._pod_node(check.src, src)
            dst_node = self._pod_node(check.dst, dst)
            outcome, detail = self._connect(check, src, dst, src_node, dst_node)
            if outcome is Outcome.CONNECTED and not self._served(world, check):
                outcome = Outcome.REFUSED
            observed.append(Observed(check, outcome, detail))
        return observed

    def teardown(self) -> None:
        """End the case; the loaded programs stay for the next one (`setup()` resets them)."""
        self.case_nodes = []
        self.ids.clear()
        super().teardown()

    def close(self) -> None:
        """Close every node's programs and remove the pin root. Idempotent; also runs at exit."""
        try:
            for programs in self.nodes.values():
                programs.close()
        finally:
            self.nodes.clear()
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
                atexit.unregister(self.close)

    def _pod_node(self, pod: str, address: IPAddress) -> str | None:
        """The node whose hooks see `pod`'s traffic; None for a host-network pod (no veth)."""
        world = self._world()
        if any(p.key == pod and p.host_network for p in world.topology.pods):
            return None
        return world.placement.get(pod)

    def _connect(
        self,
        check: Check,
        src: IPAddress,
        dst: IPAddress,
        src_node: str | None,
        dst_node: str | None,
    ) -> tuple[Outcome, str]:
        self.sport += 1
        forward, reply = self._frames(check, src, dst, self.sport)
        path = (
            (src_node, Hook.FROM_POD, forward, "egress of the source"),
            (dst_node, Hook.TO_POD, forward, "ingress of the destination"),
            (dst_node, Hook.FROM_POD, reply, "reply leaving the destination"),
            (src_node, Hook.TO_POD, reply, "reply reaching the source"),
        )
        for node, hook, frame, where in path:
            if node is None:
                continue
            if self.nodes[node].run(hook, frame) is TcVerdict.DENY:
                return Outcome.TIMEOUT, f"dropped at the {where} ({node} {hook.name})"
        return Outcome.CONNECTED, "passed every hook"

    def _frames(
        self, check: Check, src: IPAddress, dst: IPAddress, sport: int
    ) -> tuple[bytes, bytes]:
        ip, frame = packets.ip, packets.ip_frame
        port = check.port or 0
        if check.protocol is Protocol.TCP:
            syn = packets.tcp_segment(src, dst, sport, port, packets.TCP_SYN)
            synack = packets.tcp_segment(dst, src, port, sport, packets.TCP_SYN | packets.TCP_ACK)
            return (
                frame(ip(src, dst, ir.PROTO_TCP, syn)),
                frame(ip(dst, src, ir.PROTO_TCP, synack)),
            )
        if check.protocol is Protocol.UDP:
            return (
                frame(ip(src, dst, ir.PROTO_UDP, packets.udp_datagram(src, dst, sport, port))),
                frame(ip(dst, src, ir.PROTO_UDP, packets.udp_datagram(dst, src, port, sport))),
            )
        if check.protocol is Protocol.SCTP:
            return (
                frame(ip(src, dst, ir.PROTO_SCTP, packets.sctp_packet(sport, port))),
                frame(ip(dst, src, ir.PROTO_SCTP, packets.sctp_packet(port, sport, 0x1234))),
            )
        proto = ir.PROTO_ICMP if src.version == 4 else ir.PROTO_ICMPV6
        # Echo request out, echo reply back, matched by the identifier.
        return (
            frame(ip(src, dst, proto, packets.echo(src, dst, sport))),
            frame(ip(dst, src, proto, packets.echo(dst, src, sport, reply=True))),
        )
