"""Verdict tables: the compiled programs, fed hand-built NodeTables and packets built in Python,
decide as `ir.lookup` specifies, on both hooks, for IPv4 and IPv6, TCP, UDP, SCTP, ICMP and
ICMPv6, and name the deciding rule in counters and drop/audit events.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.datapath import events, maps
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

A4, A6, B4, B6, C4 = "10.0.0.1", "fd00::1", "10.0.0.2", "fd00::2", "10.0.0.3"
CLIENT4, CLIENT6, NODE4, NODE6 = "10.0.1.7", "2001:db8::7", "10.0.0.254", "fd00::fe"
EP_A, EP_B, EP_C = 1, 2, 3
CLASS_B, CLASS_CLIENTS, CLASS_NODE = 2, 5, 9
TCP, UDP, SCTP, ICMP, ICMP6 = (
    ir.PROTO_TCP,
    ir.PROTO_UDP,
    ir.PROTO_SCTP,
    ir.PROTO_ICMP,
    ir.PROTO_ICMPV6,
)
IN, OUT = Direction.INGRESS, Direction.EGRESS


def _net(text: str) -> ir.IPNetwork:
    return ipaddress.ip_network(text)


def _rule(
    ep: int,
    d: Direction,
    plen: int,
    cls: int = 0,
    proto: int = 0,
    port: int = 0,
    action: Action = Action.ALLOW,
    rule: int = 0,
    **kw: object,
) -> ir.PolicyEntry:
    return ir.PolicyEntry(ep, d, plen, cls, proto, port, action, rule, **kw)  # type: ignore[arg-type]


TABLES = ir.NodeTables(
    endpoints=(
        ir.EndpointEntry(pk.addr(A4), EP_A),
        ir.EndpointEntry(pk.addr(A6), EP_A),
        ir.EndpointEntry(pk.addr(B4), EP_B),
        ir.EndpointEntry(pk.addr(B6), EP_B),
        ir.EndpointEntry(pk.addr(C4), EP_C),
    ),
    classes=(
        ir.ClassEntry(_net(f"{B4}/32"), CLASS_B),
        ir.ClassEntry(_net(f"{B6}/128"), CLASS_B),
        ir.ClassEntry(_net("10.0.1.0/24"), CLASS_CLIENTS),
        ir.ClassEntry(_net("2001:db8::/32"), CLASS_CLIENTS),
        ir.ClassEntry(_net(f"{NODE4}/32"), CLASS_NODE, ir.ClassFlag.LOCAL_NODE),
        ir.ClassEntry(_net(f"{NODE6}/128"), CLASS_NODE, ir.ClassFlag.LOCAL_NODE),
    ),
    policy=(
        _rule(EP_A, IN, 32, action=Action.DENY, rule=100),  # A is isolated for ingress
        _rule(EP_A, IN, 96, CLASS_B, TCP, 80, rule=101),
        _rule(EP_A, IN, 94, CLASS_CLIENTS, TCP, 8080, rule=102),  # 8080-8083
        _rule(EP_A, IN, 80, CLASS_CLIENTS, UDP, rule=103),  # every UDP port
        _rule(EP_A, IN, 96, CLASS_CLIENTS, SCTP, 9000, rule=104),
        _rule(EP_A, IN, 96, CLASS_B, ICMP, ir.icmp_port(8, 0), rule=105),
        _rule(EP_A, IN, 96, CLASS_B, ICMP6, ir.icmp_port(128, 0), rule=105),
        _rule(EP_A, IN, 96, CLASS_B, TCP, 22, Action.DENY, rule=106),
        _rule(
            EP_A, IN, 96, CLASS_B, TCP, 443, rule=108, audit_action=Action.DENY, audit_rule_id=107
        ),
        _rule(EP_A, OUT, 64, CLASS_CLIENTS, action=Action.DENY, rule=200),
    ),
)


@dataclass(frozen=True)
class Case:
    id: str
    frame: bytes
    direction: Direction
    verdict: TcVerdict
    rule: int = 0  # the rule named by the drop event (deny) or audit event
    audit: bool = False


def _p(src: str, dst: str, proto: int, port: int) -> bytes:
    return pk.packet_frame(ir.Packet(pk.addr(src), pk.addr(dst), proto, port))


ALLOW, DENY = TcVerdict.ALLOW, TcVerdict.DENY
b4, b6, a4, a6 = pk.addr(B4), pk.addr(B6), pk.addr(A4), pk.addr(A6)
CASES = [
    Case("tcp from B to A:80 is allowed by rule 101", _p(B4, A4, TCP, 80), IN, ALLOW),
    Case("tcp from B to A:81 hits A's isolation", _p(B4, A4, TCP, 81), IN, DENY, 100),
    Case("tcp port range 8080-8083 allows 8081", _p(CLIENT4, A4, TCP, 8081), IN, ALLOW),
    Case("tcp port range 8080-8083 ends before 8084", _p(CLIENT4, A4, TCP, 8084), IN, DENY, 100),
    Case("udp from clients to any port", _p(CLIENT4, A4, UDP, 53), IN, ALLOW),
    Case("sctp from clients to 9000", _p(CLIENT4, A4, SCTP, 9000), IN, ALLOW),
    Case("sctp from clients to 9001 is denied", _p(CLIENT4, A4, SCTP, 9001), IN, DENY, 100),
    Case("icmp echo from B", _p(B4, A4, ICMP, ir.icmp_port(8, 0)), IN, ALLOW),
    Case(
        "icmp echo from clients is denied", _p(CLIENT4, A4, ICMP, ir.icmp_port(8, 0)), IN, DENY, 100
    ),
    Case(
        "icmp unreachable of no known flow is judged",
        _p(CLIENT4, A4, ICMP, ir.icmp_port(3, 1)),
        IN,
        DENY,
        100,
    ),
    Case("explicit deny rule 106 names itself", _p(B4, A4, TCP, 22), IN, DENY, 106),
    Case("audit-mode deny passes and reports", _p(B4, A4, TCP, 443), IN, ALLOW, 107, audit=True),
    Case("the local node reaches an isolated pod", _p(NODE4, A4, TCP, 81), IN, ALLOW),
    Case("egress to clients is denied by rule 200", _p(A4, CLIENT4, TCP, 80), OUT, DENY, 200),
    Case("egress without a matching entry is allowed", _p(A4, B4, TCP, 80), OUT, ALLOW),
    Case("a pod without policy is open", _p(CLIENT4, C4, TCP, 1), IN, ALLOW),
    Case("addresses that are no endpoint pass", _p("10.9.9.9", "10.9.9.8", TCP, 1), IN, ALLOW),
    Case("other IP protocols are judged with port 0", _p(B4, A4, 47, 0), IN, DENY, 100),
    Case("ipv6 tcp from B to A:80", _p(B6, A6, TCP, 80), IN, ALLOW),
    Case("ipv6 tcp from B to A:81", _p(B6, A6, TCP, 81), IN, DENY, 100),
    Case("ipv6 udp from clients", _p(CLIENT6, A6, UDP, 5353), IN, ALLOW),
    Case("ipv6 sctp from clients to 9000", _p(CLIENT6, A6, SCTP, 9000), IN, ALLOW),
    Case("icmpv6 echo from B", _p(B6, A6, ICMP6, ir.icmp_port(128, 0)), IN, ALLOW),
    Case(
        "icmpv6 echo from clients is denied",
        _p(CLIENT6, A6, ICMP6, ir.icmp_port(128, 0)),
        IN,
        DENY,
        100,
    ),
    Case(
        "icmpv6 neighbour solicitation with hop limit 255 passes",
        _p(CLIENT6, A6, ICMP6, ir.icmp_port(135, 0)),
        IN,
        ALLOW,
    ),
    Case(
        "icmpv6 router advertisement from a link-local router passes",
        _p("fe80::1", A6, ICMP6, ir.icmp_port(134, 0)),
        IN,
        ALLOW,
    ),
    Case("ipv6 egress to clients is denied", _p(A6, CLIENT6, UDP, 53), OUT, DENY, 200),
    Case("the local node reaches an isolated pod over ipv6", _p(NODE6, A6, UDP, 1), IN, ALLOW),
    Case("arp passes", pk.arp_request(pk.addr(B4), pk.addr(A4)), IN, ALLOW),  # type: ignore[arg-type]
    Case(
        "ipv4 options are skipped",
        pk.ip_frame(
            pk.ipv4(b4, a4, TCP, pk.tcp_segment(b4, a4, 4000, 80), options=b"\x01\x01\x01\x00")
        ),
        IN,
        ALLOW,
    ),
    Case(
        "ipv4 options do not hide a denied port",
        pk.ip_frame(
            pk.ipv4(b4, a4, TCP, pk.tcp_segment(b4, a4, 4000, 81), options=b"\x01\x01\x01\x00")
        ),
        IN,
        DENY,
        100,
    ),
    Case(
        "ipv6 extension headers are walked",
        pk.ip_frame(pk.ipv6(b6, a6, TCP, pk.tcp_segment(b6, a6, 4000, 80), ext=(pk.hop_by_hop(),))),
        IN,
        ALLOW,
    ),
    Case(
        "ipv6 extension headers do not hide a denied port",
        pk.ip_frame(
            pk.ipv6(
                b6,
                a6,
                TCP,
                pk.tcp_segment(b6, a6, 4000, 81),
                ext=(pk.hop_by_hop(), pk.fragment_header(0, True)),
            )
        ),
        IN,
        DENY,
        100,
    ),
    Case(
        "ipv4 first fragment is judged",
        pk.ip_frame(pk.ipv4(b4, a4, TCP, pk.tcp_segment(b4, a4, 4000, 81), more_fragments=True)),
        IN,
        DENY,
        100,
    ),
    Case(
        "ipv4 trailing fragment without its first fragment drops",
        pk.ip_frame(pk.ipv4(b4, a4, TCP, b"\0" * 16, fragment_offset=1480, ident=2)),
        IN,
        DENY,
        0,
    ),
    Case(
        "ipv6 trailing fragment without its first fragment drops",
        pk.ip_frame(pk.ipv6(b6, a6, TCP, b"\0" * 16, ext=(pk.fragment_header(1480, ident=8),))),
        IN,
        DENY,
        0,
    ),
    Case(
        "a truncated tcp header is dropped",
        pk.ip_frame(pk.ipv4(b4, a4, TCP, b"\0\x50")),
        IN,
        DENY,
        0,
    ),
    Case(
        "vlan-tagged frames are dropped unjudged without the vlan switch",
        pk.ip_frame(pk.ipv4(b4, a4, TCP, pk.tcp_segment(b4, a4, 4000, 80)), vlan=5),
        IN,
        DENY,
        0,
    ),
]


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        d.write(TABLES)
        yield d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_programs_decide_as_the_table_says(dp: Datapath, case: Case) -> None:
    assert dp.maps is not None
    maps.flush_conntrack(dp.maps)
    dp.events()
    assert dp.run(case.frame, case.direction) is case.verdict
    got = dp.events()
    if case.verdict is DENY:
        assert [(e.kind, e.rule_id) for e in got] == [(events.EventKind.DROP, case.rule)]
        assert got[0].direction == case.direction
    elif case.audit:
        assert [(e.kind, e.rule_id) for e in got] == [(events.EventKind.AUDIT, case.rule)]
    else:
        assert got == []


def test_a_drop_event_carries_the_five_tuple(dp: Datapath) -> None:
    dp.events()
    frame = pk.ip_frame(pk.ip(b4, a4, TCP, pk.tcp_segment(b4, a4, 41234, 22)))
    assert dp.run(frame, IN) is DENY
    (event,) = dp.events()
    assert (event.src, event.dst, event.protocol, event.sport, event.dport, event.port) == (
        b4,
        a4,
        TCP,
        41234,
        22,
        22,
    )
    assert (event.endpoint_id, event.reason) == (EP_A, events.DropReason.POLICY)


def test_counters_count_packets_and_bytes_per_deciding_rule(dp: Datapath) -> None:
    assert dp.maps is not None
    fd = dp.maps.fd("counters")
    before = events.read_counters(fd, [101, 106, 107, 108])
    frames = [(_p(B4, A4, TCP, 80), 101), (_p(B4, A4, TCP, 22), 106), (_p(B4, A4, TCP, 443), 108)]
    for frame, _ in frames:
        maps.flush_conntrack(dp.maps)
        dp.run(frame, IN)
    after = events.read_counters(fd, [101, 106, 107, 108])
    for frame, rule in frames:
        assert after[rule].packets - before[rule].packets == 1
        assert after[rule].bytes - before[rule].bytes == len(frame)
    assert after[107].packets - before[107].packets == 1  # the audit opinion is counted too
    dp.events()


def test_vlan_tagged_frames_are_judged_with_the_vlan_switch() -> None:
    with datapath(Shape(vlan=True)) as d:
        d.write(TABLES)
        inner = pk.ipv4(b4, a4, TCP, pk.tcp_segment(b4, a4, 4000, 81))
        assert d.run(pk.ip_frame(inner, vlan=5), IN) is DENY
        ok = pk.ipv4(b4, a4, TCP, pk.tcp_segment(b4, a4, 4000, 80))
        assert d.run(pk.ip_frame(ok, vlan=5), IN) is ALLOW


def test_trailing_fragments_are_dropped_when_the_shape_says_so() -> None:
    with datapath(Shape(fragments=FragmentPolicy.DROP)) as d:
        d.write(TABLES)
        frag = pk.ip_frame(pk.ipv4(b4, a4, TCP, b"\0" * 16, fragment_offset=1480))
        assert d.run(frag, IN) is DENY
        (event,) = d.events()
        assert event.reason is events.DropReason.FRAGMENT
        other = pk.ip_frame(
            pk.ipv4(pk.addr("10.9.9.9"), pk.addr("10.9.9.8"), TCP, b"\0" * 16, fragment_offset=1480)
        )
        assert d.run(other, IN) is ALLOW  # no endpoint: not ours to judge


def test_ipv6_is_dropped_unjudged_when_the_shape_has_no_ipv6() -> None:
    with datapath(Shape(ipv6=False)) as d:
        d.write(TABLES)
        assert d.run(_p(B6, A6, TCP, 80), IN) is DENY
        (event,) = d.events()
        assert event.reason is events.DropReason.UNPARSED
        assert d.run(_p(B4, A4, TCP, 81), IN) is DENY


def test_every_case_agrees_with_ir_lookup() -> None:
    """The table above is itself checked against the executable spec."""
    for case in CASES:
        if case.frame[12:14] != b"\x08\x00" or case.id.startswith(("ipv4 trailing", "a trunc")):
            continue
        ihl = (case.frame[14] & 0x0F) * 4
        src = ipaddress.ip_address(case.frame[26:30])
        dst = ipaddress.ip_address(case.frame[30:34])
        proto = case.frame[23]
        l4 = case.frame[14 + ihl :]
        if proto in (TCP, UDP, SCTP):
            port = int.from_bytes(l4[2:4], "big")
        elif proto == ICMP:
            port = ir.icmp_port(l4[0], l4[1])
        else:
            port = 0
        want = ir.lookup(TABLES, ir.Packet(src, dst, proto, port), case.direction)
        assert (want.action is Action.DENY) == (case.verdict is DENY), case.id


@pytest.mark.parametrize(("node", "pod"), [(NODE4, A4), (NODE6, A6)], ids=["ipv4", "ipv6"])
def test_only_the_nodes_own_stack_skips_ingress_policy(dp: Datapath, node: str, pod: str) -> None:
    # Sent by the node (kubelet probes): allowed. Forwarded with a node address as source
    # (SNAT, masquerade): judged like any other packet, and A is isolated.
    assert dp.maps is not None
    frame = _p(node, pod, TCP, 81)
    for forwarded, verdict in ((False, ALLOW), (True, DENY)):
        maps.flush_conntrack(dp.maps)
        dp.events()
        assert dp.run(frame, IN, forwarded=forwarded) is verdict
        packet = ir.Packet(pk.addr(node), pk.addr(pod), TCP, 81, forwarded=forwarded)
        assert (ir.lookup(TABLES, packet, IN).action is Action.DENY) == (verdict is DENY)
    assert [(e.kind, e.rule_id) for e in dp.events()] == [(events.EventKind.DROP, 100)]
