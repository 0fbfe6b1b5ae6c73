"""Differential test: the kernel's verdict on generated NodeTables and packets equals
`ir.lookup`, on both hooks, with the deciding rule named by the drop or audit event.

Runs 1,000 examples (the `datapath` hypothesis profile); a failure prints the reproduction blob
(`@reproduce_failure`) so that the exact example can be replayed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import abi, ir
from stockade.compiler.ir import Action, Direction
from stockade.datapath import events, maps
from stockade.harness.testrun import TcVerdict
from stockade.model import evaluator
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

settings.register_profile(
    "datapath",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

V4 = [
    ipaddress.IPv4Address(a)
    for a in (
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.5",
        "10.0.1.1",
        "10.0.1.2",
        "10.1.0.5",
        "10.0.0.254",
        "192.168.1.1",
    )
]
V6 = [
    ipaddress.IPv6Address(a)
    for a in (
        "fd00::1",
        "fd00::2",
        "fd00::3",
        "fd00::5",
        "2001:db8::1",
        "2001:db8::2",
        "fd00::fe",
        "fe80::1",  # a link-local source: what a router and MLD use
    )
]
ALL: list[ir.IPAddress] = [*V4, *V6]
NETS: list[ir.IPNetwork] = [
    *(ipaddress.ip_network(f"{a}/32") for a in V4),
    *(ipaddress.ip_network(f"{a}/128") for a in V6),
    *(
        ipaddress.ip_network(n)
        for n in (
            "10.0.0.0/24",
            "10.0.0.0/30",
            "10.0.0.4/30",
            "10.0.1.0/24",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fd00::/64",
            "fd00::/126",
            "2001:db8::/32",
            "::/0",
        )
    ),
]
PROTOS = [ir.PROTO_TCP, ir.PROTO_UDP, ir.PROTO_SCTP, ir.PROTO_ICMP, ir.PROTO_ICMPV6, 47]
PORTS = [
    0,
    22,
    53,
    80,
    81,
    443,
    8080,
    8081,
    8083,
    65535,
    ir.icmp_port(8, 0),
    ir.icmp_port(0, 0),
    ir.icmp_port(3, 1),
    ir.icmp_port(11, 0),
    ir.icmp_port(128, 0),
    ir.icmp_port(129, 0),
    ir.icmp_port(1, 4),
    ir.icmp_port(135, 0),
    ir.icmp_port(134, 0),
    ir.icmp_port(136, 0),
    ir.icmp_port(137, 0),
    ir.icmp_port(130, 0),
    ir.icmp_port(143, 0),
]
ENDPOINT_IDS = st.integers(1, 5)
CLASS_IDS = st.integers(0, 6)
RULE_IDS = st.integers(0, 4000)

endpoint_entries = st.lists(
    st.tuples(st.sampled_from(ALL), ENDPOINT_IDS), max_size=8, unique_by=lambda t: t[0]
).map(lambda xs: tuple(ir.EndpointEntry(a, i) for a, i in xs))

class_entries = st.lists(
    st.tuples(st.sampled_from(NETS), CLASS_IDS, st.sampled_from([0, 0, 0, 1])),
    max_size=10,
    unique_by=lambda t: t[0],
).map(lambda xs: tuple(ir.ClassEntry(n, c, f) for n, c, f in xs))

ports = st.one_of(st.sampled_from(PORTS), st.integers(0, 65535))


@st.composite
def policy_entry(draw: st.DrawFn, endpoint_ids: list[int], class_ids: list[int]) -> ir.PolicyEntry:
    prefixlen = draw(st.one_of(st.sampled_from([32, 64, 80, 96]), st.integers(32, 96)))
    action = draw(st.sampled_from([Action.ALLOW, Action.DENY]))
    audit = draw(st.sampled_from([Action.NONE, Action.NONE, Action.ALLOW, Action.DENY]))
    return ir.PolicyEntry(
        endpoint_id=draw(st.sampled_from(endpoint_ids) | ENDPOINT_IDS),
        direction=draw(st.sampled_from(list(Direction))),
        prefixlen=prefixlen,
        class_id=draw(st.sampled_from(class_ids) | CLASS_IDS),
        protocol=draw(st.sampled_from(PROTOS)),
        port=draw(ports),
        action=action,
        rule_id=draw(RULE_IDS),
        audit_action=audit,
        audit_rule_id=draw(RULE_IDS) if audit is not Action.NONE else 0,
    )


@st.composite
def node_tables(draw: st.DrawFn) -> ir.NodeTables:
    endpoints = draw(endpoint_entries)
    classes = draw(class_entries)
    ep_ids = sorted({e.endpoint_id for e in endpoints}) or [1]
    class_ids = sorted({c.class_id for c in classes}) or [0]
    entries = draw(st.lists(policy_entry(ep_ids, class_ids), max_size=25))
    policy = tuple({e.key(): e for e in entries}.values())
    return ir.NodeTables(endpoints=endpoints, classes=classes, policy=policy)


def _family(address: ir.IPAddress) -> list[ir.IPAddress]:
    return [*V4] if address.version == 4 else [*V6]


def _class_of(tables: ir.NodeTables, address: ir.IPAddress) -> int:
    cls = ir.classify(tables, address)
    return cls.class_id if cls else 0


@st.composite
def packet(draw: st.DrawFn, tables: ir.NodeTables) -> tuple[ir.Packet, Direction]:
    """A packet and a hook. Most follow a policy entry (its endpoint, a remote of its class, its
    protocol and a port under its prefix) so that most probes reach the policy trie's entries."""
    entry = draw(st.sampled_from(tables.policy)) if tables.policy else None
    locals_ = [e.address for e in tables.endpoints if entry and e.endpoint_id == entry.endpoint_id]
    if entry is None or not locals_ or draw(st.integers(0, 4)) == 0:
        direction = draw(st.sampled_from(list(Direction)))
        pool = [e.address for e in tables.endpoints] or ALL
        local: ir.IPAddress = draw(st.sampled_from(pool))
        remote: ir.IPAddress = draw(st.sampled_from(_family(local)))
        icmp = ir.PROTO_ICMP if local.version == 4 else ir.PROTO_ICMPV6
        proto = draw(st.sampled_from([ir.PROTO_TCP, ir.PROTO_UDP, ir.PROTO_SCTP, icmp, 47]))
        port = draw(ports)
    else:
        direction = entry.direction
        local = draw(st.sampled_from(locals_))
        family = _family(local)
        same_class = [a for a in family if _class_of(tables, a) == entry.class_id]
        remote = draw(st.sampled_from(same_class or family))
        icmp = ir.PROTO_ICMP if local.version == 4 else ir.PROTO_ICMPV6
        protocols = [ir.PROTO_TCP, ir.PROTO_UDP, ir.PROTO_SCTP, icmp, 47]
        proto = entry.protocol if entry.protocol in protocols else draw(st.sampled_from(protocols))
        wild = min(16, abi.POLICY_KEY_BITS - entry.prefixlen)
        port = (entry.port & ~((1 << wild) - 1) & 0xFFFF) | draw(st.integers(0, (1 << wild) - 1))
    if proto == 47:
        port = 0
    src, dst = (remote, local) if direction is Direction.INGRESS else (local, remote)
    hop_limit = None  # on-link for ND (255) and MLD (1), 64 for the rest
    if proto == ir.PROTO_ICMPV6 and port >> 8 in ir.ICMPV6_CONTROL_TYPES:
        hop_limit = draw(st.sampled_from([None, 255, 64, 1]))
    forwarded = draw(st.booleans())  # arrived on an interface, or sent by the node itself
    return ir.Packet(src, dst, proto, port, hop_limit, forwarded), direction


@st.composite
def scenario(draw: st.DrawFn) -> tuple[ir.NodeTables, list[tuple[ir.Packet, Direction]]]:
    tables = draw(node_tables())
    return tables, draw(st.lists(packet(tables), min_size=1, max_size=12))


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        yield d


@settings(settings.get_profile("datapath"))
@given(case=scenario())
def test_the_kernel_decides_as_ir_lookup(
    dp: Datapath, case: tuple[ir.NodeTables, list[tuple[ir.Packet, Direction]]]
) -> None:
    tables, probes = case
    assert dp.maps is not None
    dp.write(tables)
    dp.events()
    for probe, direction in probes:
        maps.flush_conntrack(dp.maps)
        want = ir.lookup(tables, probe, direction)
        got = dp.run(pk.packet_frame(probe), direction, forwarded=probe.forwarded)
        seen = [(e.kind, e.rule_id) for e in dp.events()]
        expected = TcVerdict.DENY if want.action is Action.DENY else TcVerdict.ALLOW
        assert got is expected, (probe, direction, want)
        if want.action is Action.DENY:
            assert seen == [(events.EventKind.DROP, want.rule_id)], (probe, direction)
        elif want.audit_action is Action.DENY:
            assert seen == [(events.EventKind.AUDIT, want.audit_rule_id)], (probe, direction)
        else:
            assert seen == [], (probe, direction)


def _from_no_endpoint(tables: ir.NodeTables, probe: ir.Packet) -> ir.Packet:
    """`probe` with a source that is no endpoint's (what a pending pod's own address is), when
    its family has one: so that half the probes of a pending pod are not spoofed."""
    taken = {ir.to_v6(e.address) for e in tables.endpoints}
    free = [a for a in _family(probe.src) if ir.to_v6(a) not in taken and a != probe.dst]
    return dataclasses.replace(probe, src=free[0]) if free else probe


pending_states = st.sampled_from(
    [abi.PendingState.CLOSED, abi.PendingState.CLOSED, abi.PendingState.OPEN]
)


def _link_control_reason(probe: ir.Packet, direction: Direction) -> events.DropReason | None:
    """The reason ICMPv6 link control that is refused drops with, before any pending or policy
    check (bpf/hook.h: it is judged by the on-link rules, not by the interface's state); None for
    any other packet, or link control a pod sends from another's address (SPOOFED)."""
    if probe.protocol != ir.PROTO_ICMPV6 or probe.port >> 8 not in ir.ICMPV6_CONTROL_TYPES:
        return None
    check = evaluator.link_control(
        probe.port >> 8, probe.src, probe.effective_hop_limit, direction is Direction.EGRESS
    )
    if check is evaluator.LinkControl.NOT_A_ROUTER:
        return events.DropReason.NOT_A_ROUTER
    if check is evaluator.LinkControl.NOT_ON_LINK:
        return events.DropReason.NOT_ON_LINK
    return events.DropReason.SPOOFED


@settings(settings.get_profile("datapath"), max_examples=300)
@given(case=scenario(), state=pending_states)
def test_a_pending_interface_passes_only_what_is_always_allowed_as_ir_lookup_says(
    dp: Datapath,
    case: tuple[ir.NodeTables, list[tuple[ir.Packet, Direction]]],
    state: abi.PendingState,
) -> None:
    """The interface of the test runs (the loopback) is pending: whatever the endpoints and
    policy entries say, the kernel passes what `ir.lookup(..., pending=state)` passes (with
    CLOSED: only the node's own addresses, ICMPv6 neighbour discovery), drops the rest with
    reason PENDING (SPOOFED for a source that is an endpoint's, from the pod), and records no
    conntrack entry."""
    tables, probes = case
    assert dp.maps is not None
    dp.write(tables)
    dp.events()
    pending = maps.Pending(dp.maps)
    pending.mark(maps.LOOPBACK_IFINDEX, state)
    try:
        for i, (drawn, direction) in enumerate(probes):
            probe = _from_no_endpoint(tables, drawn) if i % 2 else drawn
            maps.flush_conntrack(dp.maps)
            want = ir.lookup(tables, probe, direction, pending=state)
            got = dp.run(pk.packet_frame(probe), direction, forwarded=probe.forwarded)
            seen = [(e.kind, e.reason, e.rule_id) for e in dp.events()]
            expected = TcVerdict.DENY if want.action is Action.DENY else TcVerdict.ALLOW
            assert got is expected, (probe, direction, state, want)
            if want.action is Action.DENY:
                redirect = direction is Direction.EGRESS and (
                    probe.port >> 8 == ir.REDIRECT_TYPES.get(probe.protocol)
                )
                spoofed = (
                    state is abi.PendingState.CLOSED
                    and direction is Direction.EGRESS
                    and any(ir.to_v6(e.address) == ir.to_v6(probe.src) for e in tables.endpoints)
                )
                reason = (
                    events.DropReason.NOT_A_ROUTER
                    if redirect
                    else _link_control_reason(probe, direction)
                    or (events.DropReason.SPOOFED if spoofed else events.DropReason.PENDING)
                )
                assert seen == [(events.EventKind.DROP, reason, ir.RULE_NONE)], (probe, direction)
            else:
                assert seen == [], (probe, direction)
            assert maps.conntrack_entries(dp.maps) == [], (probe, direction)
    finally:
        pending.clear(maps.LOOPBACK_IFINDEX)
