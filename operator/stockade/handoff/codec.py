"""The hand-off codec: one node's `ir.NodeTables` and `Shape` as compact text entries in shards.

The operator's lowering (`stockade.control.lowering`) calls `encode()`; `stockade.handoff.objects`
carries each shard in one `DatapathTable` object, and the agent's side
(`stockade.handoff.assemble`) reads them back with `decode_tables()` and `decode_program()`. Pure
functions, no I/O: this is the one definition of the format.

Parts and entry formats (one string per map entry, fields separated by one space):

- `endpoints`: `<address> <endpoint id>`
- `classes`:   `<network> <class id> <flags>`
- `policy`:    `<endpoint id> <direction> <prefixlen> <class id> <protocol> <port> <action>
  <rule id> <audit action> <audit rule id>` (integers: `ir.Direction`, `ir.Action` values)
- `rules`:     `<rule id> <kind> <namespace or -> <name> <Ingress|Egress> <index>` (names live only
  here, in Python; they never reach C)
- `services`:  `<network> <port min> <port max>`: Service address space (`ir.ServiceEntry`)
- `fallback`:  `<endpoint id> <address> <protocol> <port> <action> <rule id> <no backends 0|1>`:
  the Service fallback's verdicts (`ir.ServiceVerdictEntry`)
- `program`:   `shape <field> <integer>` for every Shape field, then `shard <part> <shard>
  <digest>` for every shard of the table parts: the manifest (`digest()` of the shard's
  entries). The agent applies a set only when every shard the manifest lists is present with
  that digest, so a half-published change is never written into the maps.

A node whose tables have at most `INLINE_ENTRIES` entries in all (most nodes of most clusters)
publishes them inside its `program` object instead, as `<part> <entry>` after the Shape, and has
no table shards: a change is then one object written, not a shard per touched part plus the
manifest (each write is a round trip through the API server and etcd, the larger part of the
time from a label change to the map update). The inline entries are bounded like a shard's.

A table part splits into `shard_count(n)` shards (a power of two, about `SHARD_ENTRIES` entries
each) and an entry goes to the shard its key hashes to: endpoints and policy by endpoint id (a
change on one pod rewrites only the shard that holds it), classes by network, rules by id. An
endpoint with more than `ENDPOINT_SHARD_ENTRIES` policy entries (a pod under a large policy) has
them keyed each by itself, spread over every shard, so that no shard grows past about twice
`SHARD_ENTRIES` (a few hundred kB, far under the API server's object size limit) whatever one
policy holds. The shard count changes only when a part doubles or halves, so write volume follows
the change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from stockade.compiler import abi, ir
from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.model.policy import ISOLATION_INDEX

PROGRAM = "program"
ENDPOINTS = "endpoints"
CLASSES = "classes"
POLICY = "policy"
RULES = "rules"
SERVICES = "services"
FALLBACK = "fallback"
TABLE_PARTS = (ENDPOINTS, CLASSES, POLICY, RULES, SERVICES, FALLBACK)
PARTS = (PROGRAM, *TABLE_PARTS)

SHARD_ENTRIES = 2048  # average fill; a shard of 2 x 2,048 policy entries is about 160 kB
# An endpoint with more policy entries than this has them spread over every policy shard.
ENDPOINT_SHARD_ENTRIES = SHARD_ENTRIES // 8
INLINE_ENTRIES = 256  # a node with at most this many table entries publishes them in `program`
NO_NAMESPACE = "-"  # cluster-scoped rules: "-" is never a namespace name


class HandoffError(ValueError):
    """An entry or object that is not in the hand-off format; the message names it."""


# Every number is range-checked on the way in: the agent writes them into map keys and values
# as fixed-width fields, where a number out of range would alias another key (a port of 65,616
# is port 80 in 16 bits) or index past an array. The endpoint id is shifted left by one beside
# the direction in a 32-bit key field.
U32_MAX = (1 << 32) - 1
ENDPOINT_ID_MAX = (1 << 31) - 1
PROTOCOL_MAX = 255
PORT_MAX = 65_535
CLASS_FLAGS = sum(int(f) for f in abi.ClassFlag)
# A policy entry fixes the endpoint and direction, then the class, then the protocol, then some
# leading bits of the port (a port range is a few prefixes); nothing else is a valid length.
POLICY_PREFIXES = frozenset(
    (abi.PREFIX_ENDPOINT, abi.PREFIX_CLASS, *range(abi.PREFIX_PROTO, abi.POLICY_KEY_BITS + 1))
)


def shard_count(entries: int) -> int:
    """The number of shards for a part of `entries` entries: 0 when empty, else a power of two."""
    if entries == 0:
        return 0
    count = 1
    while count * SHARD_ENTRIES < entries:
        count *= 2
    return count


def digest(entries: Sequence[str]) -> str:
    """The content digest of one shard (what the manifest lists)."""
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Shard:
    """One shard's sorted entries and their digest, computed once when the shard is made: the
    manifest, the operator's plan and the published object all take it from here."""

    entries: tuple[str, ...]
    digest: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", digest(self.entries))


Shards = dict[int, Shard]  # shard number -> its entries


def _bucket(key: str, count: int) -> int:
    raw = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big") % count


# --- entries ---------------------------------------------------------------------------------


def encode_endpoint(e: ir.EndpointEntry) -> str:
    return f"{e.address} {e.endpoint_id}"


def _class_keyed(c: ir.ClassEntry) -> tuple[str, str]:
    """(shard key, entry) of a class entry: its prefix's text is made once (a node has an entry
    per pod address its peers hold)."""
    network = str(c.network)
    return network, f"{network} {c.class_id} {c.flags}"


def encode_policy(p: ir.PolicyEntry) -> str:
    return (
        f"{p.endpoint_id} {int(p.direction)} {p.prefixlen} {p.class_id} {p.protocol} {p.port} "
        f"{int(p.action)} {p.rule_id} {int(p.audit_action)} {p.audit_rule_id}"
    )


_DIRECTION_NAMES = {ir.Direction.INGRESS: "Ingress", ir.Direction.EGRESS: "Egress"}
_DIRECTIONS = {v: k for k, v in _DIRECTION_NAMES.items()}


def encode_rule(rule_id: int, info: ir.RuleInfo) -> str:
    namespace = info.namespace or NO_NAMESPACE
    return (
        f"{rule_id} {info.kind} {namespace} {info.name} "
        f"{_DIRECTION_NAMES[info.direction]} {info.index}"
    )


def _fields(entry: str, count: int, part: str) -> list[str]:
    fields = entry.split(" ")
    if len(fields) != count:
        raise HandoffError(f"{part} entry {entry!r}: expected {count} fields, got {len(fields)}")
    return fields


def _int(
    text: str, part: str, entry: str, field: str = "", low: int = 0, high: int = U32_MAX
) -> int:
    """The field as an integer in low..high: decimal digits only (no spaces, no `_`, no `+`),
    with a `-` only where `low` is negative."""
    digits = text[1:] if low < 0 and text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > len(str(U32_MAX)):
        raise HandoffError(f"{part} entry {entry!r}: {field or 'field'} {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise HandoffError(
            f"{part} entry {entry!r}: {field or 'field'} {value} is outside {low}..{high}"
        )
    return value


def decode_endpoint(entry: str) -> ir.EndpointEntry:
    address, ep = _fields(entry, 2, ENDPOINTS)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise HandoffError(f"endpoints entry {entry!r}: bad address") from None
    return ir.EndpointEntry(ip, _int(ep, ENDPOINTS, entry, "endpoint id", 1, ENDPOINT_ID_MAX))


def decode_class(entry: str) -> ir.ClassEntry:
    network, cid, flags = _fields(entry, 3, CLASSES)
    try:
        net = ipaddress.ip_network(network)
    except ValueError:
        raise HandoffError(f"classes entry {entry!r}: bad network") from None
    flag_bits = _int(flags, CLASSES, entry, "flags")
    if flag_bits & ~CLASS_FLAGS:
        raise HandoffError(f"classes entry {entry!r}: unknown flags {flag_bits & ~CLASS_FLAGS:#x}")
    return ir.ClassEntry(net, _int(cid, CLASSES, entry, "class id"), flag_bits)


_POLICY_FIELDS = (
    ("endpoint id", 1, ENDPOINT_ID_MAX),
    ("direction", 0, U32_MAX),  # checked as an ir.Direction below
    ("prefixlen", 0, abi.POLICY_KEY_BITS),
    ("class id", 0, U32_MAX),
    ("protocol", 0, PROTOCOL_MAX),
    ("port", 0, PORT_MAX),
    ("action", 0, U32_MAX),  # an ir.Action
    ("rule id", 0, U32_MAX),
    ("audit action", 0, U32_MAX),  # an ir.Action
    ("audit rule id", 0, U32_MAX),
)


def decode_policy(entry: str) -> ir.PolicyEntry:
    values = [
        _int(text, POLICY, entry, name, low, high)
        for text, (name, low, high) in zip(_fields(entry, 10, POLICY), _POLICY_FIELDS, strict=True)
    ]
    ep, direction, prefixlen, cid, proto, port, action, rule, audit_action, audit_rule = values
    if prefixlen not in POLICY_PREFIXES:
        raise HandoffError(f"policy entry {entry!r}: prefixlen {prefixlen} is no policy level")
    try:
        return ir.PolicyEntry(
            ep,
            ir.Direction(direction),
            prefixlen,
            cid,
            proto,
            port,
            ir.Action(action),
            rule,
            ir.Action(audit_action),
            audit_rule,
        )
    except ValueError as exc:
        raise HandoffError(f"policy entry {entry!r}: {exc}") from None


def encode_service(e: ir.ServiceEntry) -> str:
    return f"{e.network} {e.port_min} {e.port_max}"


def decode_service(entry: str) -> ir.ServiceEntry:
    network, low, high = _fields(entry, 3, SERVICES)
    try:
        net = ipaddress.ip_network(network)
    except ValueError:
        raise HandoffError(f"services entry {entry!r}: bad network") from None
    port_min = _int(low, SERVICES, entry, "port min", 0, PORT_MAX)
    port_max = _int(high, SERVICES, entry, "port max", 0, PORT_MAX)
    if port_min > port_max:
        raise HandoffError(f"services entry {entry!r}: port min {port_min} above port max")
    return ir.ServiceEntry(net, port_min, port_max)


def encode_fallback(e: ir.ServiceVerdictEntry) -> str:
    head = f"{e.endpoint_id} {e.address} {e.protocol} {e.port}"
    return f"{head} {int(e.action)} {e.rule_id} {int(e.no_backends)}"


def decode_fallback(entry: str) -> ir.ServiceVerdictEntry:
    ep, address, proto, port, action, rule, none = _fields(entry, 7, FALLBACK)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise HandoffError(f"fallback entry {entry!r}: bad address") from None
    verdict = _int(action, FALLBACK, entry, "action")
    if verdict not in (ir.Action.ALLOW, ir.Action.DENY):
        raise HandoffError(f"fallback entry {entry!r}: action {verdict} is neither allow nor deny")
    return ir.ServiceVerdictEntry(
        _int(ep, FALLBACK, entry, "endpoint id", 1, ENDPOINT_ID_MAX),
        ip,
        _int(proto, FALLBACK, entry, "protocol", 0, PROTOCOL_MAX),
        _int(port, FALLBACK, entry, "port", 0, PORT_MAX),
        ir.Action(verdict),
        _int(rule, FALLBACK, entry, "rule id"),
        bool(_int(none, FALLBACK, entry, "no backends", 0, 1)),
    )


def decode_rule(entry: str) -> tuple[int, ir.RuleInfo]:
    rule_id, kind, namespace, name, direction, index = _fields(entry, 6, RULES)
    if direction not in _DIRECTIONS:
        raise HandoffError(f"rules entry {entry!r}: direction must be Ingress or Egress")
    info = ir.RuleInfo(
        kind,
        "" if namespace == NO_NAMESPACE else namespace,
        name,
        _DIRECTIONS[direction],
        _int(index, RULES, entry, "index", ISOLATION_INDEX, U32_MAX),
    )
    return _int(rule_id, RULES, entry, "rule id"), info


# --- tables ----------------------------------------------------------------------------------


def _shard(keyed: Iterable[tuple[str, str]]) -> Shards:
    items = list(keyed)
    count = shard_count(len(items))
    buckets: dict[int, list[str]] = {i: [] for i in range(count)}
    for key, entry in items:
        buckets[_bucket(key, count)].append(entry)
    return {i: Shard(tuple(sorted(entries))) for i, entries in buckets.items()}


def _policy_keyed(policy: Sequence[ir.PolicyEntry]) -> Iterable[tuple[str, str]]:
    """Policy entries keyed by endpoint id (a pod's change rewrites the one shard that holds
    it), except for an endpoint with more than `ENDPOINT_SHARD_ENTRIES` entries, whose entries
    are keyed each by itself and spread over every shard: one endpoint under a large policy
    never makes one shard larger than the others (nor than the API server takes)."""
    per_endpoint = Counter(p.endpoint_id for p in policy)
    for p in policy:
        entry = encode_policy(p)
        yield (
            (entry if per_endpoint[p.endpoint_id] > ENDPOINT_SHARD_ENTRIES else str(p.endpoint_id)),
            entry,
        )


# each table part and the field of `ir.NodeTables` it encodes
_PART_FIELDS = {
    ENDPOINTS: "endpoints",
    CLASSES: "classes",
    POLICY: "policy",
    RULES: "rules",
    SERVICES: "services",
    FALLBACK: "service_verdicts",
}


def encode_tables(
    tables: ir.NodeTables, last: tuple[ir.NodeTables, Mapping[str, Shards]] | None = None
) -> dict[str, Shards]:
    """The table parts of `tables`, sharded: part -> shard number -> sorted entries. With
    `last` (earlier tables and their encoded parts), a part whose table is equal to the one it
    was encoded from is taken from there instead of being encoded again."""
    encoders: dict[str, Callable[[], Shards]] = {
        ENDPOINTS: lambda: _shard(
            (str(e.endpoint_id), encode_endpoint(e)) for e in tables.endpoints
        ),
        CLASSES: lambda: _shard(map(_class_keyed, tables.classes)),
        POLICY: lambda: _shard(_policy_keyed(tables.policy)),
        RULES: lambda: _shard((str(i), encode_rule(i, info)) for i, info in tables.rules.items()),
        SERVICES: lambda: _shard((str(e.network), encode_service(e)) for e in tables.services),
        FALLBACK: lambda: _shard(
            (str(e.endpoint_id), encode_fallback(e)) for e in tables.service_verdicts
        ),
    }
    out: dict[str, Shards] = {}
    for part, encoder in encoders.items():
        name = _PART_FIELDS[part]
        if last is not None and part in last[1] and getattr(last[0], name) == getattr(tables, name):
            out[part] = last[1][part]
        else:
            out[part] = encoder()
    return out


PartShards = Mapping[int, Shard | Sequence[str]] | Iterable[Shard | Sequence[str]]


def _entries(parts: Mapping[str, PartShards], part: str) -> list[str]:
    shards = parts.get(part, ())
    if isinstance(shards, Mapping):
        shards = shards.values()
    return [e for shard in shards for e in (shard.entries if isinstance(shard, Shard) else shard)]


def decode_tables(parts: Mapping[str, PartShards]) -> ir.NodeTables:
    """NodeTables from every shard of each table part: part -> {shard: Shard or entries} (or a
    list of them); shard order does not matter."""

    def entries(part: str) -> list[str]:
        return _entries(parts, part)

    policy = sorted(
        (decode_policy(e) for e in entries(POLICY)),
        key=lambda p: (p.endpoint_id, int(p.direction), p.class_id, p.prefixlen, p.protocol),
    )
    return ir.NodeTables(
        endpoints=tuple(
            sorted((decode_endpoint(e) for e in entries(ENDPOINTS)), key=lambda e: e.key())
        ),
        classes=tuple(sorted((decode_class(e) for e in entries(CLASSES)), key=lambda c: c.key())),
        policy=tuple(policy),
        rules=dict(sorted(decode_rule(e) for e in entries(RULES))),
        services=tuple(
            sorted((decode_service(e) for e in entries(SERVICES)), key=lambda e: e.key())
        ),
        service_verdicts=tuple(
            sorted((decode_fallback(e) for e in entries(FALLBACK)), key=lambda e: e.key())
        ),
    )


# --- program ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """The `program` part: the Shape to render, the manifest of the table shards, and the table
    entries carried inline (a small node's whole tables)."""

    shape: Shape
    manifest: Mapping[str, Mapping[int, str]]  # part -> shard -> digest
    inline: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Namespaces where a new pod may be opened at once (`stockade.model.fastopen`), as
    # `open <namespace>` entries; only the agent's Python reads them, never generated C.
    open_namespaces: frozenset[str] = frozenset()


_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def encode_open(namespaces: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"open {name}" for name in sorted(namespaces))


def encode_shape(shape: Shape) -> tuple[str, ...]:
    out = []
    for f in dataclasses.fields(shape):
        value = getattr(shape, f.name)
        out.append(f"shape {f.name} {int(value)}")
    return tuple(out)


def encode_program(
    shape: Shape, tables: Mapping[str, Shards], open_namespaces: Iterable[str] = ()
) -> tuple[str, ...]:
    manifest = tuple(
        f"shard {part} {number} {shard.digest}"
        for part in TABLE_PARTS
        for number, shard in sorted(tables.get(part, {}).items())
    )
    return encode_shape(shape) + encode_open(open_namespaces) + manifest


def decode_program(entries: Iterable[str]) -> Program:
    """The Shape and manifest of a `program` shard; unknown Shape fields are an error."""
    types = {f.name: f.type for f in dataclasses.fields(Shape)}
    values: dict[str, object] = {}
    manifest: dict[str, dict[int, str]] = {part: {} for part in TABLE_PARTS}
    inline: dict[str, list[str]] = {}
    opened: set[str] = set()
    for entry in entries:
        fields = entry.split(" ")
        if fields[0] == "open" and len(fields) == 2:
            if not _NAMESPACE.match(fields[1]):
                raise HandoffError(f"program entry {entry!r}: {fields[1]!r} is no namespace name")
            opened.add(fields[1])
            continue
        if fields[0] in TABLE_PARTS and len(fields) > 1:
            inline.setdefault(fields[0], []).append(entry[len(fields[0]) + 1 :])
            continue
        if fields[0] == "shape" and len(fields) == 3:
            name, number = fields[1], _int(fields[2], PROGRAM, entry, fields[1])
            if name not in types:
                raise HandoffError(f"program entry {entry!r}: unknown shape field {name!r}")
            if types[name] in ("bool", bool):
                values[name] = bool(number)
            elif name == "fragments":
                known = sorted(int(p) for p in FragmentPolicy)
                if number not in known:
                    raise HandoffError(
                        f"program entry {entry!r}: shape.fragments {number} is none of {known}"
                    )
                values[name] = FragmentPolicy(number)
            else:
                values[name] = number
        elif fields[0] == "shard" and len(fields) == 4 and fields[1] in manifest:
            manifest[fields[1]][_int(fields[2], PROGRAM, entry, "shard", 0, 1 << 16)] = fields[3]
        else:
            raise HandoffError(
                f"program entry {entry!r}: expected 'shape ...', 'shard ...' or '<part> <entry>'"
            )
    try:
        shape = Shape(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise HandoffError(f"program: {exc}") from None
    inline_parts = {part: tuple(found) for part, found in inline.items()}
    return Program(shape, manifest, inline_parts, frozenset(opened))


def rule_entries(part: str, entries: Sequence[str]) -> tuple[str, ...]:
    """The `rules` entries one DatapathTable carries: a rules shard's own, or those inline in a
    program object (for tools that read rule names from what is published)."""
    if part == RULES:
        return tuple(entries)
    if part == PROGRAM:
        return decode_program(entries).inline.get(RULES, ())
    return ()


def encode(
    tables: ir.NodeTables,
    shape: Shape | None = None,
    inline_max: int = INLINE_ENTRIES,
    open_namespaces: Iterable[str] = (),
    last: tuple[ir.NodeTables, Mapping[str, Shards]] | None = None,
) -> dict[str, Shards]:
    """Every part of one node's hand-off: the `program` part (shard 0) and the table parts, or
    only the `program` part with the tables inline when they have at most `inline_max`
    entries. `last`: earlier tables and what `encode` gave for them, whose table parts are
    reused where the tables are equal (`encode_tables`)."""
    parts = encode_tables(tables, last)
    if sum(len(s.entries) for shards in parts.values() for s in shards.values()) <= inline_max:
        inline = tuple(
            f"{part} {entry}"
            for part in TABLE_PARTS
            for entry in sorted(e for s in parts[part].values() for e in s.entries)
        )
        head = encode_shape(shape or Shape()) + encode_open(open_namespaces)
        return {PROGRAM: {0: Shard(head + inline)}}
    return {PROGRAM: {0: Shard(encode_program(shape or Shape(), parts, open_namespaces))}, **parts}


def decode(parts: Mapping[str, PartShards]) -> tuple[ir.NodeTables, Program]:
    """The inverse of `encode` (the program part's single shard gives the Shape, the manifest
    and any inline entries)."""
    program = decode_program(_entries(parts, PROGRAM))
    tables = {part: [_entries(parts, part), program.inline.get(part, ())] for part in TABLE_PARTS}
    return decode_tables(tables), program
