"""ICMPv6 neighbour discovery and MLD in the compiled programs: never judged by policy, passed
only as RFC 4861 and RFC 3810 allow on-link (hop limit 255 for ND, 1 and a link-local source
for MLD, a link-local router for advertisements and redirects), dropped otherwise with reason
NOT_ON_LINK; a pod sending a router advertisement or a redirect drops with NOT_A_ROUTER, and one
sending from a global address that is not its own drops with SPOOFED. Every
case is checked against `ir.lookup` too, and generated ones against it in
test_datapath_differential.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.datapath import events, maps
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

A6, CLIENT6 = pk.addr("fd00::1"), pk.addr("2001:db8::7")
LINK_LOCAL, UNSPECIFIED = pk.addr("fe80::1"), pk.addr("::")
IN, OUT = Direction.INGRESS, Direction.EGRESS
R = events.DropReason
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(A6, 1),),
    classes=(),
    policy=(  # A isolated both ways: nothing of this file passes by policy
        ir.PolicyEntry(1, IN, 32, action=Action.DENY, rule_id=100),
        ir.PolicyEntry(1, OUT, 32, action=Action.DENY, rule_id=200),
    ),
)
RS, RA, NS, NA, REDIRECT = 133, 134, 135, 136, 137
MLD_QUERY, MLD_REPORT, MLD_DONE, MLD2_REPORT = 130, 131, 132, 143


@dataclass(frozen=True)
class Case:
    id: str
    src: ir.IPAddress
    dst: ir.IPAddress
    icmp_type: int
    hop_limit: int
    direction: Direction
    reason: events.DropReason | None  # None: passes

    def packet(self) -> ir.Packet:
        return ir.Packet(
            self.src, self.dst, ir.PROTO_ICMPV6, ir.icmp_port(self.icmp_type, 0), self.hop_limit
        )


CASES = [
    Case("neighbour solicitation from a pod", A6, CLIENT6, NS, 255, OUT, None),
    Case("duplicate address detection from ::", UNSPECIFIED, A6, NS, 255, OUT, None),
    Case("neighbour advertisement to a pod", CLIENT6, A6, NA, 255, IN, None),
    Case("router solicitation from a pod", LINK_LOCAL, A6, RS, 255, OUT, None),
    Case("router advertisement from the node's router", LINK_LOCAL, A6, RA, 255, IN, None),
    Case("redirect from the node's router", LINK_LOCAL, A6, REDIRECT, 255, IN, None),
    Case("mld report from a pod", LINK_LOCAL, A6, MLD2_REPORT, 1, OUT, None),
    Case("mld report before a link-local address", UNSPECIFIED, A6, MLD2_REPORT, 1, OUT, None),
    Case("mld query to a pod", LINK_LOCAL, A6, MLD_QUERY, 1, IN, None),
    # routed (hop limit below 255): a payload channel across nodes
    Case("routed neighbour solicitation", CLIENT6, A6, NS, 63, IN, R.NOT_ON_LINK),
    Case("routed neighbour advertisement", A6, CLIENT6, NA, 64, OUT, R.NOT_ON_LINK),
    Case("routed router solicitation", A6, CLIENT6, RS, 254, OUT, R.NOT_ON_LINK),
    Case("routed router advertisement", LINK_LOCAL, A6, RA, 64, IN, R.NOT_ON_LINK),
    Case("router advertisement from a global source", CLIENT6, A6, RA, 255, IN, R.NOT_ON_LINK),
    Case("redirect from a global source", CLIENT6, A6, REDIRECT, 255, IN, R.NOT_ON_LINK),
    Case("router advertisement from a pod", LINK_LOCAL, CLIENT6, RA, 255, OUT, R.NOT_A_ROUTER),
    Case("redirect from a pod", LINK_LOCAL, CLIENT6, REDIRECT, 255, OUT, R.NOT_A_ROUTER),
    Case("mld report with hop limit 64", LINK_LOCAL, A6, MLD_REPORT, 64, OUT, R.NOT_ON_LINK),
    Case("mld done from a global source", A6, CLIENT6, MLD_DONE, 1, OUT, R.NOT_ON_LINK),
    Case("mld query from a global source", CLIENT6, A6, MLD_QUERY, 1, IN, R.NOT_ON_LINK),
    # from a pod, a global source must be the pod's own
    Case("neighbour advertisement from another's address", CLIENT6, A6, NA, 255, OUT, R.SPOOFED),
    Case("neighbour solicitation from another's address", CLIENT6, A6, NS, 255, OUT, R.SPOOFED),
]


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        d.write(TABLES)
        yield d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_link_control_passes_only_as_valid_on_link(dp: Datapath, case: Case) -> None:
    assert dp.maps is not None
    maps.flush_conntrack(dp.maps)
    dp.events()
    want = ir.lookup(TABLES, case.packet(), case.direction)
    assert (want.action is Action.DENY) == (case.reason is not None)  # the reference agrees
    got = dp.run(pk.packet_frame(case.packet()), case.direction)
    seen = [(e.kind, e.reason, e.rule_id) for e in dp.events()]
    if case.reason is None:
        assert got is TcVerdict.ALLOW
        assert seen == []
    else:
        assert got is TcVerdict.DENY
        assert seen == [(events.EventKind.DROP, case.reason, ir.RULE_NONE)]
    assert maps.conntrack_entries(dp.maps) == []  # link control opens no flow
