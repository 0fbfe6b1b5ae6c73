"""Fragments on the kernel (BPF_PROG_TEST_RUN): with the default Shape (fragments: TRACK) the
non-first fragments of a datagram follow the verdict on its first fragment, for IPv4 and IPv6,
on both hooks; a non-first fragment whose first fragment was not seen (an orphan, or one of
another datagram: another IP identification) drops with REASON_FRAGMENT; PASS and DROP keep
their behaviour.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.datapath import events
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

A4, A6, CLIENT4, CLIENT6 = "10.0.0.1", "fd00::1", "10.0.1.7", "2001:db8::7"
EP_A, CLASS_CLIENTS = 1, 5
UDP = ir.PROTO_UDP
IN, OUT = Direction.INGRESS, Direction.EGRESS
ALLOW, DENY = TcVerdict.ALLOW, TcVerdict.DENY
OPEN, SHUT, UNLISTED = 53, 54, 56  # the same ports both ways
RULE_ISOLATED, RULE_OPEN, RULE_SHUT = 300, 301, 302
RULE_E_ISOLATED, RULE_E_OPEN, RULE_E_SHUT = 310, 311, 312


def _rule(d: Direction, plen: int, port: int, action: Action, rule: int) -> ir.PolicyEntry:
    cls = CLASS_CLIENTS if plen > 32 else 0
    proto = UDP if plen > 64 else 0
    return ir.PolicyEntry(EP_A, d, plen, cls, proto, port, action, rule)


TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(pk.addr(A4), EP_A), ir.EndpointEntry(pk.addr(A6), EP_A)),
    classes=(
        ir.ClassEntry(ipaddress.ip_network("10.0.1.0/24"), CLASS_CLIENTS),
        ir.ClassEntry(ipaddress.ip_network("2001:db8::/32"), CLASS_CLIENTS),
    ),
    policy=(
        _rule(IN, 32, 0, Action.DENY, RULE_ISOLATED),
        _rule(IN, 96, OPEN, Action.ALLOW, RULE_OPEN),
        _rule(IN, 96, SHUT, Action.DENY, RULE_SHUT),
        _rule(OUT, 32, 0, Action.DENY, RULE_E_ISOLATED),
        _rule(OUT, 96, OPEN, Action.ALLOW, RULE_E_OPEN),
        _rule(OUT, 96, SHUT, Action.DENY, RULE_E_SHUT),
    ),
)
PAYLOAD = (bytes(range(256)) * 6)[:1528]  # with the UDP header, three fragments of 512


def _fragments(
    src: str, dst: str, dport: int, ident: int, *, first_ident: int | None = None
) -> list[bytes]:
    """The frames of one UDP datagram split into fragments of 512 bytes, first fragment first
    (with `first_ident`, the first fragment carries another identification than the rest)."""
    s, d = pk.addr(src), pk.addr(dst)
    datagram = pk.udp_datagram(s, d, 40000, dport, PAYLOAD)
    chunks = [datagram[i : i + 512] for i in range(0, len(datagram), 512)]
    frames = []
    for n, chunk in enumerate(chunks):
        offset, more = n * 512, n < len(chunks) - 1
        this_ident = first_ident if n == 0 and first_ident is not None else ident
        if isinstance(s, ipaddress.IPv4Address):
            packet = pk.ipv4(
                s, d, UDP, chunk, fragment_offset=offset, more_fragments=more, ident=this_ident
            )
        else:
            header = pk.fragment_header(offset, more, this_ident)
            packet = pk.ipv6(s, d, UDP, chunk, ext=(header,))
        frames.append(pk.ip_frame(packet))
    return frames


def _drops(dp: Datapath) -> list[tuple[events.DropReason | None, int]]:
    return [(e.reason, e.rule_id) for e in dp.events() if e.kind is events.EventKind.DROP]


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        assert d.shape.fragments is FragmentPolicy.TRACK  # the default
        d.write(TABLES)
        yield d


FAMILIES = pytest.mark.parametrize(
    ("local", "remote"), [(A4, CLIENT4), (A6, CLIENT6)], ids=["ipv4", "ipv6"]
)
DIRECTIONS = pytest.mark.parametrize("direction", [IN, OUT], ids=["to-pod", "from-pod"])


def _ends(direction: Direction, local: str, remote: str) -> tuple[str, str]:
    return (remote, local) if direction is IN else (local, remote)


@FAMILIES
@DIRECTIONS
def test_the_fragments_of_an_allowed_datagram_pass(
    dp: Datapath, direction: Direction, local: str, remote: str
) -> None:
    dp.events()
    first, *rest = _fragments(*_ends(direction, local, remote), OPEN, ident=0x1001)
    assert dp.run(first, direction) is ALLOW
    assert [dp.run(f, direction) for f in rest] == [ALLOW, ALLOW]
    assert _drops(dp) == []


@FAMILIES
@DIRECTIONS
def test_the_fragments_of_a_denied_datagram_drop_naming_the_rule(
    dp: Datapath, direction: Direction, local: str, remote: str
) -> None:
    dp.events()
    rule = RULE_SHUT if direction is IN else RULE_E_SHUT
    first, *rest = _fragments(*_ends(direction, local, remote), SHUT, ident=0x1002)
    assert dp.run(first, direction) is DENY
    assert [dp.run(f, direction) for f in rest] == [DENY, DENY]
    fragment = events.DropReason.FRAGMENT
    assert _drops(dp) == [(events.DropReason.POLICY, rule), (fragment, rule), (fragment, rule)]


@FAMILIES
@DIRECTIONS
def test_the_fragments_of_a_datagram_denied_by_isolation_drop(
    dp: Datapath, direction: Direction, local: str, remote: str
) -> None:
    dp.events()
    rule = RULE_ISOLATED if direction is IN else RULE_E_ISOLATED
    first, *rest = _fragments(*_ends(direction, local, remote), UNLISTED, ident=0x1003)
    assert dp.run(first, direction) is DENY
    assert [dp.run(f, direction) for f in rest] == [DENY, DENY]
    assert _drops(dp)[1:] == [(events.DropReason.FRAGMENT, rule)] * 2


@FAMILIES
@DIRECTIONS
def test_an_orphan_fragment_drops(
    dp: Datapath, direction: Direction, local: str, remote: str
) -> None:
    dp.events()
    _, *rest = _fragments(*_ends(direction, local, remote), OPEN, ident=0x1004)
    assert [dp.run(f, direction) for f in rest] == [DENY, DENY]
    assert _drops(dp) == [(events.DropReason.FRAGMENT, 0)] * 2


@FAMILIES
@DIRECTIONS
def test_a_fragment_of_another_datagram_does_not_follow_an_allowed_first_fragment(
    dp: Datapath, direction: Direction, local: str, remote: str
) -> None:
    dp.events()
    first, *rest = _fragments(
        *_ends(direction, local, remote), OPEN, ident=0x1005, first_ident=0x1006
    )
    assert dp.run(first, direction) is ALLOW
    assert [dp.run(f, direction) for f in rest] == [DENY, DENY]
    assert _drops(dp) == [(events.DropReason.FRAGMENT, 0)] * 2


@FAMILIES
@DIRECTIONS
def test_a_first_fragment_that_conntrack_passes_lets_its_datagram_through(
    dp: Datapath, direction: Direction, local: str, remote: str
) -> None:
    """The second datagram of an allowed flow is established: its first fragment passes on the
    conntrack entry and records the allow all the same."""
    ends = _ends(direction, local, remote)
    for ident in (0x1101, 0x1102):
        first, *rest = _fragments(*ends, OPEN, ident=ident)
        assert dp.run(first, direction) is ALLOW
        assert [dp.run(f, direction) for f in rest] == [ALLOW, ALLOW]
    assert _drops(dp) == []


def test_fragments_of_no_endpoint_pass(dp: Datapath) -> None:
    dp.events()
    _, *rest = _fragments("10.9.9.9", "10.9.9.8", OPEN, ident=0x1008)
    assert [dp.run(f, IN) for f in rest] == [ALLOW, ALLOW]
    assert _drops(dp) == []


def test_with_fragments_pass_non_first_fragments_pass_unjudged() -> None:
    with datapath(Shape(fragments=FragmentPolicy.PASS)) as d:
        d.write(TABLES)
        first, *rest = _fragments(CLIENT4, A4, SHUT, ident=0x1009)
        assert d.run(first, IN) is DENY
        assert [d.run(f, IN) for f in rest] == [ALLOW, ALLOW]
        assert d.maps is not None and "fragments" not in d.maps.fds


def test_with_fragments_drop_every_non_first_fragment_drops() -> None:
    with datapath(Shape(fragments=FragmentPolicy.DROP)) as d:
        d.write(TABLES)
        first, *rest = _fragments(CLIENT4, A4, OPEN, ident=0x100A)
        assert d.run(first, IN) is ALLOW
        assert [d.run(f, IN) for f in rest] == [DENY, DENY]


def test_tracking_works_without_conntrack() -> None:
    with datapath(Shape(conntrack=False)) as d:
        d.write(TABLES)
        first, *rest = _fragments(CLIENT6, A6, OPEN, ident=0x100B)
        assert d.run(first, IN) is ALLOW
        assert [d.run(f, IN) for f in rest] == [ALLOW, ALLOW]
        first, *rest = _fragments(CLIENT6, A6, SHUT, ident=0x100C)
        assert d.run(first, IN) is DENY
        assert [d.run(f, IN) for f in rest] == [DENY, DENY]
