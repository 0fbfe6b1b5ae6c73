"""Differential test of conntrack: generated sequences of TCP and UDP packets on both hooks, with
policy changes between them, get from the kernel the verdicts of a reference model of
bpf/conntrack.h's semantics: one flow per (original tuple, direction of the hook that judged
it); a packet of a recorded flow is established; a packet whose reverse tuple is recorded for
the opposite direction is a reply (a bare SYN never is); anything else is judged by `ir.lookup`
and, allowed and no RST, recorded; after a policy change a flow is judged again when next
found (revalidate mode) and forgotten if now denied, or kept (keep mode).

The kernel keeps a flow and its reverse in the two slots of one entry under an ordered key,
so the sequences mix both orientations of a tuple (replies, and new flows in the reverse
direction while the first lives), tuples whose ends are equal, IPv4 and IPv6 (whose ordering
compares other words), and policy changes between two packets of a flow. No time passes:
timeouts are tests/bpf/test_datapath_conntrack.py's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.abi import ConntrackMode
from stockade.compiler.ir import Action, Direction
from stockade.datapath import maps
from stockade.datapath.maps import DatapathConfig
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

A4, B4, C4, D4 = (pk.addr(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.1.7", "10.0.1.9"))
A6, C6 = pk.addr("fd00::1"), pk.addr("2001:db8::7")
ENDPOINTS = {A4: 1, B4: 2, A6: 1}
FAMILIES = ((A4, B4, C4, D4), (A6, C6))
PORTS = (80, 443, 1000)
TCP, UDP = ir.PROTO_TCP, ir.PROTO_UDP
SYN, ACK, RST = pk.TCP_SYN, pk.TCP_ACK, pk.TCP_RST
FLAGS = (SYN, SYN | ACK, ACK, RST | ACK, pk.TCP_FIN | ACK)
TABLE_BASE = ir.NodeTables(
    endpoints=tuple(ir.EndpointEntry(a, i) for a, i in ENDPOINTS.items()),
    classes=(
        ir.ClassEntry(ipaddress.ip_network("10.0.1.0/24"), 5),
        ir.ClassEntry(ipaddress.ip_network("2001:db8::/32"), 5),
        ir.ClassEntry(ipaddress.ip_network(f"{B4}/32"), 2),
        ir.ClassEntry(ipaddress.ip_network(f"{A4}/32"), 3),
        ir.ClassEntry(ipaddress.ip_network(f"{A6}/128"), 3),
    ),
)


@dataclass(frozen=True)
class Step:
    src: ir.IPAddress
    dst: ir.IPAddress
    sport: int
    dport: int
    proto: int
    flags: int
    direction: Direction

    def frame(self) -> bytes:
        if self.proto == TCP:
            segment = pk.tcp_segment(self.src, self.dst, self.sport, self.dport, self.flags)
            return pk.ip_frame(pk.ip(self.src, self.dst, TCP, segment))
        datagram = pk.udp_datagram(self.src, self.dst, self.sport, self.dport, b"x")
        return pk.ip_frame(pk.ip(self.src, self.dst, UDP, datagram))

    def reverse(self, flags: int) -> Step:
        direction = Direction.INGRESS if self.direction is Direction.EGRESS else Direction.EGRESS
        if direction is Direction.EGRESS and self.dst not in ENDPOINTS:
            direction = Direction.INGRESS  # a pod sends only from its own address
        return Step(self.dst, self.src, self.dport, self.sport, self.proto, flags, direction)


CHANGE = "change"  # switch to the other tables: the agent's write bumps the epoch

policy_entries = st.lists(
    st.builds(
        lambda ep, d, plen, cls, proto, port, action, rule: ir.PolicyEntry(
            ep,
            d,
            plen,
            cls if plen > 32 else 0,
            proto if plen > 64 else 0,
            port if plen > 80 else 0,
            action,
            rule_id=rule,
        ),
        st.sampled_from([1, 2]),
        st.sampled_from(list(Direction)),
        st.sampled_from([32, 64, 96]),
        st.sampled_from([0, 2, 3, 5]),
        st.sampled_from([TCP, UDP]),
        st.sampled_from(PORTS),
        st.sampled_from([Action.ALLOW, Action.DENY]),
        st.integers(1, 50),
    ),
    max_size=6,
)


@st.composite
def tables(draw: st.DrawFn) -> ir.NodeTables:
    entries = draw(policy_entries)
    policy = tuple({e.key(): e for e in entries}.values())
    return ir.NodeTables(TABLE_BASE.endpoints, TABLE_BASE.classes, policy)


@st.composite
def new_step(draw: st.DrawFn) -> Step:
    family = draw(st.sampled_from(FAMILIES))
    direction = draw(st.sampled_from(list(Direction)))
    if direction is Direction.EGRESS:
        src = draw(st.sampled_from([a for a in family if a in ENDPOINTS]))
    else:
        src = draw(st.sampled_from(family))
    dst = draw(st.sampled_from(family))  # the source itself too: a tuple equal to its reverse
    sport = draw(st.sampled_from(PORTS))
    dport = sport if src == dst and draw(st.booleans()) else draw(st.sampled_from(PORTS))
    proto = draw(st.sampled_from([TCP, UDP]))
    return Step(src, dst, sport, dport, proto, draw(st.sampled_from(FLAGS)), direction)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[tuple[ir.NodeTables, ir.NodeTables], bool, list[object]]:
    steps: list[object] = []
    sent: list[Step] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["new", "again", "reply", "reply", CHANGE]))
        if kind == CHANGE:
            steps.append(CHANGE)
            continue
        if kind == "new" or not sent:
            step = draw(new_step())
        else:
            before = draw(st.sampled_from(sent))
            flags = draw(st.sampled_from(FLAGS))
            step = before.reverse(flags) if kind == "reply" else replace(before, flags=flags)
        sent.append(step)
        steps.append(step)
    return (draw(tables()), draw(tables())), draw(st.booleans()), steps


def _reverse_of(s: Step) -> Step:
    """The reverse tuple in the opposite direction, whatever the addresses."""
    other = Direction.INGRESS if s.direction is Direction.EGRESS else Direction.EGRESS
    return Step(s.dst, s.src, s.dport, s.sport, s.proto, s.flags, other)


class Model:
    """bpf/conntrack.h's verdicts, one record per (original tuple, hook direction)."""

    def __init__(self, tables: ir.NodeTables, keep: bool) -> None:
        self.tables = tables
        self.keep = keep
        self.flows: dict[tuple[object, ...], bool] = {}  # -> judged in the current tables

    @staticmethod
    def _key(s: Step) -> tuple[object, ...]:
        return (s.src, s.dst, s.sport, s.dport, s.proto, s.direction)

    def _denies(self, s: Step) -> bool:
        packet = ir.Packet(s.src, s.dst, s.proto, s.dport)
        return ir.lookup(self.tables, packet, s.direction).action is Action.DENY

    def _live(self, s: Step) -> bool:
        key = self._key(s)
        if key not in self.flows:
            return False
        if not self.keep and not self.flows[key]:
            if self._denies(s):
                del self.flows[key]
                return False
            self.flows[key] = True
        return True

    def change(self, tables: ir.NodeTables) -> None:
        self.tables = tables
        self.flows = dict.fromkeys(self.flows, False)

    def run(self, s: Step) -> TcVerdict:
        if self._live(s):
            return TcVerdict.ALLOW
        bare_syn = s.proto == TCP and s.flags & (SYN | ACK) == SYN
        if not bare_syn and self._live(_reverse_of(s)):
            return TcVerdict.ALLOW
        local = s.src if s.direction is Direction.EGRESS else s.dst
        if local not in ENDPOINTS:
            return TcVerdict.ALLOW
        if self._denies(s):
            return TcVerdict.DENY
        if not (s.proto == TCP and s.flags & RST):
            self.flows.setdefault(self._key(s), True)
        return TcVerdict.ALLOW


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        yield d


@settings(
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=scenario())
def test_conntrack_decides_as_its_model(
    dp: Datapath, case: tuple[tuple[ir.NodeTables, ir.NodeTables], bool, list[object]]
) -> None:
    (first, second), keep, steps = case
    assert dp.maps is not None
    mode = ConntrackMode.KEEP if keep else ConntrackMode.REVALIDATE
    maps.write_config(dp.maps, DatapathConfig(conntrack_mode=mode))
    dp.write(first)
    maps.flush_conntrack(dp.maps)
    model = Model(first, keep)
    current = first
    for i, step in enumerate(steps):
        if step == CHANGE:
            current = second if current is first else first
            dp.write(current)
            model.change(current)
            continue
        assert isinstance(step, Step)
        want = model.run(step)
        got = dp.run(step.frame(), step.direction)
        assert got is want, (i, step, steps)
    dp.events()
