"""Lowering: policies and cluster state → one node's datapath tables (`ir.NodeTables`).

For every endpoint (a pod on the node) and direction that some policy affects, and every peer
class (`stockade.compiler.classes`), the (protocol, port) space is cut at every boundary that a
rule names, each piece is decided once by the reference evaluator's own pipeline
(`stockade.model.evaluator.judge`), and the pieces become LPM entries: a protocol-wide entry for
the most common verdict and port prefixes for the rest. The datapath then decides any packet with
two lookups whatever the number of rules, and the lowering is exact because every input that could
change a verdict is either part of the class or a boundary of the port pieces.

Called by the operator (per node) and by the `datapath` conformance engine and benchmarks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise

from stockade.compiler import ir
from stockade.compiler.classes import Signature, build_regions, protocols_for
from stockade.compiler.ids import IdTable
from stockade.model.cluster import ClusterState, Pod
from stockade.model.evaluator import DirectionJudgement, judge
from stockade.model.flow import Flow
from stockade.model.matching import selects
from stockade.model.policy import (
    AnyPort,
    Direction,
    IcmpMatch,
    IPAddress,
    NamedPort,
    Peer,
    Policy,
    PortRange,
    Protocol,
    RuleRef,
)

PORT_SPACE = 1 << 16
_DIRECTIONS = {Direction.INGRESS: ir.Direction.INGRESS, Direction.EGRESS: ir.Direction.EGRESS}


@dataclass(frozen=True)
class Ids:
    """The id tables carried from one lowering to the next, so that ids stay put."""

    endpoints: IdTable[str] = field(default_factory=IdTable)
    classes: IdTable[Signature] = field(default_factory=IdTable)
    # Rule ids index the per-CPU counters (Shape.rules_max slots): leave room to probe.
    rules: IdTable[RuleRef] = field(default_factory=lambda: IdTable(space=60_000))


@dataclass(frozen=True)
class Lowered:
    tables: ir.NodeTables
    ids: Ids


Piece = tuple[int, int]  # [start, end] of the 16-bit port (or ICMP type/code) space
Outcome = tuple[ir.Action, RuleRef | None, ir.Action, RuleRef | None]


def _action(allowed: bool) -> ir.Action:
    return ir.Action.ALLOW if allowed else ir.Action.DENY


def _outcome(j: DirectionJudgement) -> Outcome:
    action = _action(j.allowed)
    if j.audit_allowed is None or j.audit_allowed == j.allowed:
        return (action, j.rule, ir.Action.NONE, None)
    return (action, j.rule, _action(j.audit_allowed), j.audit_rule)


def _boundaries(
    policies: Sequence[Policy], direction: Direction, protocol: Protocol, dst_pod: Pod | None
) -> list[Piece]:
    """Cut the port space of `protocol` at every edge a rule of `policies` names."""
    cuts = {0, PORT_SPACE}
    for policy in policies:
        for rule in policy.rules(direction):
            for spec in rule.ports:
                if isinstance(spec, PortRange) and spec.protocol is protocol and spec.start:
                    end = spec.end if spec.end is not None else spec.start
                    cuts.update((spec.start, end + 1))
                elif isinstance(spec, IcmpMatch) and spec.protocol is protocol:
                    low = ir.icmp_port(spec.type, spec.code or 0)
                    cuts.update((low, low + 1 if spec.code is not None else low + 256))
                elif isinstance(spec, NamedPort) and dst_pod is not None:
                    found = dst_pod.named_ports.get(spec.name)
                    if found is not None and found[1] is protocol:
                        cuts.update((found[0], found[0] + 1))
    edges = sorted(cuts)
    return [(a, b - 1) for a, b in pairwise(edges)]


def _flow(
    local: IPAddress, remote: IPAddress, direction: Direction, proto: Protocol, at: int
) -> Flow:
    src, dst = (remote, local) if direction is Direction.INGRESS else (local, remote)
    if proto.has_ports:
        return Flow(src, dst, proto, at)
    return Flow(src, dst, proto, None, at >> 8, at & 0xFF)


def _other_protocols(policies: Sequence[Policy]) -> list[Policy]:
    """The policies as a protocol without ports sees them: only rules for every port remain."""
    out = []
    for p in policies:
        ingress = tuple(replace(r, ports=(AnyPort(),)) for r in p.ingress if AnyPort() in r.ports)
        egress = tuple(replace(r, ports=(AnyPort(),)) for r in p.egress if AnyPort() in r.ports)
        out.append(replace(p, ingress=ingress, egress=egress))
    return out


def _prefixes(start: int, end: int, bits: int = 16) -> Iterable[tuple[int, int]]:
    """The fewest (value, prefix length) blocks that cover [start, end] exactly."""
    while start <= end:
        size = start & -start if start else 1 << bits
        while size > end - start + 1:
            size >>= 1
        yield start, bits - size.bit_length() + 1
        start += size


def _peers(policies: Iterable[Policy]) -> list[Peer]:
    seen: dict[Peer, None] = {}
    for policy in policies:
        for rule in (*policy.ingress, *policy.egress):
            for peer in rule.peers:
                seen.setdefault(peer, None)
    return list(seen)


def _egress_port_names(policies: Iterable[Policy]) -> frozenset[str]:
    return frozenset(
        spec.name
        for policy in policies
        for rule in policy.egress
        for spec in rule.ports
        if isinstance(spec, NamedPort)
    )


def lower_node(
    state: ClusterState, policies: Sequence[Policy], node: str, ids: Ids | None = None
) -> Lowered:
    """The tables for the endpoints on `node`; `ids` from the previous lowering keeps ids stable."""
    ids = ids or Ids()
    pods = sorted(
        (p for p in state.pods if p.node == node and not p.host_network and p.ips),
        key=lambda p: p.key,
    )
    affecting = {
        (pod.key, d): [p for p in policies if d in p.directions and selects(p, pod, state)]
        for pod in pods
        for d in Direction
    }
    relevant = {id(p): p for ps in affecting.values() for p in ps}
    regions = build_regions(
        state, node, _peers(relevant.values()), _egress_port_names(relevant.values())
    )
    endpoint_ids = ids.endpoints.assign(p.key for p in pods)
    class_ids = ids.classes.assign(sorted({r.signature for r in regions}))
    representatives: dict[Signature, IPAddress] = {}
    for region in regions:
        if region.representative is not None:
            representatives.setdefault(region.signature, region.representative)

    entries: list[_Entry] = []
    # Pods with the same policies, named ports and address families get the same entries but
    # for the endpoint id (the replicas of a workload): lower each such profile once.
    profiles: dict[tuple[object, ...], list[_Entry]] = {}
    for pod in pods:
        for direction in Direction:
            chosen = affecting[(pod.key, direction)]
            if not chosen:
                continue
            profile = (
                direction,
                tuple(id(p) for p in chosen),
                tuple(sorted(pod.named_ports.items())),
                tuple(sorted(ip.version for ip in pod.ips)),
            )
            if profile not in profiles:
                profiles[profile] = _endpoint_entries(
                    state, pod, 0, direction, chosen, class_ids, representatives
                )
            endpoint_id = endpoint_ids[pod.key]
            entries += [
                replace(e, entry=replace(e.entry, endpoint_id=endpoint_id))
                for e in profiles[profile]
            ]
    rule_refs = sorted({ref for e in entries for ref in _refs(e)}, key=_ref_key)
    rule_ids = ids.rules.assign(rule_refs)
    policy = tuple(_resolve_rule_ids(e, rule_ids) for e in entries)
    tables = ir.NodeTables(
        endpoints=tuple(
            ir.EndpointEntry(ip, endpoint_ids[pod.key]) for pod in pods for ip in pod.ips
        ),
        classes=tuple(
            ir.ClassEntry(
                r.network, class_ids[r.signature], ir.ClassFlag.LOCAL_NODE if r.signature[3] else 0
            )
            for r in regions
        ),
        policy=policy,
        rules={
            rule_ids[ref]: ir.RuleInfo(
                ref.kind.value, ref.namespace, ref.name, _DIRECTIONS[ref.direction], ref.index
            )
            for ref in rule_refs
        },
    )
    return Lowered(tables, Ids(endpoint_ids, class_ids, rule_ids))


@dataclass(frozen=True)
class _Entry:
    """A policy entry with its deciding RuleRefs beside it; rule ids are given in one pass."""

    entry: ir.PolicyEntry
    rule: RuleRef | None
    audit_rule: RuleRef | None


def _refs(e: _Entry) -> list[RuleRef]:
    return [r for r in (e.rule, e.audit_rule) if r is not None]


def _ref_key(ref: RuleRef) -> tuple[str, str, str, str, int]:
    return (ref.kind.value, ref.namespace, ref.name, ref.direction.value, ref.index)


def _resolve_rule_ids(e: _Entry, rule_ids: IdTable[RuleRef]) -> ir.PolicyEntry:
    return replace(
        e.entry,
        rule_id=rule_ids[e.rule] if e.rule else ir.RULE_NONE,
        audit_rule_id=rule_ids[e.audit_rule] if e.audit_rule else ir.RULE_NONE,
    )


def _endpoint_entries(
    state: ClusterState,
    pod: Pod,
    endpoint_id: int,
    direction: Direction,
    policies: list[Policy],
    class_ids: IdTable[Signature],
    representatives: dict[Signature, IPAddress],
) -> list[_Entry]:
    out: list[_Entry] = []
    dir_ = _DIRECTIONS[direction]
    other = _other_protocols(policies)
    for signature, remote in sorted(representatives.items(), key=lambda kv: class_ids[kv[0]]):
        local = next((ip for ip in pod.ips if ip.version == remote.version), None)
        if local is None:
            continue
        cid = class_ids[signature]
        dst_pod = pod if direction is Direction.INGRESS else state.pod_at(remote)

        def entry(prefixlen: int, proto: int, port: int, o: Outcome, cid: int = cid) -> _Entry:
            return _Entry(
                ir.PolicyEntry(
                    endpoint_id, dir_, prefixlen, cid, proto, port, o[0], ir.RULE_NONE, o[2]
                ),
                o[1],
                o[3],
            )

        # Protocols without ports (and any protocol stockade does not parse): class-wide entry.
        base_flow = _flow(pod_ip := local, remote, direction, Protocol.TCP, 0)
        base = _outcome(judge(state, other, base_flow, direction))
        out.append(entry(ir.PREFIX_CLASS, 0, 0, base))
        for proto in protocols_for(remote.version):
            pieces = _boundaries(policies, direction, proto, dst_pod)
            outcomes = [
                (
                    piece,
                    _outcome(
                        judge(
                            state,
                            policies,
                            _flow(pod_ip, remote, direction, proto, piece[0]),
                            direction,
                        )
                    ),
                )
                for piece in pieces
            ]
            widths = Counter[Outcome]()
            for (a, b), o in outcomes:
                widths[o] += b - a + 1
            common = widths.most_common(1)[0][0]
            if common != base:
                out.append(entry(ir.PREFIX_PROTO, proto.number, 0, common))
            for (a, b), o in outcomes:
                if o == common:
                    continue
                for value, bits in _prefixes(a, b):
                    out.append(entry(ir.PREFIX_PROTO + bits, proto.number, value, o))
    return out
