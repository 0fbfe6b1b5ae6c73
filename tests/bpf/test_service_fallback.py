"""Differential test of the Service fallback (bpf/service.h, `svc_verdict`): generated NodeTables
and a generated Service -> ready backends table; the lowering's verdicts
(`stockade.compiler.fallback`, tied to the evaluator composed over the backends by
tests/unit/test_fallback.py) written to a Shape with the fallback; the veth program decides a
client's first packet to each Service address and port as the composition of `ir.lookup` over
the ready backends says: a drop names the first denied backend's rule with reason SERVICE, or
no rule with reason SERVICE_NO_BACKENDS; a client without an entry (no egress policy) is judged
on the Service address as before (reason POLICY); an allowed flow is established afterwards.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stockade.compiler import abi, ir
from stockade.compiler.fallback import service_verdicts
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import Shape
from stockade.datapath import maps
from stockade.datapath.events import EventKind
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath
from tests.bpf.test_datapath_differential import V4, V6, node_tables, ports

VIPS = {4: [ipaddress.ip_address(f"10.96.0.{i}") for i in (10, 11)]}
VIPS[6] = [ipaddress.ip_address(f"fd96::{i}") for i in (10, 11)]
SERVICES = (
    ir.ServiceEntry(ipaddress.ip_network("10.96.0.0/16")),
    ir.ServiceEntry(ipaddress.ip_network("fd96::/112")),
)
PROTOS = [ir.PROTO_TCP, ir.PROTO_UDP, ir.PROTO_SCTP]
CLIENT_PORT = 40000


@st.composite
def fallback_case(draw: st.DrawFn) -> tuple[ir.NodeTables, list[ir.ServiceBackends]]:
    tables = draw(node_tables())
    assume(tables.endpoints)
    services = []
    for version, family in ((4, V4), (6, V6)):
        for vip in VIPS[version]:
            for proto in draw(
                st.lists(st.sampled_from(PROTOS), min_size=1, max_size=2, unique=True)
            ):
                backends = draw(
                    st.lists(st.tuples(st.sampled_from(family), ports), max_size=3, unique=True)
                )
                ordered = tuple(sorted(backends, key=lambda b: (b[0].packed, b[1])))
                services.append(ir.ServiceBackends(vip, proto, draw(ports), ordered))
    # one entry per (address, protocol, port)
    unique = {(s.address, s.protocol, s.port): s for s in services}
    return tables, list(unique.values())


def expected(
    tables: ir.NodeTables, client: ir.EndpointEntry, svc: ir.ServiceBackends
) -> tuple[Action, list[tuple[EventKind, abi.DropReason, int]]]:
    """The composition of `ir.lookup` over the backends, or the Service address judged as a
    peer when the client has no egress policy entry."""
    if not any(
        p.endpoint_id == client.endpoint_id and p.direction is Direction.EGRESS
        for p in tables.policy
    ):
        verdict = ir.lookup(
            tables, ir.Packet(client.address, svc.address, svc.protocol, svc.port), Direction.EGRESS
        )
        if verdict.action is Action.DENY:
            return Action.DENY, [(EventKind.DROP, abi.DropReason.POLICY, verdict.rule_id)]
        return Action.ALLOW, []
    if not svc.backends:
        return Action.DENY, [(EventKind.DROP, abi.DropReason.SERVICE_NO_BACKENDS, ir.RULE_NONE)]
    own = dataclasses.replace(tables, endpoints=(client,))
    for address, port in svc.backends:
        verdict = ir.lookup(
            own, ir.Packet(client.address, address, svc.protocol, port), Direction.EGRESS
        )
        if verdict.action is not Action.ALLOW:
            return Action.DENY, [(EventKind.DROP, abi.DropReason.SERVICE, verdict.rule_id)]
    return Action.ALLOW, []


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath(Shape(service_fallback=True)) as d:
        assert d.maps is not None
        yield d


@settings(
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=fallback_case())
def test_a_flow_to_a_service_is_decided_as_the_composition_over_its_ready_backends(
    dp: Datapath, case: tuple[ir.NodeTables, list[ir.ServiceBackends]]
) -> None:
    tables, services = case
    assert dp.maps is not None
    tables = dataclasses.replace(
        tables, services=SERVICES, service_verdicts=service_verdicts(tables, services)
    )
    dp.write(tables)
    dp.events()
    for client in tables.endpoints:
        if (
            len(
                {
                    e.endpoint_id
                    for e in tables.endpoints
                    if ir.to_v6(e.address) == ir.to_v6(client.address)
                }
            )
            > 1
        ):
            continue
        for svc in services:
            if svc.address.version != client.address.version:
                continue
            maps.flush_conntrack(dp.maps)
            frame = pk.packet_frame(
                ir.Packet(client.address, svc.address, svc.protocol, svc.port), CLIENT_PORT
            )
            action, seen = expected(tables, client, svc)
            got = dp.run(frame, Direction.EGRESS)
            assert got is (TcVerdict.DENY if action is Action.DENY else TcVerdict.ALLOW), (
                client,
                svc,
            )
            assert [
                (e.kind, e.reason, e.rule_id) for e in dp.events() if e.kind is EventKind.DROP
            ] == seen
            if action is Action.ALLOW:
                assert dp.run(frame, Direction.EGRESS) is TcVerdict.ALLOW  # established


def test_a_flow_not_to_a_service_address_is_judged_by_policy_as_before(dp: Datapath) -> None:
    client, other, vip = V4[0], V4[1], VIPS[4][0]
    tables = ir.NodeTables(
        endpoints=(ir.EndpointEntry(client, 1),),
        policy=(ir.PolicyEntry(1, Direction.EGRESS, 32, action=Action.DENY, rule_id=9),),
        services=SERVICES,
        service_verdicts=(
            ir.ServiceVerdictEntry(1, vip, ir.PROTO_TCP, 80, Action.ALLOW, 4),
            # a verdict for an address outside Service space is never looked up
            ir.ServiceVerdictEntry(1, other, ir.PROTO_TCP, 81, Action.ALLOW, 4),
        ),
    )
    assert dp.maps is not None
    dp.write(tables)
    dp.events()
    maps.flush_conntrack(dp.maps)
    other_frame = pk.packet_frame(ir.Packet(client, other, ir.PROTO_TCP, 80), CLIENT_PORT)
    assert dp.run(other_frame, Direction.EGRESS) is TcVerdict.DENY
    assert [(e.reason, e.rule_id) for e in dp.events()] == [(abi.DropReason.POLICY, 9)]
    outside = pk.packet_frame(ir.Packet(client, other, ir.PROTO_TCP, 81), CLIENT_PORT)
    assert dp.run(outside, Direction.EGRESS) is TcVerdict.DENY
    assert [(e.reason, e.rule_id) for e in dp.events()] == [(abi.DropReason.POLICY, 9)]
    # the same port of the Service address: the fallback's verdict; another port: policy
    to_vip = pk.packet_frame(ir.Packet(client, vip, ir.PROTO_TCP, 80), CLIENT_PORT)
    assert dp.run(to_vip, Direction.EGRESS) is TcVerdict.ALLOW
    other_port = pk.packet_frame(ir.Packet(client, vip, ir.PROTO_TCP, 81), CLIENT_PORT)
    assert dp.run(other_port, Direction.EGRESS) is TcVerdict.DENY
    assert [(e.reason, e.rule_id) for e in dp.events()] == [(abi.DropReason.POLICY, 9)]
