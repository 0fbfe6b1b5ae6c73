"""The frame gate: the programs judge IPv4 and IPv6 (when compiled in) and pass ARP; every other
frame — an ethertype they do not know, VLAN tags they do not parse (the VLAN switch off, or more
tags than they walk), IPv6 when the shape has no IPv6 — is dropped with reason UNPARSED, on both
hooks. A stack of tags of VLAN ID 0 is the case that matters: the kernel strips such tags after
tc and delivers the IP packet inside, so a frame passed unjudged here would reach the pod.
"""

from __future__ import annotations

import ipaddress

import pytest

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import Shape
from stockade.datapath import events
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

A4, B4, CLIENT4, A6, B6 = "10.0.0.1", "10.0.0.2", "10.0.1.7", "fd00::1", "fd00::2"
EP_A, EP_B, CLASS_B, CLASS_CLIENTS = 1, 2, 2, 5
IN, OUT = Direction.INGRESS, Direction.EGRESS
ALLOW, DENY = TcVerdict.ALLOW, TcVerdict.DENY
TCP = ir.PROTO_TCP
Q, AD = pk.ETH_P_8021Q, pk.ETH_P_8021AD

TABLES = ir.NodeTables(
    endpoints=(
        ir.EndpointEntry(pk.addr(A4), EP_A),
        ir.EndpointEntry(pk.addr(A6), EP_A),
        ir.EndpointEntry(pk.addr(B4), EP_B),
        ir.EndpointEntry(pk.addr(B6), EP_B),
    ),
    classes=(
        ir.ClassEntry(ipaddress.ip_network(f"{B4}/32"), CLASS_B),
        ir.ClassEntry(ipaddress.ip_network(f"{B6}/128"), CLASS_B),
        ir.ClassEntry(ipaddress.ip_network("10.0.1.0/24"), CLASS_CLIENTS),
    ),
    policy=(
        ir.PolicyEntry(EP_A, IN, 32, 0, 0, 0, Action.DENY, 100),  # A is isolated for ingress
        ir.PolicyEntry(EP_A, IN, 96, CLASS_B, TCP, 80, Action.ALLOW, 101),
        ir.PolicyEntry(EP_A, OUT, 64, CLASS_CLIENTS, 0, 0, Action.DENY, 200),
    ),
)


def _syn(src: str, dst: str, port: int) -> bytes:
    return pk.packet_frame(ir.Packet(pk.addr(src), pk.addr(dst), TCP, port))


DENIED_IN = _syn(B4, A4, 81)  # B to A:81 hits A's isolation (rule 100)
ALLOWED_IN = _syn(B4, A4, 80)  # rule 101
DENIED_OUT = _syn(A4, CLIENT4, 443)  # A to the clients (rule 200)
STACKS = {
    "two 802.1Q tags": (Q, Q),
    "802.1ad over 802.1Q": (AD, Q),
    "four tags": (AD, Q, AD, Q),
    "four 802.1Q tags": (Q, Q, Q, Q),
}


@pytest.fixture(scope="module", params=[False, True], ids=["vlan off", "vlan on"])
def dp(request: pytest.FixtureRequest) -> object:
    with datapath(Shape(vlan=request.param)) as d:
        d.write(TABLES)
        yield d


def _dropped_unparsed(d: Datapath, frame: bytes, direction: Direction) -> None:
    d.events()
    assert d.run(frame, direction) is DENY
    (event,) = d.events()
    assert (event.kind, event.reason) == (events.EventKind.DROP, events.DropReason["UNPARSED"])
    assert event.direction == direction


@pytest.mark.parametrize("tpids", list(STACKS.values()), ids=list(STACKS))
@pytest.mark.parametrize(
    ("frame", "direction"),
    [(DENIED_IN, IN), (DENIED_OUT, OUT)],
    ids=["a denied syn to the pod", "a denied syn from the pod"],
)
def test_stacked_vlan_tags_of_id_0_never_carry_a_denied_syn_through(
    dp: Datapath, frame: bytes, direction: Direction, tpids: tuple[int, ...]
) -> None:
    assert dp.run(pk.tagged(frame, tpids, vid=0), direction) is DENY


@pytest.mark.parametrize("tpids", [(Q,), (Q, Q), (AD, Q)], ids=["one tag", "two tags", "q-in-q"])
def test_without_the_vlan_switch_a_tagged_frame_is_dropped_unjudged(
    tpids: tuple[int, ...],
) -> None:
    with datapath(Shape(vlan=False)) as d:
        d.write(TABLES)
        for frame, direction in ((ALLOWED_IN, IN), (DENIED_IN, IN), (DENIED_OUT, OUT)):
            _dropped_unparsed(d, pk.tagged(frame, tpids), direction)


def test_with_the_vlan_switch_two_tags_are_parsed_and_the_inner_packet_judged() -> None:
    with datapath(Shape(vlan=True)) as d:
        d.write(TABLES)
        for tpids in ((Q,), (Q, Q), (AD, Q)):
            assert d.run(pk.tagged(ALLOWED_IN, tpids), IN) is ALLOW
            assert d.run(pk.tagged(DENIED_IN, tpids), IN) is DENY
            (event,) = d.events()
            assert (event.reason, event.rule_id) == (events.DropReason.POLICY, 100)
        assert d.run(pk.tagged(pk.arp_request(pk.addr(A4), pk.addr(B4)), (AD, Q)), OUT) is ALLOW  # type: ignore[arg-type]


@pytest.mark.parametrize("tpids", [(Q, Q, Q), (AD, Q, AD, Q)], ids=["three tags", "four tags"])
def test_with_the_vlan_switch_more_tags_than_parsed_are_dropped_unjudged(
    tpids: tuple[int, ...],
) -> None:
    with datapath(Shape(vlan=True)) as d:
        d.write(TABLES)
        _dropped_unparsed(d, pk.tagged(ALLOWED_IN, tpids), IN)
        _dropped_unparsed(d, pk.tagged(DENIED_OUT, tpids), OUT)


@pytest.mark.parametrize(
    "ethertype",
    [0x88CC, 0x9000, 0x8847, 0x88E5, 0x0842, 0x0000],
    ids=["lldp", "loopback", "mpls", "macsec", "wake-on-lan", "ethertype 0"],
)
@pytest.mark.parametrize("direction", [IN, OUT], ids=["to the pod", "from the pod"])
def test_an_ethertype_other_than_ip_and_arp_is_dropped_unjudged(
    dp: Datapath, ethertype: int, direction: Direction
) -> None:
    frame = pk.ethernet(DENIED_IN[14:], ethertype)
    _dropped_unparsed(dp, frame, direction)


@pytest.mark.parametrize("direction", [IN, OUT], ids=["to the pod", "from the pod"])
def test_arp_passes(dp: Datapath, direction: Direction) -> None:
    assert dp.run(pk.arp_request(pk.addr(B4), pk.addr(A4)), direction) is ALLOW  # type: ignore[arg-type]


def test_without_the_ipv6_switch_ipv6_is_dropped_unjudged() -> None:
    with datapath(Shape(ipv6=False)) as d:
        d.write(TABLES)
        _dropped_unparsed(d, _syn(B6, A6, 80), IN)
        _dropped_unparsed(d, _syn(A6, B6, 80), OUT)
        assert d.run(_syn(B4, A4, 80), IN) is ALLOW
        assert d.run(_syn(B4, A4, 81), IN) is DENY
