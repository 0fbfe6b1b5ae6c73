"""Lowering: policies and cluster state → one node's datapath tables (`ir.NodeTables`).

For every endpoint (a pod on the node) and direction that some policy affects, and every peer
class (`stockade.compiler.classes`), the (protocol, port) space is cut at every boundary that a
rule names, each piece is decided once by the reference evaluator's own pipeline
(`stockade.model.evaluator.judge`), and the pieces become LPM entries: a protocol-wide entry for
the most common verdict and port prefixes for the rest. The datapath then decides any packet with
two lookups whatever the number of rules, and the lowering is exact because every input that could
change a verdict is either part of the class or a boundary of the port pieces.

Cost: linear in a policy's size. Classes follow the rules' peer sets (`classes.peer_groups`), so
the n ipBlocks of one rule are one class; a class is cut only at the ports of the rules that can
match it, each piece is decided reading only the port specs that cover it (`_for_remote`,
`_by_piece`), and adjacent pieces with the same verdict merge before they become prefixes. One
rule of n ipBlocks by m ports gives about n class entries and m policy entries per endpoint
(tests/unit/test_lower_linear.py); `stockade.model.admission.POLICY_SIZE_LIMIT` bounds n + m.

Called by the operator (per node) and by the `datapath` conformance engine and benchmarks.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise

from stockade.compiler import abi, ir
from stockade.compiler.classes import (
    Addresses,
    Signature,
    build_regions,
    peer_groups,
    protocols_for,
)
from stockade.compiler.ids import IdTable
from stockade.compiler.membership import Membership, PodsChanged
from stockade.compiler.selection import Selection, is_endpoint
from stockade.model.cluster import ClusterState, Pod
from stockade.model.evaluator import DirectionJudgement, judge
from stockade.model.flow import Flow
from stockade.model.matching import peer_matches
from stockade.model.policy import (
    AnyPeer,
    AnyPort,
    Direction,
    IcmpMatch,
    IPAddress,
    NamedPort,
    Peer,
    PodSet,
    Policy,
    PortRange,
    PortSpec,
    Protocol,
    Rule,
    RuleRef,
)

PORT_SPACE = 1 << 16
VERDICTS_LIMIT = 250_000  # verdicts per generation of `Verdicts` (at most two generations kept)
_DIRECTIONS = {Direction.INGRESS: ir.Direction.INGRESS, Direction.EGRESS: ir.Direction.EGRESS}


@dataclass(frozen=True)
class Ids:
    """The id tables carried from one lowering to the next, so that ids stay put."""

    endpoints: IdTable[str] = field(default_factory=IdTable)
    classes: IdTable[Signature] = field(default_factory=IdTable)
    # Rule ids index the per-CPU counters (Shape.rules_max slots): leave room to probe.
    rules: IdTable[RuleRef] = field(default_factory=lambda: IdTable(space=60_000))


@dataclass(frozen=True)
class RegionMemo:
    """What a node's regions were built from (`key`: the peers, their groups, the egress port
    names and what `build_regions` read of the state) and what the lowering took from them
    besides the class entries: the signatures, and the first representative of each."""

    key: object
    signatures: tuple[Signature, ...]
    representatives: tuple[tuple[Signature, IPAddress], ...]


@dataclass(frozen=True)
class Lowered:
    tables: ir.NodeTables
    ids: Ids
    # The node's next lowering reuses its class entries when its regions would be built from
    # the same inputs (policies added over peers the node has already): a node's trie holds a
    # host region per peer member, the largest part of its lowering.
    regions: RegionMemo | None = field(default=None, compare=False)


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


def _for_remote(
    state: ClusterState, policies: Sequence[Policy], direction: Direction, remote: IPAddress
) -> list[Policy]:
    """The policies as one remote address sees them in `direction`: the rules none of whose
    peers holds it are gone (they cannot match it, whatever the port), and the peers of the
    others are every address (one of them holds it). The evaluator decides every flow with that
    remote as with the policies given, the pieces are cut only at the edges of rules that can
    apply, and each decision reads no peer list: with a rule of n ipBlocks and m ports, a
    class's entries and decisions grow with m, not n x m."""
    inside: dict[Peer, bool] = {}

    def matching(peers: tuple[Peer, ...]) -> bool:
        for peer in peers:
            found = inside.get(peer)
            if found is None:
                found = isinstance(peer, AnyPeer) or peer_matches(peer, remote, state)
                inside[peer] = found
            if found:
                return True
        return False

    out = []
    for p in policies:
        rules = tuple(
            replace(r, peers=(AnyPeer(),)) for r in p.rules(direction) if matching(r.peers)
        )
        if direction is Direction.INGRESS:
            out.append(replace(p, ingress=rules))
        else:
            out.append(replace(p, egress=rules))
    return out


def _span(spec: PortSpec, protocol: Protocol, dst_pod: Pod | None) -> Piece | None:
    """The part of `protocol`'s port space that `spec` can match (a superset: the evaluator
    still decides with the spec itself), or None when it matches none of it."""
    if isinstance(spec, PortRange):
        if spec.protocol is not protocol:
            return None
        if not spec.start:
            return (0, PORT_SPACE - 1)
        return (spec.start, spec.end if spec.end is not None else spec.start)
    if isinstance(spec, IcmpMatch):
        if spec.protocol is not protocol:
            return None
        low = ir.icmp_port(spec.type, spec.code or 0)
        return (low, low if spec.code is not None else low + 255)
    if isinstance(spec, NamedPort):
        found = dst_pod.named_ports.get(spec.name) if dst_pod is not None else None
        if found is None or found[1] is not protocol:
            return None
        return (found[0], found[0])
    return (0, PORT_SPACE - 1)  # AnyPort, and anything else: everywhere


def _by_piece(
    policies: Sequence[Policy],
    direction: Direction,
    protocol: Protocol,
    dst_pod: Pod | None,
    pieces: Sequence[Piece],
) -> Iterable[tuple[Piece, list[Policy]]]:
    """Each piece with the policies as a flow to it sees them: every rule keeps only the port
    specs that can match the piece, and a rule left with none is gone. The pieces are cut at
    every edge of every spec, so a spec covers a piece whole or not at all; a sweep over the
    pieces in order keeps the specs that cover the current one, so that deciding a piece reads
    only those instead of every port of every rule."""
    spans: list[tuple[int, int, int, int, PortSpec]] = []  # (start, end, rule, spec order, spec)
    rules: list[tuple[int, Rule]] = []  # (policy index, rule), in order
    for pi, policy in enumerate(policies):
        for rule in policy.rules(direction):
            ri = len(rules)
            rules.append((pi, rule))
            for si, spec in enumerate(rule.ports):
                span = _span(spec, protocol, dst_pod)
                if span is not None:
                    spans.append((span[0], span[1], ri, si, spec))
    spans.sort(key=lambda s: (s[0], s[2], s[3]))
    active: dict[tuple[int, int], tuple[int, PortSpec]] = {}  # (rule, spec order) -> (end, spec)
    ending: list[tuple[int, int, int]] = []  # heap of (end, rule, spec order)
    at = 0
    for piece in pieces:
        start = piece[0]
        while at < len(spans) and spans[at][0] <= start:
            _, s1, ri, si, spec = spans[at]
            active[(ri, si)] = (s1, spec)
            heapq.heappush(ending, (s1, ri, si))
            at += 1
        while ending and ending[0][0] < start:
            _, ri, si = heapq.heappop(ending)
            active.pop((ri, si), None)
        kept: dict[int, list[tuple[int, PortSpec]]] = {}
        for (ri, si), (_, spec) in active.items():
            kept.setdefault(ri, []).append((si, spec))
        per_policy: list[list[Rule]] = [[] for _ in policies]
        for ri in sorted(kept):
            pi, rule = rules[ri]
            per_policy[pi].append(replace(rule, ports=tuple(sp for _, sp in sorted(kept[ri]))))
        judged = [
            replace(p, ingress=tuple(r))
            if direction is Direction.INGRESS
            else replace(p, egress=tuple(r))
            for p, r in zip(policies, per_policy, strict=True)
        ]
        yield piece, judged


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


def affecting_policies(affecting: dict[tuple[str, Direction], list[Policy]]) -> list[Policy]:
    """The distinct policies of `affecting`, in first-seen order."""
    return list({id(p): p for ps in affecting.values() for p in ps}.values())


def _rule_peers(policies: Iterable[Policy]) -> list[tuple[Peer, ...]]:
    return [rule.peers for policy in policies for rule in (*policy.ingress, *policy.egress)]


def _runs(outcomes: list[tuple[Piece, Outcome]]) -> list[tuple[Piece, Outcome]]:
    """Adjacent pieces with the same outcome merged into one: a list of single ports becomes
    the ranges it covers, each a few prefixes."""
    out: list[tuple[Piece, Outcome]] = []
    for (a, b), o in outcomes:
        if out and out[-1][1] == o and out[-1][0][1] + 1 == a:
            out[-1] = ((out[-1][0][0], b), o)
        else:
            out.append(((a, b), o))
    return out


def _egress_port_names(policies: Iterable[Policy]) -> frozenset[str]:
    return frozenset(
        spec.name
        for policy in policies
        for rule in policy.egress
        for spec in rule.ports
        if isinstance(spec, NamedPort)
    )


Template = tuple[int, int, int, Outcome]  # (prefix length, protocol, port, outcome)
# (direction, ids of the chosen policies, the local pod's named ports)
ProfileKey = tuple[Direction, tuple[int, ...], tuple[tuple[str, tuple[int, Protocol]], ...]]
# (family, membership in each peer of the chosen policies, the remote pod's named ports where
# they can resolve, the remote is the local node)
RemoteKey = tuple[int, tuple[bool, ...], tuple[tuple[str, tuple[int, Protocol]], ...], bool]


class Verdicts:
    """The policy entries of one endpoint profile for one remote class, kept across nodes and
    passes: a profile's verdict depends only on its chosen policies, the local pod's named ports
    and what those policies can see of the remote (its membership in each of their peers, its
    named ports, whether it is the local node), so the key is exact whatever else changed.

    Keys hold policy ids; the policies are kept alive here so that no id is reused while a key
    names it. `retain()` drops what names a policy that is gone.

    Bounded in two generations: when the current one holds more than `limit` entries it becomes
    the older one and the one before is dropped; an entry found in the older generation moves
    back to the current one. What is in use stays; what no pass asked for through a whole
    generation goes (at worst it is judged again), so a long-running operator under pod and
    label churn keeps at most 2 x `limit` verdicts.
    """

    def __init__(self, limit: int = VERDICTS_LIMIT) -> None:
        self._entries: dict[tuple[ProfileKey, RemoteKey], tuple[Template, ...]] = {}
        self._older: dict[tuple[ProfileKey, RemoteKey], tuple[Template, ...]] = {}
        self._alive: dict[int, Policy] = {}
        self._limit = limit

    def __len__(self) -> int:
        return len(self._entries) + len(self._older)

    def get(self, key: tuple[ProfileKey, RemoteKey]) -> tuple[Template, ...] | None:
        found = self._entries.get(key)
        if found is None:
            found = self._older.pop(key, None)
            if found is not None:
                self._store(key, found)
        return found

    def put(
        self,
        key: tuple[ProfileKey, RemoteKey],
        chosen: Sequence[Policy],
        value: tuple[Template, ...],
    ) -> None:
        for policy in chosen:
            self._alive[id(policy)] = policy
        self._store(key, value)

    def _store(self, key: tuple[ProfileKey, RemoteKey], value: tuple[Template, ...]) -> None:
        self._entries[key] = value
        if len(self._entries) > self._limit:
            self._older, self._entries = self._entries, {}

    def retain(self, policies: Iterable[Policy]) -> None:
        """Forget every entry that names a policy not in `policies`."""
        current = {id(p): p for p in policies}
        self._alive = {i: p for i, p in self._alive.items() if current.get(i) is p}

        def kept(
            entries: dict[tuple[ProfileKey, RemoteKey], tuple[Template, ...]],
        ) -> dict[tuple[ProfileKey, RemoteKey], tuple[Template, ...]]:
            return {k: v for k, v in entries.items() if all(i in self._alive for i in k[0][1])}

        self._entries, self._older = kept(self._entries), kept(self._older)


class Lowering:
    """One cluster state and policy set, lowered node by node; what the nodes share (host
    addresses, peer members, which policies select which pod, verdicts) is computed once."""

    def __init__(
        self,
        state: ClusterState,
        policies: Sequence[Policy],
        verdicts: Verdicts | None = None,
        previous: dict[str, tuple[object, Lowered]] | None = None,
        membership: Membership | None = None,
        selection: Selection | None = None,
        pods_changed: PodsChanged | None = None,
    ) -> None:
        """`verdicts`, `previous` (node -> the inputs and result of its last lowering),
        `membership` (pod sets' members, `stockade.compiler.membership`) and `selection` (the
        policies of each pod and the endpoints of each node, `stockade.compiler.selection`,
        given only with `membership`) are carried from pass to pass by the caller; all are
        updated in place. `pods_changed`: the pods changed since the membership's last state,
        when the caller knows them (`Membership.update`)."""
        self.state = state
        self.policies = tuple(policies)
        self.membership = membership
        self.selection = selection if membership is not None else None
        if membership is not None:
            membership.update(state, pods_changed)
            if self.selection is not None:
                self.selection.update(state, self.policies, membership)
        self.addresses = Addresses(state, membership)
        self.verdicts = verdicts if verdicts is not None else Verdicts()
        self.previous = previous if previous is not None else {}
        self._selecting: dict[str, list[Policy]] | None = None
        self._by_node: dict[str, list[Pod]] | None = None

    def selecting(self, pod: Pod) -> list[Policy]:
        """The policies whose subject holds `pod`, in the order given."""
        if self.selection is not None:
            return self.selection.selecting(pod)
        if self._selecting is None:
            self._selecting = {}
            for policy in self.policies:
                for member in self._pods_in(policy.subject):
                    self._selecting.setdefault(member.key, []).append(policy)
        return self._selecting.get(pod.key, [])

    def _pods_in(self, pods: PodSet) -> list[Pod]:
        if self.membership is not None:
            return self.membership.pods_in(self.state, pods)
        return self.state.index.pods_in(pods)

    def _endpoints(self, node: str) -> list[Pod]:
        """The endpoints on `node` (scheduled, addressed, not host-network pods)."""
        if self.selection is not None:
            return self.selection.endpoints(node)
        if self._by_node is None:
            self._by_node = {}
            for pod in self.state.pods:
                if is_endpoint(pod):
                    assert pod.node is not None
                    self._by_node.setdefault(pod.node, []).append(pod)
        return self._by_node.get(node, [])

    def node(self, node: str, ids: Ids | None = None, unchanged: bool = False) -> Lowered:
        """The tables for the endpoints on `node`; `ids` from the previous lowering keeps ids
        stable. `unchanged`: the caller knows that nothing the node's previous lowering read has
        changed since (`stockade.control.lowering` decides it from what changed), so that
        lowering is the answer without comparing its inputs."""
        ids = ids if ids is not None else Ids()
        before = self.previous.get(node)
        if unchanged and before is not None and before[1].ids is ids:
            return before[1]
        pods = sorted(self._endpoints(node), key=lambda p: p.key)
        affecting = {
            (pod.key, d): [p for p in self.selecting(pod) if d in p.directions]
            for pod in pods
            for d in Direction
        }
        relevant = {id(p): p for ps in affecting.values() for p in ps}
        peers = _peers(relevant.values())
        port_names = _egress_port_names(relevant.values())
        # Everything the result depends on (verdicts reused are exact by their key): when it is
        # what the node's previous lowering saw, that lowering is the answer.
        inputs = (
            tuple((pod, *(tuple(affecting[(pod.key, d)]) for d in Direction)) for pod in pods),
            tuple(peers),
            self.addresses.region_inputs(node, peers, port_names),
        )
        if before is not None and before[1].ids is ids and before[0] == inputs:
            return before[1]
        last = before[1] if before is not None else None
        lowered = self._lower(node, ids, pods, affecting, peers, port_names, inputs[2], last)
        self.previous[node] = (inputs, lowered)
        return lowered

    def _lower(
        self,
        node: str,
        ids: Ids,
        pods: list[Pod],
        affecting: dict[tuple[str, Direction], list[Policy]],
        peers: list[Peer],
        port_names: frozenset[str],
        region_inputs: object,
        last: Lowered | None,
    ) -> Lowered:
        """`region_inputs`: what `build_regions` reads of the state for these peers
        (`Addresses.region_inputs`); `last`: the node's previous lowering, whose regions (and
        class entries, when their ids are the same) are reused when they were built from the
        same inputs."""
        groups = peer_groups(
            _rule_peers(affecting_policies(affecting)), {peer: i for i, peer in enumerate(peers)}
        )
        region_key = (tuple(peers), tuple(groups), port_names, region_inputs)
        class_entries: tuple[ir.ClassEntry, ...] | None = None
        memo = last.regions if last is not None else None
        if last is not None and memo is not None and memo.key == region_key:
            # The same regions as the node's last lowering: with the same class ids, the same
            # class entries
            class_ids = ids.classes.assign(memo.signatures)
            if dict(class_ids) == dict(last.ids.classes):
                class_entries = last.tables.classes
                representatives = dict(memo.representatives)
        if class_entries is None:
            regions = build_regions(self.addresses, node, peers, port_names, groups)
            signatures = tuple(sorted({r.signature for r in regions}))
            class_ids = ids.classes.assign(signatures)
            representatives = {}
            for region in regions:
                if region.representative is not None:
                    representatives.setdefault(region.signature, region.representative)
            class_entries = tuple(
                ir.ClassEntry(
                    r.network,
                    class_ids[r.signature],
                    ir.ClassFlag.LOCAL_NODE if r.signature[3] else 0,
                )
                for r in regions
            )
            memo = RegionMemo(region_key, signatures, tuple(representatives.items()))
        endpoint_ids = ids.endpoints.assign(p.key for p in pods)
        classes = sorted(representatives.items(), key=lambda kv: class_ids[kv[0]])
        peer_index = {peer: i for i, peer in enumerate(peers)}
        group_index = {group: i for i, group in enumerate(groups)}

        # (endpoint id, class id, template) per entry; rule ids are given in one pass below.
        entries: list[tuple[int, ir.Direction, int, Template]] = []
        # Pods with the same policies, named ports and address families get the same entries but
        # for the endpoint id (the replicas of a workload): lower each such profile once.
        profiles: dict[tuple[object, ...], list[tuple[int, Template]]] = {}
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
                    profiles[profile] = self._profile_entries(
                        pod, direction, chosen, classes, class_ids, peer_index, group_index
                    )
                endpoint_id, dir_ = endpoint_ids[pod.key], _DIRECTIONS[direction]
                entries += [(endpoint_id, dir_, cid, t) for cid, t in profiles[profile]]
        rule_refs = sorted(
            {
                ref
                for found in profiles.values()
                for _, (_, _, _, o) in found
                for ref in (o[1], o[3])
                if ref is not None
            },
            key=_ref_key,
        )
        rule_ids = ids.rules.assign(rule_refs)
        policy = tuple(
            ir.PolicyEntry(
                endpoint_id,
                dir_,
                prefixlen,
                cid,
                proto,
                port,
                o[0],
                rule_ids[o[1]] if o[1] is not None else ir.RULE_NONE,
                o[2],
                rule_ids[o[3]] if o[3] is not None else ir.RULE_NONE,
            )
            for endpoint_id, dir_, cid, (prefixlen, proto, port, o) in entries
        )
        tables = ir.NodeTables(
            endpoints=tuple(
                ir.EndpointEntry(ip, endpoint_ids[pod.key]) for pod in pods for ip in pod.ips
            ),
            classes=class_entries,
            policy=policy,
            rules={
                rule_ids[ref]: ir.RuleInfo(
                    ref.kind.value, ref.namespace, ref.name, _DIRECTIONS[ref.direction], ref.index
                )
                for ref in rule_refs
            },
        )
        return Lowered(tables, Ids(endpoint_ids, class_ids, rule_ids), memo)

    def _profile_entries(
        self,
        pod: Pod,
        direction: Direction,
        chosen: list[Policy],
        classes: list[tuple[Signature, IPAddress]],
        class_ids: IdTable[Signature],
        peer_index: dict[Peer, int],
        group_index: dict[frozenset[int], int],
    ) -> list[tuple[int, Template]]:
        """The (class id, entry template) pairs of `pod`'s profile, through the verdicts kept
        across nodes and passes."""
        profile: ProfileKey = (
            direction,
            tuple(id(p) for p in chosen),
            tuple(sorted(pod.named_ports.items())),
        )
        seen = [group_index[g] for g in peer_groups(_rule_peers(chosen), peer_index)]
        out: list[tuple[int, Template]] = []
        for signature, remote in classes:
            local = next((ip for ip in pod.ips if ip.version == remote.version), None)
            if local is None:
                continue
            members = set(signature[1])
            remote_pod = self.state.pod_at(remote) if direction is Direction.EGRESS else None
            key: RemoteKey = (
                remote.version,
                tuple(i in members for i in seen),
                tuple(sorted(remote_pod.named_ports.items())) if remote_pod is not None else (),
                signature[3],
            )
            templates = self.verdicts.get((profile, key))
            if templates is None:
                templates = _templates(self.state, pod, local, remote, direction, chosen)
                self.verdicts.put((profile, key), chosen, templates)
            cid = class_ids[signature]
            out += [(cid, t) for t in templates]
        return out


def lower_node(
    state: ClusterState, policies: Sequence[Policy], node: str, ids: Ids | None = None
) -> Lowered:
    """The tables for the endpoints on `node` (one node of a `Lowering`)."""
    return Lowering(state, policies).node(node, ids)


def _ref_key(ref: RuleRef) -> tuple[str, str, str, str, int]:
    return (ref.kind.value, ref.namespace, ref.name, ref.direction.value, ref.index)


def _templates(
    state: ClusterState,
    pod: Pod,
    local: IPAddress,
    remote: IPAddress,
    direction: Direction,
    policies: list[Policy],
) -> tuple[Template, ...]:
    """The entries of one endpoint for one remote class, decided by the evaluator's `judge`."""
    out: list[Template] = []
    dst_pod = pod if direction is Direction.INGRESS else state.pod_at(remote)
    policies = _for_remote(state, policies, direction, remote)
    # Protocols without ports (and any protocol stockade does not parse): class-wide entry.
    base_flow = _flow(local, remote, direction, Protocol.TCP, 0)
    # from_node=False: the node's own traffic is exempted by the class flag (LOCAL_NODE) in the
    # datapath, which still judges what the node forwards from its addresses by these entries.
    base = _outcome(judge(state, _other_protocols(policies), base_flow, direction, False))
    out.append((abi.PREFIX_CLASS, 0, 0, base))
    for proto in protocols_for(remote.version):
        pieces = _boundaries(policies, direction, proto, dst_pod)
        outcomes = [
            (
                piece,
                _outcome(
                    judge(
                        state,
                        judged,
                        _flow(local, remote, direction, proto, piece[0]),
                        direction,
                        False,
                    )
                ),
            )
            for piece, judged in _by_piece(policies, direction, proto, dst_pod, pieces)
        ]
        outcomes = _runs(outcomes)
        widths = Counter[Outcome]()
        for (a, b), o in outcomes:
            widths[o] += b - a + 1
        common = widths.most_common(1)[0][0]
        if common != base:
            out.append((abi.PREFIX_PROTO, proto.number, 0, common))
        for (a, b), o in outcomes:
            if o == common:
                continue
            for value, bits in _prefixes(a, b):
                out.append((abi.PREFIX_PROTO + bits, proto.number, value, o))
    return tuple(out)
