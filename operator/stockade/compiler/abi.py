"""The ABI the Python side shares with the BPF programs, stated once: every map's key and value
layout, the event record, and the constants they carry.

`bpf/maps.h` (with `struct event` and `enum drop_reason` and `enum event_kind` in
`bpf/events.h`, `enum ct_mode` in `bpf/conntrack.h`) is the original; this module mirrors it.
`tests/compile/test_abi.py` compiles the real programs and checks every struct's size and field
offsets, every map's type, key, value, size (the Shape field that gives it) and flags, and every
constant here against the object's BTF and clang's macro definitions, so the two cannot drift.
Everything on the Python side that reads or writes map bytes derives from here: the IR's entries
(`stockade.compiler.ir`), the split over hashes and tries (`stockade.datapath.layout`), the
config and conntrack maps (`stockade.datapath.maps`), and the events and counters
(`stockade.datapath.events`).

Byte order: the programs run in the host's byte order, so every layout is native (`=`) with the
C padding spelled out. Key fields the programs compare big-endian (`__be16`, `__be32`: the policy
key, so that LPM prefixes run from the most significant bit, and the ports of a tuple) are raw
bytes here (`2s`, `4s`); their encoders convert.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Layout:
    """One C struct: its name and its fields in declaration order, each with a `struct` format
    (padding fields use `x`, so packing skips them). Packs and unpacks like a `struct.Struct`."""

    def __init__(self, c_name: str, *fields: tuple[str, str]) -> None:
        self.c_name = c_name
        self.fields = fields
        self._struct = struct.Struct("=" + "".join(fmt for _, fmt in fields))
        self.size = self._struct.size
        self._members: dict[str, tuple[int, struct.Struct]] = {}
        offset = 0
        for name, fmt in fields:
            member = struct.Struct("=" + fmt)
            self._members[name] = (offset, member)
            offset += member.size

    def _member(self, name: str) -> tuple[int, struct.Struct]:
        try:
            return self._members[name]
        except KeyError:
            raise KeyError(f"struct {self.c_name} has no field {name!r}") from None

    def offset(self, name: str) -> int:
        """The byte offset of field `name`."""
        return self._member(name)[0]

    def get(self, raw: bytes, name: str) -> Any:
        """Field `name` of the packed bytes `raw`."""
        offset, member = self._member(name)
        return member.unpack_from(raw, offset)[0]

    def replace(self, raw: bytes, name: str, value: Any) -> bytes:
        """`raw` with field `name` set to `value`."""
        offset, member = self._member(name)
        return raw[:offset] + member.pack(value) + raw[offset + member.size :]

    def pack(self, *values: Any) -> bytes:
        return self._struct.pack(*values)

    def unpack(self, raw: bytes) -> tuple[Any, ...]:
        return self._struct.unpack(raw)

    def unpack_from(self, raw: bytes, offset: int = 0) -> tuple[Any, ...]:
        return self._struct.unpack_from(raw, offset)

    def __repr__(self) -> str:
        return f"Layout(struct {self.c_name}, {self.size} bytes)"


# --- keys and values (bpf/maps.h) ---------------------------------------------------------------

U32 = Layout("__u32", ("", "I"))  # the key of the array maps (counters, config)
U64 = Layout("__u64", ("", "Q"))  # the value of events_lost, per CPU
S64 = Layout("__s64", ("", "q"))  # the value of ct_owned
ENDPOINT_KEY = Layout("endpoint_key", ("addr", "16s"))  # also the key of peer_hosts
ENDPOINT_VALUE = Layout("endpoint_value", ("id", "I"), ("flags", "I"))
# LPM trie keys start with the prefix length in host order (struct bpf_lpm_trie_key); the
# prefix covers the bytes after it.
CLASS_KEY = Layout("class_key", ("prefixlen", "I"), ("addr", "16s"))
CLASS_VALUE = Layout("class_value", ("class_id", "I"), ("flags", "I"))
POLICY_KEY = Layout(
    "policy_key",
    ("prefixlen", "I"),
    ("endpoint_dir", "4s"),  # be32 endpoint << 1 | direction
    ("class_id", "4s"),  # be32
    ("proto", "2s"),  # be16
    ("port", "2s"),  # be16; ICMP type << 8 | code
)
POLICY_VALUE = Layout(
    "policy_value",
    ("rule_id", "I"),
    ("audit_rule_id", "I"),
    ("action", "B"),
    ("audit_action", "B"),
    ("flags", "H"),
)
RULE_COUNTER = Layout("rule_counter", ("packets", "Q"), ("bytes", "Q"))
CONFIG = Layout(
    "config",
    ("epoch", "I"),
    ("ct_mode", "I"),
    ("tcp_timeout_ns", "Q"),
    ("tcp_closing_timeout_ns", "Q"),
    ("udp_timeout_ns", "Q"),
    ("icmp_timeout_ns", "Q"),
    ("other_timeout_ns", "Q"),
    ("tick_ns", "Q"),
    ("clock_base_ns", "Q"),
)
CT_KEY = Layout(
    "ct_key",
    ("saddr", "16s"),
    ("daddr", "16s"),
    ("sport", "2s"),  # be16
    ("dport", "2s"),  # be16
    ("proto", "B"),
    ("dir", "B"),
    ("pad", "H"),
)
CT_FLOW = Layout(  # one slot of a conntrack entry; expires_ns 0: empty
    "ct_flow",
    ("expires_ns", "Q"),
    ("epoch", "I"),
    ("rule_id", "I"),
    ("port", "H"),
    ("closing", "B"),
    ("tcp", "B"),  # CT_TCP_* flags
    ("owner", "I"),  # the endpoint whose budget holds the entry
)
CT_SLOTS = 2  # a conntrack entry's flows: the key's order, its reverse (bpf/maps.h)
CT_ENTRY = Layout("ct_entry", ("flow", f"{CT_FLOW.size * CT_SLOTS}s"))
FRAG_KEY = Layout(
    "frag_key",
    ("saddr", "16s"),
    ("daddr", "16s"),
    ("id", "I"),
    ("proto", "B"),
    ("dir", "B"),
    ("pad", "H"),
)
FRAG_ENTRY = Layout(
    "frag_entry",
    ("expires_ns", "Q"),
    ("rule_id", "I"),
    ("action", "B"),
    ("pad", "3x"),
)
# Service traffic (bpf/service.h).
SVC_SPACE_VALUE = Layout("svc_space_value", ("port_min", "H"), ("port_max", "H"), ("flags", "I"))
SVC_DEFER_KEY = Layout(
    "svc_defer_key", ("saddr", "16s"), ("sport", "2s"), ("proto", "B"), ("pad", "x")
)
SVC_DEFER_VALUE = Layout(
    "svc_defer_value",
    ("expires_ns", "Q"),
    ("daddr", "16s"),
    ("dport", "2s"),  # be16
    ("pad", "2x"),
    ("endpoint_id", "I"),
)
SVC_FLOW_VALUE = Layout(
    "svc_flow_value", ("peer", "16s"), ("port", "H"), ("pad", "2x"), ("endpoint_id", "I")
)
SVC_MASQ_VALUE = Layout(
    "svc_masq_value",
    ("expires_ns", "Q"),
    ("baddr", "16s"),
    ("bport", "2s"),  # be16
    ("port", "H"),
    ("rule_id", "I"),
    ("endpoint_id", "I"),
    ("pad", "4x"),
)
SVC_VERDICT_KEY = Layout(
    "svc_verdict_key",
    ("endpoint_id", "I"),
    ("proto", "B"),
    ("pad", "x"),
    ("port", "H"),
    ("addr", "16s"),
)
SVC_VERDICT_VALUE = Layout(
    "svc_verdict_value", ("rule_id", "I"), ("action", "B"), ("flags", "B"), ("pad", "2x")
)
SVC_VERDICT_NO_BACKENDS = 1
# The ring buffer's record (bpf/events.h).
EVENT = Layout(
    "event",
    ("timestamp_ns", "Q"),
    ("rule_id", "I"),
    ("endpoint_id", "I"),
    ("ifindex", "I"),
    ("kind", "B"),
    ("direction", "B"),
    ("proto", "B"),
    ("reason", "B"),
    ("sport", "2s"),  # be16
    ("dport", "2s"),  # be16
    ("port", "H"),
    ("pad", "H"),
    ("saddr", "16s"),
    ("daddr", "16s"),
)
STRUCTS = (
    ENDPOINT_KEY,
    ENDPOINT_VALUE,
    CLASS_KEY,
    CLASS_VALUE,
    POLICY_KEY,
    POLICY_VALUE,
    RULE_COUNTER,
    CONFIG,
    CT_KEY,
    CT_FLOW,
    CT_ENTRY,
    FRAG_KEY,
    FRAG_ENTRY,
    EVENT,
)

CONFIG_KEY = U32.pack(0)  # the config map's only entry

# --- the maps -----------------------------------------------------------------------------------


class MapType(IntEnum):
    """`enum bpf_map_type` values of the maps stockade declares."""

    HASH = 1
    ARRAY = 2
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11
    RINGBUF = 27


NO_PREALLOC = 1  # BPF_F_NO_PREALLOC


@dataclass(frozen=True)
class MapSpec:
    """One map of bpf/maps.h, pinned under its name."""

    name: str
    type: MapType
    key: Layout | None  # None for the ring buffer
    value: Layout | None
    size: str | int | None  # the Shape field that gives max_entries, or a fixed count; None: 1
    flags: int = 0

    def entries(self, shape: object) -> int:
        """max_entries for the programs of `shape` (a compiler.shape.Shape)."""
        if isinstance(self.size, str):
            return int(getattr(shape, self.size))
        return 1 if self.size is None else self.size


HINT_SLOTS = 4096  # bpf/maps.h: the `pending_hint` array's slots (ifindex % slots)


MAPS = {
    spec.name: spec
    for spec in (
        MapSpec("endpoints", MapType.HASH, ENDPOINT_KEY, ENDPOINT_VALUE, "endpoints_max"),
        MapSpec("bindings", MapType.HASH, U32, U32, "endpoints_max"),
        MapSpec(
            "peer_classes", MapType.LPM_TRIE, CLASS_KEY, CLASS_VALUE, "classes_max", NO_PREALLOC
        ),
        MapSpec("peer_hosts", MapType.HASH, ENDPOINT_KEY, CLASS_VALUE, "hosts_max", NO_PREALLOC),
        MapSpec(
            "policy_exact", MapType.HASH, POLICY_KEY, POLICY_VALUE, "policy_exact_max", NO_PREALLOC
        ),
        MapSpec("policy", MapType.LPM_TRIE, POLICY_KEY, POLICY_VALUE, "policy_max", NO_PREALLOC),
        MapSpec("counters", MapType.PERCPU_ARRAY, U32, RULE_COUNTER, "rules_max"),
        MapSpec("events", MapType.RINGBUF, None, None, "events_bytes"),
        MapSpec("events_lost", MapType.PERCPU_ARRAY, U32, U64, None),
        MapSpec("config", MapType.ARRAY, U32, CONFIG, None),
        # Only with STOCKADE_CONNTRACK.
        MapSpec("conntrack", MapType.LRU_HASH, CT_KEY, CT_ENTRY, "conntrack_max"),
        MapSpec("ct_owned", MapType.HASH, U32, S64, "endpoints_max"),
        # Only with STOCKADE_FRAGMENTS_TRACK.
        MapSpec("fragments", MapType.LRU_HASH, FRAG_KEY, FRAG_ENTRY, "fragments_max"),
        # svc_space with STOCKADE_SERVICES or STOCKADE_SERVICE_FALLBACK, the others only with
        # STOCKADE_SERVICES (bpf/service.h).
        MapSpec(
            "svc_space",
            MapType.LPM_TRIE,
            CLASS_KEY,
            SVC_SPACE_VALUE,
            "service_prefixes_max",
            NO_PREALLOC,
        ),
        MapSpec("svc_deferred", MapType.LRU_HASH, SVC_DEFER_KEY, SVC_DEFER_VALUE, "conntrack_max"),
        MapSpec("svc_flows", MapType.LRU_HASH, CT_KEY, SVC_FLOW_VALUE, "conntrack_max"),
        MapSpec("svc_masq", MapType.LRU_HASH, SVC_DEFER_KEY, SVC_MASQ_VALUE, "conntrack_max"),
        # Only with STOCKADE_SERVICE_FALLBACK (bpf/service.h).
        MapSpec(
            "svc_verdict",
            MapType.HASH,
            SVC_VERDICT_KEY,
            SVC_VERDICT_VALUE,
            "service_verdicts_max",
            NO_PREALLOC,
        ),
        MapSpec("pending", MapType.HASH, U32, U32, "endpoints_max"),
        MapSpec("pending_hint", MapType.ARRAY, U32, U32, HINT_SLOTS),
    )
}

# --- constants ----------------------------------------------------------------------------------

LPM_PREFIXLEN = CLASS_KEY.offset("addr")  # bytes of the prefix length before an LPM key's data
CLASS_KEY_BITS = 8 * (CLASS_KEY.size - LPM_PREFIXLEN)  # an IPv6 (or IPv4-mapped) address
POLICY_KEY_BITS = 8 * (POLICY_KEY.size - LPM_PREFIXLEN)


def _policy_prefix(upto: str) -> int:
    """The policy prefix length that fixes every key field before `upto`."""
    return 8 * (POLICY_KEY.offset(upto) - LPM_PREFIXLEN)


PREFIX_ENDPOINT = _policy_prefix("class_id")  # endpoint and direction: an isolation default
PREFIX_CLASS = _policy_prefix("proto")  # + peer class: every protocol and port
PREFIX_PROTO = _policy_prefix("port")  # + protocol: every port of that protocol
# The exact levels that policy_exact holds, longest first as the program looks them up.
POLICY_EXACT_PORT = POLICY_KEY_BITS
POLICY_EXACT_CLASS = PREFIX_CLASS
POLICY_EXACT_LEVELS = (POLICY_EXACT_PORT, POLICY_EXACT_CLASS)
POLICY_FLAG_LONGER = 1  # policy_exact: the trie holds longer entries beneath this one
CT_TCP_REPLIED = 0x01  # ct_entry.tcp: the other side answered
CT_TCP_FIN_ORIG = 0x02
CT_TCP_FIN_REPLY = 0x04
CT_TCP_RST = 0x08
FRAG_TIMEOUT_NS = 30 * 1_000_000_000  # how long a first fragment's verdict is kept (ipfrag_time)


class Direction(IntEnum):
    """Direction from the pod's point of view (the low bit of the policy key's endpoint word);
    DIR_* in bpf/maps.h."""

    INGRESS = 0  # to the pod: tc egress of the host-side veth
    EGRESS = 1  # from the pod: tc ingress of the host-side veth


class Action(IntEnum):
    """Final verdict in a policy entry; NONE means "no Audit-mode opinion" in `audit_action`.
    ACTION_* in bpf/maps.h."""

    NONE = 0
    ALLOW = 1
    DENY = 2


class ClassFlag(IntEnum):
    """CLASS_FLAG_* in bpf/maps.h."""

    LOCAL_NODE = 1  # the address is one of this node's own: traffic from it is always allowed


class PendingState(IntEnum):
    """PENDING_* in bpf/maps.h: the state of an interface in the `pending` map."""

    CLOSED = 1  # only what is always allowed passes: ARP, ND, the node's own addresses
    OPEN = 2  # everything passes unjudged (the fail-open setting)


class ConntrackMode(IntEnum):
    """What happens to established flows when policy changes (`enum ct_mode`, conntrack.h)."""

    REVALIDATE = 0  # the default: the next packet of each flow is judged again
    KEEP = 1  # established flows stay allowed until they expire


class EventKind(IntEnum):
    """`enum event_kind` in bpf/events.h."""

    DROP = 1  # the packet was dropped
    AUDIT = 2  # an Audit-mode policy would have dropped it; it passed


class DropReason(IntEnum):
    """`enum drop_reason` in bpf/events.h."""

    POLICY = 0  # rule_id names the deciding rule
    MALFORMED = 1
    FRAGMENT = 2
    UNPARSED = 3  # neither ARP nor IP the program parses: see bpf/parse.h
    NOT_A_ROUTER = 4  # a pod sent a redirect or router advertisement: see bpf/hook.h
    SPOOFED = 5  # a pod sent from an address not its own: see bpf/hook.h
    NOT_ON_LINK = 6  # ND or MLD that is not valid on-link: see bpf/parse.h
    CT_BUDGET = 7  # a new flow of an endpoint holding its conntrack budget: bpf/conntrack.h
    PENDING = 8  # the pod's interface is pending, its tables not applied: see bpf/hook.h
    SERVICE = 9  # the Service fallback denied a flow to a Service address: see bpf/service.h
    SERVICE_NO_BACKENDS = 10  # the Service fallback: the Service has no ready backend
