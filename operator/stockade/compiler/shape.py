"""The Shape: the only input of the C templates in `bpf/`.

A Shape names the structure of a node's tc programs (feature switches and map sizes), never
policy content: peer sets, rules and ports are map data (`ir.NodeTables`). The same Shape renders
byte-identical C, so the agent's compile cache hits and pod churn never recompiles. The lowering
picks a Shape per node; `stockade.compiler.render` turns it into C.

Only integers, booleans and IntEnums live here; `defines()` is exactly what reaches the C.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from enum import IntEnum

# What DESIGN.md §7 asks the maps to hold at least.
MIN_POLICY_ENTRIES = 10_000 * 2  # 10k rules per endpoint and direction
MIN_CLASS_ENTRIES = 1_000_000  # 1M peer-set entries
PAGE_SIZE = 4096


class FragmentPolicy(IntEnum):
    """What happens to non-first IP fragments (they carry no ports to judge; bpf/hook.h)."""

    PASS = 1  # passed unjudged: only the first fragment, with the ports, is judged
    DROP = 0  # dropped: no fragmented datagram arrives
    TRACK = 2  # they follow the verdict on their datagram's first fragment; orphans drop


# The largest map each Shape field may ask for. A Shape arrives at the agent from the API
# server, so it must not be able to demand more kernel memory than a node can give: the
# preallocated maps (endpoints; conntrack, an LRU hash; the per-CPU rule counters) and the
# bucket arrays of the hashes in front of the tries cost their size up front, the tries and
# the ring buffer as they fill. Each limit is far above what the operator's sizing asks for.
SIZE_LIMITS = {
    "endpoints_max": 1 << 20,
    "classes_max": 1 << 26,
    "policy_max": 1 << 27,
    "hosts_max": 1 << 23,
    "policy_exact_max": 1 << 23,
    "conntrack_max": 1 << 22,
    "fragments_max": 1 << 20,
    "rules_max": 1 << 20,
    "events_bytes": 1 << 28,
    "service_prefixes_max": 1 << 20,
    "service_verdicts_max": 1 << 24,
}


@dataclass(frozen=True)
class Shape:
    """Feature switches and map sizes of one node's programs."""

    ipv6: bool = True  # off: IPv6 frames are dropped unjudged (bpf/parse.h)
    vlan: bool = False  # parse up to two VLAN tags; off: a tagged frame is dropped unjudged
    conntrack: bool = True
    drop_events: bool = True
    audit_events: bool = True
    fragments: FragmentPolicy = FragmentPolicy.TRACK
    ipv6_ext_headers: int = 4  # extension headers walked before the transport header
    endpoints_max: int = 65_536
    classes_max: int = 1 << 21  # LPM trie without preallocation: a large bound costs nothing
    policy_max: int = 1 << 24  # likewise
    # Hashes in front of the tries (host classes; /96 and /64 policy entries). Their bucket
    # arrays are allocated up front (16 bytes a slot); entries past the bound stay in the trie.
    hosts_max: int = 1 << 21
    policy_exact_max: int = 1 << 20
    conntrack_max: int = 1 << 17  # LRU hash: preallocated, sized for the node's flows
    # LRU hash of fragmented datagrams in flight (fragments: TRACK), preallocated (64 bytes
    # an entry with its overhead); an entry lives 30 s.
    fragments_max: int = 1 << 13
    rules_max: int = 1 << 16  # per-CPU counters indexed by rule id
    events_bytes: int = 1 << 20  # ring buffer of drop and audit events
    # Conntrack entries one endpoint may hold (bpf/conntrack.h); 0: no budget. An endpoint at
    # its budget opens no new flow, so one pod cannot make the LRU evict the others' entries.
    conntrack_per_endpoint: int = 1 << 14
    # Service traffic judged on the backend by a netfilter program (bpf/service.h); needs
    # conntrack. Off: a flow to a Service address is judged at the veth on that address.
    services: bool = False
    service_prefixes_max: int = 1 << 14  # trie of the Service address space
    # The fallback of kernels without BPF netfilter programs (bpf/service.h): a new flow to a
    # Service address is judged at the veth by the operator's verdict over its ready backends
    # (`svc_verdict`). The agent turns it on in fallback mode in place of `services` (with both
    # on, a flow that `services` defers is not looked up).
    service_fallback: bool = False
    service_verdicts_max: int = 1 << 18  # (client, Service address, protocol, port) verdicts

    def __post_init__(self) -> None:
        errors: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    errors.append(f"shape.{f.name}: expected a bool, got {type(value).__name__}")
            elif f.name == "fragments":
                if not isinstance(value, FragmentPolicy):
                    errors.append(f"shape.fragments: expected a FragmentPolicy, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool):
                errors.append(f"shape.{f.name}: expected an int, got {type(value).__name__}")
            elif f.name in SIZE_LIMITS and not 1 <= value <= SIZE_LIMITS[f.name]:
                errors.append(f"shape.{f.name}: {value} is outside 1..{SIZE_LIMITS[f.name]}")
        if errors:
            raise ValueError("; ".join(errors))
        if not 0 <= self.conntrack_per_endpoint <= SIZE_LIMITS["conntrack_max"]:
            errors.append(
                f"shape.conntrack_per_endpoint: {self.conntrack_per_endpoint} is outside "
                f"0..{SIZE_LIMITS['conntrack_max']}"
            )
        if not 0 <= self.ipv6_ext_headers <= 8:
            errors.append(f"shape.ipv6_ext_headers: {self.ipv6_ext_headers} is outside 0..8")
        if self.policy_max < MIN_POLICY_ENTRIES:
            errors.append(f"shape.policy_max: {self.policy_max} < {MIN_POLICY_ENTRIES}")
        if self.classes_max < MIN_CLASS_ENTRIES:
            errors.append(f"shape.classes_max: {self.classes_max} < {MIN_CLASS_ENTRIES}")
        eb = self.events_bytes
        if eb < PAGE_SIZE or eb & (eb - 1):
            errors.append(f"shape.events_bytes: {eb} is not a power of two >= {PAGE_SIZE}")
        if self.services and not self.conntrack:
            errors.append("shape.services: needs shape.conntrack")
        if errors:
            raise ValueError("; ".join(errors))

    def defines(self) -> tuple[tuple[str, int], ...]:
        """The C preprocessor definitions the templates receive, sorted, ints only."""
        values = {
            "STOCKADE_IPV6": int(self.ipv6),
            "STOCKADE_VLAN": int(self.vlan),
            "STOCKADE_CONNTRACK": int(self.conntrack),
            "STOCKADE_DROP_EVENTS": int(self.drop_events),
            "STOCKADE_AUDIT_EVENTS": int(self.audit_events),
            "STOCKADE_FRAGMENTS_PASS": int(self.fragments is FragmentPolicy.PASS),
            "STOCKADE_FRAGMENTS_TRACK": int(self.fragments is FragmentPolicy.TRACK),
            "STOCKADE_FRAGMENTS_MAX": int(self.fragments_max),
            "STOCKADE_IPV6_EXT_MAX": int(self.ipv6_ext_headers),
            "STOCKADE_ENDPOINTS_MAX": int(self.endpoints_max),
            "STOCKADE_CLASSES_MAX": int(self.classes_max),
            "STOCKADE_POLICY_MAX": int(self.policy_max),
            "STOCKADE_HOSTS_MAX": int(self.hosts_max),
            "STOCKADE_POLICY_EXACT_MAX": int(self.policy_exact_max),
            "STOCKADE_CONNTRACK_MAX": int(self.conntrack_max),
            "STOCKADE_CONNTRACK_PER_ENDPOINT": int(self.conntrack_per_endpoint),
            "STOCKADE_RULES_MAX": int(self.rules_max),
            "STOCKADE_EVENTS_BYTES": int(self.events_bytes),
            "STOCKADE_SERVICES": int(self.services),
            "STOCKADE_SERVICE_PREFIXES_MAX": int(self.service_prefixes_max),
            "STOCKADE_SERVICE_FALLBACK": int(self.service_fallback),
            "STOCKADE_SERVICE_VERDICTS_MAX": int(self.service_verdicts_max),
        }
        return tuple(sorted(values.items()))

    def canonical(self) -> str:
        """A stable text form (sorted JSON of the definitions), the digest's Shape input."""
        return json.dumps(dict(self.defines()), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()
