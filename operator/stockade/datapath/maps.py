"""The node's pinned maps and the writer that keeps them equal to the wanted tables.

The agent opens the maps pinned under its pin root (`PinnedMaps.open`), adopts what it finds
there after a restart (`TableWriter.adopt`) and on every sync writes a `NodeTables` value as a
diff: only added, changed and deleted entries reach the kernel. Entries are written as opaque
key/value bytes (encoded by `stockade.compiler.ir`, whose entries have `key()` and `value()`), so
this module depends on the compiler's ABI (`stockade.compiler.abi`: the config and conntrack
layouts, the map names) but not on its IR.

Write order keeps every intermediate state at least as strict as either end state for a new
endpoint: rule and class additions land before an endpoint appears, and an endpoint disappears
before its rules and classes do. The policy epoch in the config map is bumped after every write
that changed something, so that conntrack (in revalidate mode) judges established flows again.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from stockade.compiler import abi
from stockade.datapath import layout, libbpf
from stockade.datapath.clock import TickClock

MAP_NAMES = tuple(abi.MAPS)
TABLE_MAPS = ("endpoints", "peer_classes", "policy")  # the logical tables (ir.NodeTables)
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/stockade")


class MapEntry(Protocol):
    def key(self) -> bytes: ...

    def value(self) -> bytes: ...


class Tables(Protocol):
    """What the writer needs of `ir.NodeTables`."""

    @property
    def endpoints(self) -> Sequence[MapEntry]: ...

    @property
    def classes(self) -> Sequence[MapEntry]: ...

    @property
    def policy(self) -> Sequence[MapEntry]: ...


@dataclass(frozen=True)
class DatapathConfig:
    """The runtime settings in the config map. Timeouts of 0 mean the programs' defaults."""

    conntrack_mode: abi.ConntrackMode = abi.ConntrackMode.REVALIDATE
    tcp_timeout_ns: int = 0
    tcp_closing_timeout_ns: int = 0
    udp_timeout_ns: int = 0
    icmp_timeout_ns: int = 0
    other_timeout_ns: int = 0


@dataclass
class PinnedMaps:
    """File descriptors of the node's pinned maps, by name; owns them."""

    pin_root: Path
    fds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, pin_root: Path = DEFAULT_PIN_ROOT) -> PinnedMaps:
        maps = cls(pin_root)
        try:
            for name in MAP_NAMES:
                path = pin_root / name
                if path.exists():
                    maps.fds[name] = libbpf.obj_get(path)
        except BaseException:
            maps.close()
            raise
        for name in (*layout.PHYSICAL_MAPS, "config"):
            if name not in maps.fds:
                maps.close()
                raise FileNotFoundError(f"pinned map {pin_root / name} is missing")
        return maps

    def fd(self, name: str) -> int:
        try:
            return self.fds[name]
        except KeyError:
            raise KeyError(f"map {name!r} is not pinned under {self.pin_root}") from None

    def reopen(self, names: Sequence[str]) -> list[int]:
        """Open the maps now pinned as `names` (after their pins moved to new maps); the fds of
        the maps they replace are returned to the caller, who closes them once nothing reads
        them (the event reader holds the ring buffer's)."""
        old = []
        for name in names:
            fd = libbpf.obj_get(self.pin_root / name)
            if name in self.fds:
                old.append(self.fds[name])
            self.fds[name] = fd
        return old

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class WriteStats:
    added: int = 0
    changed: int = 0
    deleted: int = 0
    epoch: int = 0  # the config epoch after the write

    @property
    def total(self) -> int:
        return self.added + self.changed + self.deleted


def _wanted(entries: Sequence[MapEntry], name: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for entry in entries:
        key, value = entry.key(), entry.value()
        if key in out and out[key] != value:
            raise ValueError(f"{name}: two entries with the same key and different values")
        out[key] = value
    return out


class TableWriter:
    """Keeps the table maps equal to the last written `Tables`; one writer per node.

    The logical tables are split over tries and the hashes in front of them
    (`stockade.datapath.layout`); `current()` answers with the logical contents.
    """

    def __init__(self, maps: PinnedMaps) -> None:
        self.maps = maps
        self._state: dict[str, dict[bytes, bytes]] = {}
        self._physical: dict[str, dict[bytes, bytes]] = {}
        self._capacity = {
            name: libbpf.map_info(maps.fd(name)).max_entries
            for name in ("peer_hosts", "policy_exact")
        }
        self.adopt()

    def adopt(self) -> None:
        """Read what the maps hold now (after a restart, whatever the previous agent wrote)."""
        for name in layout.PHYSICAL_MAPS:
            fd = self.maps.fd(name)
            info = libbpf.map_info(fd)
            self._physical[name] = dict(libbpf.map_dump(fd, info.key_size, info.value_size))
        self._state = layout.join(self._physical)

    def current(self, name: str) -> Mapping[bytes, bytes]:
        return self._state[name]

    def write(self, tables: Tables) -> WriteStats:
        wanted = {
            "endpoints": _wanted(tables.endpoints, "endpoints"),
            "peer_classes": _wanted(tables.classes, "peer_classes"),
            "policy": _wanted(tables.policy, "policy"),
        }
        added = changed = deleted = 0
        for name, want in wanted.items():
            have = self._state[name]
            added += sum(1 for k in want if k not in have)
            changed += sum(1 for k, v in want.items() if k in have and have[k] != v)
            deleted += sum(1 for k in have if k not in want)
        physical = layout.split(wanted, self._capacity)
        upserts = {
            name: {k: v for k, v in want.items() if self._physical[name].get(k) != v}
            for name, want in physical.items()
        }
        deletes = {
            name: [k for k in have if k not in physical[name]]
            for name, have in self._physical.items()
        }
        # Tries before the hashes in front of them, tables before the endpoints that use them;
        # deletes in the reverse order. Every state in between answers as the old or new tables.
        for name in ("policy", "policy_exact", "peer_classes", "peer_hosts", "endpoints"):
            self._upsert(name, upserts[name])
        for name in ("endpoints", "policy_exact", "policy", "peer_hosts", "peer_classes"):
            self._delete(name, deletes[name])
        self._state = wanted
        if "svc_space" in self.maps.fds:  # a Shape with services
            write_service_space(self.maps, getattr(tables, "services", ()))
        if "svc_verdict" in self.maps.fds:  # a Shape with the Service fallback
            write_service_verdicts(self.maps, getattr(tables, "service_verdicts", ()))
        epoch = read_epoch(self.maps)
        if added or changed or deleted:
            epoch = bump_epoch(self.maps)
        return WriteStats(added, changed, deleted, epoch)

    def _upsert(self, name: str, items: dict[bytes, bytes]) -> None:
        if not items:
            return
        fd = self.maps.fd(name)
        keys = layout.longest_first(list(items)) if name == "policy_exact" else list(items)
        values = [items[k] for k in keys]
        for start in range(0, len(keys), 65536):
            libbpf.map_update_batch(fd, keys[start : start + 65536], values[start : start + 65536])
        self._physical[name].update(items)

    def _delete(self, name: str, keys: list[bytes]) -> None:
        if not keys:
            return
        fd = self.maps.fd(name)
        for start in range(0, len(keys), 65536):
            libbpf.map_delete_batch(fd, keys[start : start + 65536])
        for key in keys:
            del self._physical[name][key]


# --- interface bindings -------------------------------------------------------------------------

LOOPBACK_IFINDEX = 1  # the device a BPF_PROG_TEST_RUN packet arrives on


class Bindings:
    """The `bindings` map (bpf/maps.h): a pod's host-side ifindex -> its endpoint id. The agent
    binds an interface before it attaches the programs there and unbinds it after detaching;
    a packet leaving a pod must carry an address of the endpoint its interface is bound to."""

    def __init__(self, maps: PinnedMaps) -> None:
        self._fd = maps.fd("bindings")

    def bind(self, ifindex: int, endpoint_id: int) -> None:
        libbpf.map_update(self._fd, abi.U32.pack(ifindex), abi.U32.pack(endpoint_id))

    def unbind(self, ifindex: int) -> bool:
        return libbpf.map_delete(self._fd, abi.U32.pack(ifindex))

    def read(self) -> dict[int, int]:
        return {
            abi.U32.unpack(k)[0]: abi.U32.unpack(v)[0]
            for k, v in libbpf.map_dump(self._fd, abi.U32.size, abi.U32.size)
        }


# Every change of `pending` and `pending_hint` in this process, so that a slot's count and the
# interfaces of that slot change together (the agent is their only writer).
_PENDING_LOCK = threading.Lock()
PENDING_HINT = "pending_hint"


def _hint_slot(ifindex: int) -> bytes:
    return abi.U32.pack(ifindex % abi.HINT_SLOTS)


class Pending:
    """The `pending` map (bpf/maps.h): a pod's host-side ifindex -> abi.PendingState. The agent
    marks an interface pending before it attaches the programs to a pod whose tables are not
    applied yet (CNI ADD, an unknown pod veth) and clears it once the pod's endpoint, binding
    and policy entries are written; the programs judge a pending interface by its state alone.

    Beside it, `pending_hint` counts the pending interfaces of each slot (ifindex %
    HINT_SLOTS), and the programs skip the `pending` lookup for an interface whose slot
    counts none. An interface is counted in before it is marked and counted out after it is
    cleared, so that no slot ever counts fewer than its pending interfaces: a count too low
    would let a pending pod's packets pass unjudged. An agent stopped between the two writes
    leaves a count too high, which costs a lookup and nothing else, and `ensure_pending_hint`
    counts again when the agent loads programs."""

    def __init__(self, maps: PinnedMaps) -> None:
        self._maps = maps
        self._fd = maps.fd("pending")

    def _hint_fd(self) -> int | None:
        """The `pending_hint` map; None while no programs that read it were loaded (the
        agent makes it, with its counts, before it loads them: `ensure_pending_hint`)."""
        fd = self._maps.fds.get(PENDING_HINT)
        if fd is None:
            path = self._maps.pin_root / PENDING_HINT
            if not path.exists():
                return None
            fd = self._maps.fds[PENDING_HINT] = libbpf.obj_get(path)
        return fd

    def _count(self, hint: int | None, ifindex: int, delta: int) -> None:
        if hint is None:
            return
        slot = _hint_slot(ifindex)
        raw = libbpf.map_lookup(hint, slot, abi.U32.size)
        count = abi.U32.unpack(raw)[0] if raw else 0
        libbpf.map_update(hint, slot, abi.U32.pack(max(count + delta, 0)))

    def mark(self, ifindex: int, state: abi.PendingState) -> None:
        key = abi.U32.pack(ifindex)
        with _PENDING_LOCK:
            if libbpf.map_lookup(self._fd, key, abi.U32.size) is None:
                self._count(self._hint_fd(), ifindex, +1)
            libbpf.map_update(self._fd, key, abi.U32.pack(int(state)))

    def clear(self, ifindex: int) -> bool:
        with _PENDING_LOCK:
            cleared = libbpf.map_delete(self._fd, abi.U32.pack(ifindex))
            if cleared:
                self._count(self._hint_fd(), ifindex, -1)
            return cleared

    def state(self, ifindex: int) -> abi.PendingState | None:
        """The state of one interface; None when it is not pending."""
        raw = libbpf.map_lookup(self._fd, abi.U32.pack(ifindex), abi.U32.size)
        return abi.PendingState(abi.U32.unpack(raw)[0]) if raw else None

    def read(self) -> dict[int, abi.PendingState]:
        return {
            abi.U32.unpack(k)[0]: abi.PendingState(abi.U32.unpack(v)[0])
            for k, v in libbpf.map_dump(self._fd, abi.U32.size, abi.U32.size)
        }

    def hints(self) -> dict[int, int]:
        """The slots of `pending_hint` that count an interface: slot -> count."""
        hint = self._hint_fd()
        if hint is None:
            return {}
        counts = {
            abi.U32.unpack(k)[0]: abi.U32.unpack(v)[0]
            for k, v in libbpf.map_dump(hint, abi.U32.size, abi.U32.size)
        }
        return {slot: n for slot, n in counts.items() if n}


def ensure_pending_hint(pin_root: Path) -> bool:
    """Make sure `pending_hint` is pinned under `pin_root`, counting the interfaces `pending`
    holds there, before programs that read it are loaded against these pins: programs of a
    version before it left pending interfaces that no slot counts yet. True when it was made.
    (Made here rather than by libbpf at the load, so that the pin is in place however the
    programs are loaded, a migration's staging included.)"""
    path = pin_root / PENDING_HINT
    with _PENDING_LOCK:
        if path.exists():
            return False
        pin_root.mkdir(parents=True, exist_ok=True)
        spec = abi.MAPS[PENDING_HINT]
        assert spec.key is not None and spec.value is not None
        fd = libbpf.map_create(
            int(spec.type), PENDING_HINT, spec.key.size, spec.value.size, abi.HINT_SLOTS
        )
        try:
            pending = pin_root / "pending"
            if pending.exists():
                pfd = libbpf.obj_get(pending)
                try:
                    counts = Counter(
                        _hint_slot(abi.U32.unpack(k)[0]) for k in libbpf.map_keys(pfd, abi.U32.size)
                    )
                finally:
                    os.close(pfd)
                for slot, n in counts.items():
                    libbpf.map_update(fd, slot, abi.U32.pack(n))
            libbpf.obj_pin_whole(fd, path)
        finally:
            os.close(fd)
        return True


# --- the config map -----------------------------------------------------------------------------


def _read_config_raw(maps: PinnedMaps) -> bytes:
    raw = libbpf.map_lookup(maps.fd("config"), abi.CONFIG_KEY, abi.CONFIG.size)
    return raw if raw is not None else bytes(abi.CONFIG.size)


def _set_config(maps: PinnedMaps, **fields: int) -> None:
    """Set the named fields of the config, keeping the others as they are."""
    raw = _read_config_raw(maps)
    for name, value in fields.items():
        raw = abi.CONFIG.replace(raw, name, value)
    libbpf.map_update(maps.fd("config"), abi.CONFIG_KEY, raw)


def read_epoch(maps: PinnedMaps) -> int:
    return int(abi.CONFIG.get(_read_config_raw(maps), "epoch"))


_TIMEOUTS = (
    "tcp_timeout_ns",
    "tcp_closing_timeout_ns",
    "udp_timeout_ns",
    "icmp_timeout_ns",
    "other_timeout_ns",
)


def read_config(maps: PinnedMaps) -> DatapathConfig:
    raw = _read_config_raw(maps)
    return DatapathConfig(
        abi.ConntrackMode(abi.CONFIG.get(raw, "ct_mode")),
        **{name: abi.CONFIG.get(raw, name) for name in _TIMEOUTS},
    )


def write_config(maps: PinnedMaps, config: DatapathConfig, epoch: int | None = None) -> None:
    """Write the settings; the epoch and the clock are kept (the epoch unless given)."""
    fields = {name: getattr(config, name) for name in _TIMEOUTS}
    if epoch is not None:
        fields["epoch"] = epoch & 0xFFFFFFFF
    _set_config(maps, ct_mode=int(config.conntrack_mode), **fields)


def read_clock(maps: PinnedMaps) -> TickClock | None:
    """The conntrack clock the programs read (None: the coarse clock, nothing measured)."""
    raw = _read_config_raw(maps)
    tick_ns = abi.CONFIG.get(raw, "tick_ns")
    return TickClock(tick_ns, abi.CONFIG.get(raw, "clock_base_ns")) if tick_ns else None


def write_clock(maps: PinnedMaps, tick: TickClock | None) -> None:
    """Set the conntrack clock (stockade.datapath.clock); None: the coarse clock."""
    _set_config(
        maps, tick_ns=tick.tick_ns if tick else 0, clock_base_ns=tick.base_ns if tick else 0
    )


def bump_epoch(maps: PinnedMaps) -> int:
    epoch = (read_epoch(maps) + 1) & 0xFFFFFFFF
    _set_config(maps, epoch=epoch)
    return epoch


# --- conntrack ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConntrackEntry:
    saddr: bytes  # 16 bytes, IPv4-mapped for IPv4
    daddr: bytes
    sport: int
    dport: int
    protocol: int
    direction: int  # of the hook that judged the flow (ir.Direction)
    expires_ns: int
    epoch: int
    rule_id: int
    port: int
    closing: bool  # the short timeout applies
    tcp: int  # abi.CT_TCP_* flags of a TCP flow
    owner: int  # the endpoint whose budget holds the entry


def ct_normalize(key: bytes) -> tuple[bytes, int]:
    """The map key and slot of the flow whose original tuple is the ct_key `key` (as the
    programs write it: bpf/conntrack.h, ct_key_norm)."""
    saddr, daddr, sport, dport, proto, direction, pad = abi.CT_KEY.unpack(key)
    mine = (struct.unpack("=4I", saddr), struct.unpack("=H", sport)[0])
    theirs = (struct.unpack("=4I", daddr), struct.unpack("=H", dport)[0])
    if mine > theirs:
        return abi.CT_KEY.pack(daddr, saddr, dport, sport, proto, direction ^ 1, pad), 1
    return key, 0


def ct_original(key: bytes, slot: int) -> bytes:
    """The original tuple (a ct_key) of the flow in `slot` of the entry under map key `key`."""
    if not slot:
        return key
    saddr, daddr, sport, dport, proto, direction, pad = abi.CT_KEY.unpack(key)
    return abi.CT_KEY.pack(daddr, saddr, dport, sport, proto, direction ^ 1, pad)


def ct_flows(value: bytes) -> list[bytes]:
    """The slots of a conntrack entry, each a packed ct_flow (expires_ns 0: empty)."""
    size = abi.CT_FLOW.size
    return [value[i * size : (i + 1) * size] for i in range(abi.CT_SLOTS)]


def conntrack_entries(maps: PinnedMaps) -> list[ConntrackEntry]:
    """Every tracked flow (a non-empty slot), under its original tuple."""
    out = []
    for key, value in libbpf.map_dump(maps.fd("conntrack"), abi.CT_KEY.size, abi.CT_ENTRY.size):
        for slot, flow in enumerate(ct_flows(value)):
            expires, epoch, rule_id, port, closing, tcp, owner = abi.CT_FLOW.unpack(flow)
            if not expires:
                continue
            saddr, daddr, sport, dport, proto, direction, _ = abi.CT_KEY.unpack(
                ct_original(key, slot)
            )
            out.append(
                ConntrackEntry(
                    saddr,
                    daddr,
                    int.from_bytes(sport, "big"),
                    int.from_bytes(dport, "big"),
                    proto,
                    direction,
                    expires,
                    epoch,
                    rule_id,
                    port,
                    bool(closing),
                    tcp,
                    owner,
                )
            )
    return out


def forget_conntrack(maps: PinnedMaps, original: bytes) -> None:
    """Forget the flow whose original tuple is `original` (a ct_key), if tracked; its owner's
    count is left to the recount."""
    fd = maps.fd("conntrack")
    key, slot = ct_normalize(original)
    raw = libbpf.map_lookup(fd, key, abi.CT_ENTRY.size)
    if raw is None:
        return
    flows = ct_flows(raw)
    flows[slot] = bytes(abi.CT_FLOW.size)
    if all(abi.CT_FLOW.get(f, "expires_ns") == 0 for f in flows):
        libbpf.map_delete(fd, key)
    else:
        libbpf.map_update(fd, key, b"".join(flows), libbpf.BPF_EXIST)


def conntrack_owned(maps: PinnedMaps) -> dict[int, int]:
    """Endpoint id -> the conntrack entries the programs count it as holding (`ct_owned`)."""
    return {
        abi.U32.unpack(k)[0]: abi.S64.unpack(v)[0]
        for k, v in libbpf.map_dump(maps.fd("ct_owned"), abi.U32.size, abi.S64.size)
    }


def recount_conntrack(maps: PinnedMaps, now_ns: int) -> dict[int, int]:
    """Delete the expired conntrack entries and set every endpoint's `ct_owned` count to the
    live entries it holds; returns the counts. The programs count their own creations and
    deletions, but not the LRU's evictions nor entries that expired without being looked up
    again: this puts the counts back. A flow created between the table's dump and the write
    of its owner's count is missed until the next recount. An entry whose flows are all
    expired is deleted; an expired flow beside a live one stays, counted, until the programs
    empty its slot (and uncount it): rewriting the entry here could undo a packet's update of
    the live flow."""
    fd = maps.fd("conntrack")
    live: dict[int, int] = {}
    for key, value in list(libbpf.map_dump(fd, abi.CT_KEY.size, abi.CT_ENTRY.size)):
        flows = [
            (abi.CT_FLOW.get(f, "expires_ns"), abi.CT_FLOW.get(f, "owner")) for f in ct_flows(value)
        ]
        if all(expires < now_ns for expires, _ in flows):
            libbpf.map_delete(fd, key)
            continue
        for expires, owner in flows:
            if expires:
                live[owner] = live.get(owner, 0) + 1
    owned = maps.fd("ct_owned")
    for key in list(libbpf.map_keys(owned, abi.U32.size)):
        if abi.U32.unpack(key)[0] not in live:
            libbpf.map_delete(owned, key)
    for owner, count in live.items():
        libbpf.map_update(owned, abi.U32.pack(owner), abi.S64.pack(count))
    return live


def flush_conntrack(maps: PinnedMaps) -> int:
    """Forget every tracked flow; returns how many there were."""
    fd = maps.fd("conntrack")
    keys = list(libbpf.map_keys(fd, abi.CT_KEY.size))
    for key in keys:
        libbpf.map_delete(fd, key)
    owned = maps.fd("ct_owned")
    for key in list(libbpf.map_keys(owned, abi.U32.size)):
        libbpf.map_delete(owned, key)
    return len(keys)


# --- Service address space (bpf/service.h) -----------------------------------------------------


def write_service_space(maps: PinnedMaps, entries: Sequence[MapEntry]) -> int:
    """Make the svc_space trie hold exactly `entries` (`ir.ServiceEntry`): additions first,
    then deletions. Returns the number of writes. The policy epoch stays: where a flow is judged
    changes nothing of what an established one was allowed by."""
    return _write_exactly(maps, "svc_space", entries)


def write_service_verdicts(maps: PinnedMaps, entries: Sequence[MapEntry]) -> int:
    """Make the svc_verdict hash (the Service fallback, bpf/service.h) hold exactly `entries`
    (`ir.ServiceVerdictEntry`). Returns the number of writes."""
    return _write_exactly(maps, "svc_verdict", entries)


def _write_exactly(maps: PinnedMaps, name: str, entries: Sequence[MapEntry]) -> int:
    """Make map `name` hold exactly `entries`, additions and changes before deletions; returns
    the number of writes."""
    fd = maps.fd(name)
    spec = abi.MAPS[name]
    assert spec.key is not None and spec.value is not None
    wanted = {e.key(): e.value() for e in entries}
    have = dict(libbpf.map_dump(fd, spec.key.size, spec.value.size))
    writes = 0
    for key, value in wanted.items():
        if have.get(key) != value:
            libbpf.map_update(fd, key, value)
            writes += 1
    for key in have.keys() - wanted.keys():
        libbpf.map_delete(fd, key)
        writes += 1
    return writes
