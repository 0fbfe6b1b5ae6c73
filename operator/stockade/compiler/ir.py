"""The datapath IR: what the compiled tc programs see, as plain data, and its encoding as map bytes
in the layouts of `stockade.compiler.abi`.

The lowering (`stockade.compiler.lower`) turns policies and cluster state into a `NodeTables`
value per node; the agent writes it into the pinned BPF maps through `stockade.datapath`; the C in
`bpf/` reads the same layout. `lookup()` below is the executable specification of what the
programs do with a new flow: the differential tests compare the reference evaluator with it, and
it with the kernel.

Per-packet work is independent of the number of rules (DESIGN.md §3 "render per shape"):

1. `endpoints` (hash): the pod address on the pod's side of the hook → endpoint id.
2. `peer_classes` (LPM trie over IPv6 / IPv4-mapped addresses): the remote address → the
   equivalence class of its peer-set membership, plus flags (the local node).
3. `policy` (LPM trie): (endpoint, direction, class, protocol, port prefix) → the final verdict
   after tier evaluation, with the deciding rule id and what Audit-mode policies would decide.
   Port ranges become port prefixes; ICMP type and code are the "port" (type << 8 | code).
   No entry for (endpoint, direction) at all means no policy applies: allowed.

A trie lookup's cost grows with the trie's entries, a hash lookup's does not, so the agent's
writer (`stockade.datapath.layout`) puts the entries most packets need into hashes in front of
the tries: host classes (/128) into `peer_hosts`, and the exact policy levels (/96: one port;
/64: a whole class) into `policy_exact`. The answers stay those of the longest-prefix match over
each table, and `lookup()` below follows the programs' order of lookups.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from stockade.compiler import abi
from stockade.model import evaluator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The vocabulary of the map entries is the ABI's (`stockade.compiler.abi`, mirroring bpf/maps.h).
Direction = abi.Direction
Action = abi.Action
ClassFlag = abi.ClassFlag

# IANA protocol numbers; the datapath matches on the number.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

# ICMPv6 control that stays allowed whatever the policies: the evaluator's own list.
ICMPV6_CONTROL_TYPES = evaluator.ICMPV6_CONTROL_TYPES
# Redirects by protocol number, from the evaluator's list.
REDIRECT_TYPES = {p.number: t for p, t in evaluator.REDIRECT_TYPES.items()}

# Rule id 0 means "no rule decided" (the default allow).
RULE_NONE = 0


def to_v6(address: IPAddress) -> ipaddress.IPv6Address:
    """IPv4 addresses live in the tries as IPv4-mapped IPv6 (::ffff:a.b.c.d)."""
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address


def net_to_v6(network: IPNetwork) -> ipaddress.IPv6Network:
    if isinstance(network, ipaddress.IPv4Network):
        base = to_v6(network.network_address)
        return ipaddress.IPv6Network((base, network.prefixlen + 96))
    return network


@dataclass(frozen=True, order=True)
class EndpointEntry:
    address: IPAddress
    endpoint_id: int

    def key(self) -> bytes:
        return to_v6(self.address).packed

    def value(self) -> bytes:
        return abi.ENDPOINT_VALUE.pack(self.endpoint_id, 0)


@dataclass(frozen=True, order=True)
class ClassEntry:
    network: IPNetwork
    class_id: int
    flags: int = 0

    def key(self) -> bytes:
        net = net_to_v6(self.network)
        return abi.CLASS_KEY.pack(net.prefixlen, net.network_address.packed)

    def value(self) -> bytes:
        return abi.CLASS_VALUE.pack(self.class_id, self.flags)


@dataclass(frozen=True, order=True)
class PolicyEntry:
    """One LPM entry. `prefixlen` counts bits of (endpoint<<1|dir, class, proto, port)."""

    endpoint_id: int
    direction: Direction
    prefixlen: int
    class_id: int = 0
    protocol: int = 0
    port: int = 0
    action: Action = Action.ALLOW
    rule_id: int = RULE_NONE
    audit_action: Action = Action.NONE
    audit_rule_id: int = RULE_NONE

    def __post_init__(self) -> None:
        if not abi.PREFIX_ENDPOINT <= self.prefixlen <= abi.POLICY_KEY_BITS:
            raise ValueError(f"policy entry prefixlen {self.prefixlen} out of range")
        if self.endpoint_id >= 1 << 31:
            raise ValueError(f"endpoint id {self.endpoint_id} does not fit 31 bits")

    def key(self) -> bytes:
        return policy_key(
            self.endpoint_id,
            self.direction,
            self.class_id,
            self.protocol,
            self.port,
            self.prefixlen,
        )

    def value(self) -> bytes:
        return abi.POLICY_VALUE.pack(
            self.rule_id, self.audit_rule_id, int(self.action), int(self.audit_action), 0
        )

    def covers(self, key_bits: int) -> bool:
        """True when this entry's prefix matches a full 96-bit key."""
        shift = abi.POLICY_KEY_BITS - self.prefixlen
        return key_bits >> shift == _key_bits(self) >> shift


def policy_key(
    endpoint_id: int,
    direction: Direction,
    class_id: int,
    protocol: int,
    port: int,
    prefixlen: int = abi.POLICY_KEY_BITS,
) -> bytes:
    """Encode a policy key; bits past `prefixlen` are zeroed as the LPM trie expects."""
    bits = ((endpoint_id << 1 | int(direction)) << 64) | (class_id << 32) | (protocol << 16) | port
    bits &= ((1 << prefixlen) - 1) << (abi.POLICY_KEY_BITS - prefixlen)
    raw = bits.to_bytes(abi.POLICY_KEY_BITS // 8, "big")
    return abi.POLICY_KEY.pack(prefixlen, raw[0:4], raw[4:8], raw[8:10], raw[10:12])


def _key_bits(entry: PolicyEntry) -> int:
    return int.from_bytes(entry.key()[abi.LPM_PREFIXLEN :], "big")


def icmp_port(icmp_type: int, icmp_code: int) -> int:
    """ICMP and ICMPv6 type and code take the place of the destination port."""
    return (icmp_type & 0xFF) << 8 | (icmp_code & 0xFF)


@dataclass(frozen=True)
class RuleInfo:
    """What a rule id stands for: enough for counters, drop events and `explain`."""

    kind: str
    namespace: str
    name: str
    direction: Direction
    index: int  # -1 for the isolation default of a policy


@dataclass(frozen=True)
class ServiceEntry:
    """A prefix of Service address space (bpf/service.h: a new flow from a pod to it is judged
    on its backend, after DNAT) and the destination ports that count: all when both are 0,
    else port_min..port_max (a node address with the NodePort range)."""

    network: IPNetwork
    port_min: int = 0
    port_max: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.port_min <= 65535 and 0 <= self.port_max <= 65535):
            raise ValueError(f"service entry {self.network}: ports outside 0..65535")
        if self.port_min > self.port_max:
            raise ValueError(f"service entry {self.network}: port_min above port_max")

    def key(self) -> bytes:
        net = net_to_v6(self.network)
        return abi.CLASS_KEY.pack(net.prefixlen, net.network_address.packed)

    def value(self) -> bytes:
        return abi.SVC_SPACE_VALUE.pack(self.port_min, self.port_max, 0)


@dataclass(frozen=True)
class ServiceBackends:
    """One Service address, protocol and port, and its ready backends (address, target port),
    from EndpointSlices: the fallback mode's input (`stockade.compiler.fallback`)."""

    address: IPAddress
    protocol: int
    port: int
    backends: tuple[tuple[IPAddress, int], ...] = ()  # sorted, no duplicates


@dataclass(frozen=True)
class ServiceVerdictEntry:
    """The fallback mode's verdict for one client endpoint's new flow to a Service address,
    protocol and port (bpf/service.h, `svc_verdict`): ALLOW only when the client's egress
    allows every ready backend on its target port. `rule_id` is the deciding rule of the first
    backend that decided (the first denied one on DENY); `no_backends`: DENY because the
    Service has no ready backend (rule RULE_NONE)."""

    endpoint_id: int
    address: IPAddress
    protocol: int
    port: int
    action: Action
    rule_id: int = 0
    no_backends: bool = False

    def key(self) -> bytes:
        return abi.SVC_VERDICT_KEY.pack(
            self.endpoint_id, self.protocol, self.port, to_v6(self.address).packed
        )

    def value(self) -> bytes:
        flags = abi.SVC_VERDICT_NO_BACKENDS if self.no_backends else 0
        return abi.SVC_VERDICT_VALUE.pack(self.rule_id, self.action, flags)


@dataclass(frozen=True)
class NodeTables:
    """Everything one node's programs need, as map contents."""

    endpoints: tuple[EndpointEntry, ...] = ()
    classes: tuple[ClassEntry, ...] = ()
    policy: tuple[PolicyEntry, ...] = ()
    rules: Mapping[int, RuleInfo] = field(default_factory=dict)
    services: tuple[ServiceEntry, ...] = ()  # Service address space (Shape.services)
    # The fallback mode's verdicts for flows to Service addresses (Shape.services)
    service_verdicts: tuple[ServiceVerdictEntry, ...] = ()


@dataclass(frozen=True)
class Packet:
    """The fields of a connection's first packet that policy looks at."""

    src: IPAddress
    dst: IPAddress
    protocol: int
    port: int  # destination port, or icmp_port(type, code)
    # The IPv6 hop limit; None: what an on-link sender gives ICMPv6 link control of this type
    # (evaluator.on_link_hop_limit), 64 for everything else.
    hop_limit: int | None = None
    # Arrived at the node on an interface (forwarded), rather than sent by the node's own stack:
    # only the latter skips ingress policy from a node address (ClassFlag.LOCAL_NODE).
    forwarded: bool = False

    @property
    def effective_hop_limit(self) -> int:
        if self.hop_limit is not None:
            return self.hop_limit
        if self.protocol == PROTO_ICMPV6 and self.port >> 8 in ICMPV6_CONTROL_TYPES:
            return evaluator.on_link_hop_limit(self.port >> 8)
        return 64


@dataclass(frozen=True)
class Verdict:
    action: Action
    rule_id: int
    audit_action: Action = Action.NONE
    audit_rule_id: int = RULE_NONE


ALLOW_BY_DEFAULT = Verdict(Action.ALLOW, RULE_NONE)


def _lpm(entries: Iterable[PolicyEntry], key_bits: int) -> PolicyEntry | None:
    best: PolicyEntry | None = None
    for entry in entries:
        if entry.covers(key_bits) and (best is None or entry.prefixlen > best.prefixlen):
            best = entry
    return best


def policy_lookup(entries: Sequence[PolicyEntry], key_bits: int) -> PolicyEntry | None:
    """The policy entry for a full key, in the programs' order (bpf/policy.h):

    1. the /96 entry of the key (policy_exact);
    2. the /64 entry of its endpoint, direction and class (policy_exact), unless an entry
       longer than /64 and shorter than /96 lies beneath it (then it is flagged: the trie
       decides);
    3. the longest prefix among the other entries (the policy trie).
    This is the longest-prefix match over all entries, in three steps.
    """
    for level in abi.POLICY_EXACT_LEVELS:
        hit = next((e for e in entries if e.prefixlen == level and e.covers(key_bits)), None)
        if hit is None:
            continue
        if level == abi.POLICY_KEY_BITS or not any(
            level < e.prefixlen < abi.POLICY_KEY_BITS and hit.covers(_key_bits(e)) for e in entries
        ):
            return hit
        break
    return _lpm((e for e in entries if e.prefixlen != abi.POLICY_KEY_BITS), key_bits)


def classify(tables: NodeTables, address: IPAddress) -> ClassEntry | None:
    """The class of `address`: its host entry (`peer_hosts`), else the longest class prefix
    that contains it (the `peer_classes` trie)."""
    addr = to_v6(address)
    best: ClassEntry | None = None
    best_len = -1
    for entry in tables.classes:
        net = net_to_v6(entry.network)  # lengths compare in the trie's IPv6 space: 0.0.0.0/0
        if net.prefixlen == abi.CLASS_KEY_BITS and net.network_address == addr:
            return entry
        if addr in net and net.prefixlen > best_len:  # is ::ffff:0:0/96, longer than ::/0
            best, best_len = entry, net.prefixlen
    return best


def lookup(
    tables: NodeTables,
    packet: Packet,
    direction: Direction,
    pending: abi.PendingState | None = None,
) -> Verdict:
    """What one hook decides for a connection's first packet (the spec of `bpf/policy.h`).

    `direction` INGRESS: the hook in front of the destination pod; EGRESS: the hook in front of
    the source pod, sent through that pod's interface. An ICMP or ICMPv6 redirect sent by a pod
    (EGRESS) is dropped first, whatever the addresses (`bpf/hook.h`, reason NOT_A_ROUTER; rule
    RULE_NONE). ICMPv6 neighbour discovery and MLD (ICMPV6_CONTROL_TYPES) are never judged by
    policy: valid on-link (`evaluator.link_control`) they pass, else they drop (reason
    NOT_A_ROUTER or NOT_ON_LINK; rule RULE_NONE); a pod's from a source that is neither its own
    nor link-local nor unspecified drops as SPOOFED. A packet leaving a pod whose source is no
    endpoint's address is dropped (reason SPOOFED; rule RULE_NONE): a pod's interface is bound
    to its endpoint, so such a source is never the pod's own. Toward a pod (INGRESS), a
    destination that is no endpoint of this node passes unjudged.

    `pending`: the hook's interface is in the `pending` map (attached before the pod's tables
    were applied). OPEN passes everything else; CLOSED passes only a packet whose remote
    address's class carries LOCAL_NODE, from the pod (EGRESS) or sent by the node's own stack
    (INGRESS, not `forwarded`), and drops the rest (reason PENDING,
    rule RULE_NONE), whatever the policy entries say; from the pod (EGRESS), a source that is an
    endpoint's address drops first (reason SPOOFED): a pending pod has no endpoint yet.
    """
    if direction is Direction.EGRESS and packet.port >> 8 == REDIRECT_TYPES.get(packet.protocol):
        return Verdict(Action.DENY, RULE_NONE)
    if packet.protocol == PROTO_ICMPV6 and packet.port >> 8 in ICMPV6_CONTROL_TYPES:
        check = evaluator.link_control(
            packet.port >> 8,
            packet.src,
            packet.effective_hop_limit,
            direction is Direction.EGRESS,
        )
        if check is not evaluator.LinkControl.OK:
            return Verdict(Action.DENY, RULE_NONE)
        src = packet.src
        if (
            direction is Direction.EGRESS
            and not (src.is_link_local or src.is_unspecified)
            and not any(to_v6(e.address) == to_v6(src) for e in tables.endpoints)
        ):
            return Verdict(Action.DENY, RULE_NONE)  # spoofed: no endpoint has that address
        return ALLOW_BY_DEFAULT
    local, remote = (
        (packet.dst, packet.src) if direction is Direction.INGRESS else (packet.src, packet.dst)
    )
    if pending is abi.PendingState.OPEN:
        return ALLOW_BY_DEFAULT
    if pending is abi.PendingState.CLOSED:
        if direction is Direction.EGRESS and any(
            to_v6(e.address) == to_v6(local) for e in tables.endpoints
        ):
            return Verdict(Action.DENY, RULE_NONE)  # SPOOFED: no endpoint is the pending pod's
        node = classify(tables, remote)
        if (
            node is not None
            and node.flags & ClassFlag.LOCAL_NODE
            and (direction is Direction.EGRESS or not packet.forwarded)
        ):
            return ALLOW_BY_DEFAULT
        return Verdict(Action.DENY, RULE_NONE)
    endpoint = next((e for e in tables.endpoints if to_v6(e.address) == to_v6(local)), None)
    if endpoint is None:
        return (
            ALLOW_BY_DEFAULT if direction is Direction.INGRESS else Verdict(Action.DENY, RULE_NONE)
        )
    cls = classify(tables, remote)
    class_id, flags = (cls.class_id, cls.flags) if cls else (0, 0)
    if direction is Direction.INGRESS and flags & ClassFlag.LOCAL_NODE and not packet.forwarded:
        return ALLOW_BY_DEFAULT
    key = int.from_bytes(
        policy_key(endpoint.endpoint_id, direction, class_id, packet.protocol, packet.port)[
            abi.LPM_PREFIXLEN :
        ],
        "big",
    )
    entry = policy_lookup(tables.policy, key)
    if entry is None:
        return ALLOW_BY_DEFAULT
    return Verdict(entry.action, entry.rule_id, entry.audit_action, entry.audit_rule_id)
