"""Differential test of Service flows: generated NodeTables, a client endpoint, a Service
address, a backend (a local endpoint or not) and a target port; the three programs of a Shape
with services decide as `ir.lookup` composed the way the Service semantics say: egress of the
client toward the backend, then, when the backend is an endpoint here, its ingress from the
client. `ir.lookup` is the spec of bpf/policy.h that tests/unit/test_lower_differential.py ties
to the reference evaluator (stockade.model).

Per example: the client's first packet to the Service passes its veth unjudged (no counter, no
event); the netfilter program, on the packet as DNAT leaves it, drops it exactly when the
composition denies, with the deciding rule in the event (or the audit events of both
judgements); an allowed flow's next packet is established at the client's veth, the reply
un-DNATed to the Service address passes the client's veth, and a local backend's veth sees
the flow as established.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import events, libbpf, maps
from stockade.datapath.events import EventKind
from stockade.harness import testrun
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath
from tests.bpf.test_datapath_differential import ALL, V4, V6, node_tables, ports

SERVICES = (
    ir.ServiceEntry(ipaddress.ip_network("10.96.0.0/16")),
    ir.ServiceEntry(ipaddress.ip_network("fd96::/112")),
)
VIPS = {4: ipaddress.ip_address("10.96.0.10"), 6: ipaddress.ip_address("fd96::10")}
# the backend's answer to the client's SYN, as it reaches the client after un-DNAT
SYN_ACK = pk.TCP_SYN | pk.TCP_ACK
SVC_PORTS = [80, 443, 53]
CLIENT_PORT = 40000


@st.composite
def service_case(draw: st.DrawFn) -> tuple[ir.NodeTables, list[tuple[ir.Packet, int]]]:
    """Tables and probes: (client -> backend packet after DNAT, Service port)."""
    tables = draw(node_tables())
    assume(tables.endpoints)
    probes = []
    for _ in range(draw(st.integers(1, 6))):
        client = draw(st.sampled_from([e.address for e in tables.endpoints]))
        family = V4 if client.version == 4 else V6
        local = [e.address for e in tables.endpoints if e.address.version == client.version]
        backend = draw(st.sampled_from(local) | st.sampled_from(family))
        proto = draw(st.sampled_from([ir.PROTO_TCP, ir.PROTO_UDP, ir.PROTO_SCTP]))
        probes.append(
            (ir.Packet(client, backend, proto, draw(ports)), draw(st.sampled_from(SVC_PORTS)))
        )
    return tables, probes


def expected(tables: ir.NodeTables, probe: ir.Packet) -> tuple[Action, list[tuple[EventKind, int]]]:
    """The composition's action and the events it names, in the order they are emitted."""
    seen: list[tuple[EventKind, int]] = []
    judgements = [Direction.EGRESS]
    if any(ir.to_v6(e.address) == ir.to_v6(probe.dst) for e in tables.endpoints):
        judgements.append(Direction.INGRESS)
    # the client is a pod behind its veth: the node forwards its flow, never sends it itself
    forwarded = dataclasses.replace(probe, forwarded=True)
    for direction in judgements:
        verdict = ir.lookup(tables, forwarded, direction)
        if verdict.action is Action.DENY:
            seen.append((EventKind.DROP, verdict.rule_id))
            return Action.DENY, seen
        if verdict.audit_action is Action.DENY:
            seen.append((EventKind.AUDIT, verdict.audit_rule_id))
    return Action.ALLOW, seen


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath(Shape(services=True)) as d:
        assert d.maps is not None
        yield d


def _forget_flows(dp: Datapath) -> None:
    assert dp.maps is not None
    maps.flush_conntrack(dp.maps)
    for name in ("svc_deferred", "svc_flows"):
        fd = dp.maps.fd(name)
        key_size = libbpf.map_info(fd).key_size
        for key in list(libbpf.map_keys(fd, key_size)):
            libbpf.map_delete(fd, key)


@settings(
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=service_case())
def test_service_flows_are_decided_on_the_backend_as_the_composition_of_ir_lookup(
    dp: Datapath, case: tuple[ir.NodeTables, list[tuple[ir.Packet, int]]]
) -> None:
    tables, probes = case
    assert dp.maps is not None
    tables = dataclasses.replace(tables, services=SERVICES)
    dp.write(tables)
    dp.events()
    nf = dp.program(Hook.SERVICE).fd
    for probe, svc_port in probes:
        _forget_flows(dp)
        vip = VIPS[probe.src.version]
        to_service = pk.packet_frame(
            ir.Packet(probe.src, vip, probe.protocol, svc_port), CLIENT_PORT
        )
        translated = pk.packet_frame(probe, CLIENT_PORT)
        reply = pk.packet_frame(
            ir.Packet(vip, probe.src, probe.protocol, CLIENT_PORT), svc_port, SYN_ACK
        )
        action, seen = expected(tables, probe)

        assert dp.run(to_service, Direction.EGRESS) is TcVerdict.ALLOW, probe
        assert dp.events() == [], "a deferred packet is judged nowhere at the veth"
        got = testrun.run_netfilter(nf, translated).verdict
        assert got is (TcVerdict.DENY if action is Action.DENY else TcVerdict.ALLOW), probe
        assert [(e.kind, e.rule_id) for e in dp.events()] == seen, probe
        if action is Action.DENY:
            continue
        assert dp.run(to_service, Direction.EGRESS) is TcVerdict.ALLOW
        assert dp.run(reply, Direction.INGRESS) is TcVerdict.ALLOW
        if any(ir.to_v6(e.address) == ir.to_v6(probe.dst) for e in tables.endpoints):
            assert dp.run(translated, Direction.INGRESS) is TcVerdict.ALLOW
        assert dp.events() == [], "established packets and replies are judged no more"


def test_a_flow_not_to_service_space_is_not_deferred(dp: Datapath) -> None:
    assert dp.maps is not None
    client, other = ALL[0], ALL[1]
    tables = ir.NodeTables(
        endpoints=(ir.EndpointEntry(client, 1),),
        policy=(ir.PolicyEntry(1, Direction.EGRESS, 32, action=Action.DENY, rule_id=9),),
    )
    dp.write(tables)
    dp.events()
    _forget_flows(dp)
    frame = pk.packet_frame(ir.Packet(client, other, ir.PROTO_TCP, 80))
    assert dp.run(frame, Direction.EGRESS) is TcVerdict.DENY
    assert [(e.kind, e.rule_id) for e in dp.events()] == [(EventKind.DROP, 9)]
    assert list(libbpf.map_keys(dp.maps.fd("svc_deferred"), 20)) == []
    counted = events.read_counters(dp.maps.fd("counters"), [9])
    assert counted[9].packets >= 1


def test_a_policy_change_judges_an_established_service_flow_again_on_its_backend(
    dp: Datapath,
) -> None:
    """Revalidation (bpf/conntrack.h, svc_flows): the client's entry is under the Service
    address, which no policy names; after a change it is judged on the backend it reached."""
    assert dp.maps is not None
    client, backend, vip = V4[0], V4[1], VIPS[4]
    allow = ir.PolicyEntry(1, Direction.EGRESS, 96, 7, ir.PROTO_TCP, 8080, Action.ALLOW, 21)
    default_deny = ir.PolicyEntry(1, Direction.EGRESS, 32, action=Action.DENY, rule_id=20)
    base = ir.NodeTables(
        endpoints=(ir.EndpointEntry(client, 1),),
        classes=(ir.ClassEntry(ipaddress.ip_network(f"{backend}/32"), 7),),
        services=SERVICES,
    )
    to_service = pk.packet_frame(ir.Packet(client, vip, ir.PROTO_TCP, 80), CLIENT_PORT)
    translated = pk.packet_frame(ir.Packet(client, backend, ir.PROTO_TCP, 8080), CLIENT_PORT)
    reply = pk.packet_frame(ir.Packet(vip, client, ir.PROTO_TCP, CLIENT_PORT), 80, SYN_ACK)
    nf = dp.program(Hook.SERVICE).fd

    for keeps in (True, False):
        _forget_flows(dp)
        dp.write(dataclasses.replace(base, policy=(default_deny, allow)))
        dp.events()
        assert dp.run(to_service, Direction.EGRESS) is TcVerdict.ALLOW
        assert testrun.run_netfilter(nf, translated).verdict is TcVerdict.ALLOW
        # a change: another rule id for the same allow, or the allow gone
        changed = (
            (default_deny, dataclasses.replace(allow, rule_id=22)) if keeps else (default_deny,)
        )
        dp.write(dataclasses.replace(base, policy=changed))
        assert dp.run(to_service, Direction.EGRESS) is TcVerdict.ALLOW
        deferred = list(libbpf.map_keys(dp.maps.fd("svc_deferred"), 20))
        entries = {(c.dport, c.rule_id) for c in maps.conntrack_entries(dp.maps)}
        if keeps:
            assert deferred == [] and (80, 22) in entries  # still allowed, judged on the backend
            assert dp.run(reply, Direction.INGRESS) is TcVerdict.ALLOW
        else:
            assert deferred != [] and not any(port == 80 for port, _ in entries)
            got = testrun.run_netfilter(nf, translated).verdict
            assert got is TcVerdict.DENY
            assert [(e.kind, e.rule_id) for e in dp.events()] == [(EventKind.DROP, 20)]
