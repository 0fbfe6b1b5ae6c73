"""Pinned maps migrated to a new Shape's sizes and layouts, with no window where a pod is
unenforced.

libbpf reuses a map pinned by name only when its type, key and value sizes and max_entries are
those the object declares; otherwise the load fails. So when a new Shape changes a pinned map's
size (or its key or value layout), `stockade.agent.programs.Programs.ensure` asks `plan()` which
pinned maps no longer fit and, when some do not, loads the new programs against a staging pin
directory that holds the maps that still fit (pinned there too) and gets fresh maps for the
others. `Migration` then:

1. `copy()`: copies into each new map what carries over from the old one, when the key and value
   layouts are the same: every entry of the tables, conntrack and fragments (an LRU map keeps
   the most recent when the new one is smaller), the rule counters up to the new size; the ring
   buffer starts empty. Conntrack tables of the layout before one entry held both directions
   (a flow per entry, under its original tuple) are converted: each flow goes to its slot of
   the entry under its ordered key (`_convert_conntrack`), so that established flows survive the
   upgrade;
2. `swap()`: moves the new maps' pins over the old ones (a rename on bpffs, whole or absent);
3. after the agent has written the tables and moved every link to the new programs,
   `settle()` copies again the conntrack and fragment entries the old programs made since the
   first copy, then closes the old maps, which the kernel frees once no program holds them.

The old programs keep enforcing with the old maps until each link is moved (one atomic update
per hook), and the new programs see the tables before any link is moved to them, so every packet
meets one complete set. A failure before `swap()` leaves the old pins and programs in force.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stockade.compiler import abi
from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.datapath import libbpf, maps

log = logging.getLogger(__name__)

MIGRATE_DIR = "migrate"
# The conntrack value of the layout with one flow per entry (an entry then was one ct_flow).
OLD_CT_ENTRY_SIZE = abi.CT_FLOW.size
# Maps whose entries the old programs keep making until the links move: copied again at the end.
LIVE_MAPS = ("conntrack", "fragments")
_PERCPU = (abi.MapType.PERCPU_ARRAY,)
_ARRAYS = (abi.MapType.ARRAY, abi.MapType.PERCPU_ARRAY)


@dataclass(frozen=True)
class MapDef:
    """What libbpf compares before it reuses a pinned map."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def declared(shape: Shape) -> dict[str, MapDef]:
    """The maps the programs of `shape` declare, with their definitions (bpf/maps.h)."""
    out = {}
    for name, spec in abi.MAPS.items():
        if name == "conntrack" and not shape.conntrack:
            continue
        if name == "fragments" and shape.fragments is not FragmentPolicy.TRACK:
            continue
        size = spec.entries(shape)
        key = spec.key.size if spec.key is not None else 0
        value = spec.value.size if spec.value is not None else 0
        out[name] = MapDef(int(spec.type), key, value, size)
    return out


def pinned_def(fd: int) -> MapDef:
    info = libbpf.map_info(fd)
    return MapDef(info.map_type, info.key_size, info.value_size, info.max_entries)


def plan(pin_root: Path, shape: Shape) -> dict[str, MapDef]:
    """The pinned maps under `pin_root` that the programs of `shape` cannot reuse: name -> the
    definition they have now."""
    stale = {}
    for name, want in declared(shape).items():
        path = pin_root / name
        if not path.exists():
            continue
        fd = libbpf.obj_get(path)
        try:
            have = pinned_def(fd)
        finally:
            os.close(fd)
        if have != want:
            stale[name] = have
    return stale


def _value_size(d: MapDef) -> int:
    if d.map_type in _PERCPU:
        return (d.value_size + 7) // 8 * 8 * libbpf.num_possible_cpus()
    return d.value_size


def _entries(fd: int, d: MapDef) -> Iterable[tuple[bytes, bytes]]:
    return libbpf.map_dump(fd, d.key_size, _value_size(d))


@dataclass
class Migration:
    """One migration of pinned maps (see the module docstring); owns the old maps' fds."""

    pin_root: Path
    digest: str
    old: dict[str, MapDef]  # the stale maps, as they are pinned now
    new: dict[str, MapDef] = field(default_factory=dict)
    old_fds: dict[str, int] = field(default_factory=dict)
    copied: dict[str, int] = field(default_factory=dict)  # name -> entries carried over
    swapped: bool = False
    reopened: bool = False  # the agent's map fds follow the new pins

    @property
    def staging(self) -> Path:
        return self.pin_root / MIGRATE_DIR / self.digest

    def stage(self, shape: Shape) -> Path:
        """A fresh staging directory holding a pin of every pinned map that still fits, for the
        new programs to load against; the stale ones are left out, so libbpf makes them new."""
        shutil.rmtree(self.pin_root / MIGRATE_DIR, ignore_errors=True)
        self.staging.mkdir(parents=True)
        wanted = declared(shape)
        self.new = {name: wanted[name] for name in self.old}
        for name in wanted:
            path = self.pin_root / name
            if name in self.old or not path.exists():
                continue
            fd = libbpf.obj_get(path)
            try:
                libbpf.obj_pin(fd, self.staging / name)
            finally:
                os.close(fd)
        for name in self.old:
            self.old_fds[name] = libbpf.obj_get(self.pin_root / name)
        return self.staging

    def copy(self) -> None:
        """Copy what carries over from each old map into its new one (under `staging`)."""
        for name, old in self.old.items():
            new = self.new[name]
            if _converts(name, old, new):
                fd = libbpf.obj_get(self.staging / name)
                try:
                    self.copied[name] = _convert_conntrack(self.old_fds[name], fd, old)
                finally:
                    os.close(fd)
                continue
            if (old.map_type, old.key_size, old.value_size) != (
                new.map_type,
                new.key_size,
                new.value_size,
            ) or old.map_type == abi.MapType.RINGBUF:
                self.copied[name] = 0  # another layout (or the ring buffer): starts empty
                continue
            fd = libbpf.obj_get(self.staging / name)
            try:
                self.copied[name] = self._copy(self.old_fds[name], fd, old, new, libbpf.BPF_ANY)
            finally:
                os.close(fd)

    @staticmethod
    def _copy(src: int, dst: int, old: MapDef, new: MapDef, flags: int) -> int:
        count = 0
        lru = old.map_type == abi.MapType.LRU_HASH
        for key, value in _entries(src, old):
            if old.map_type in _ARRAYS and int.from_bytes(key, "little") >= new.max_entries:
                continue
            try:
                libbpf.map_update(dst, key, value, flags)
            except libbpf.BpfError as exc:
                if flags == libbpf.BPF_NOEXIST:
                    continue  # the new programs made it meanwhile: theirs is newer
                if not lru:
                    raise libbpf.BpfError(
                        exc.errno, f"map {old}: {count} entries copied, then: {exc}"
                    ) from None
                continue
            count += 1
        return count

    def swap(self) -> None:
        """Move the new maps' pins over the old ones."""
        for name in self.old:
            os.replace(self.staging / name, self.pin_root / name)
        self.swapped = True
        shutil.rmtree(self.pin_root / MIGRATE_DIR, ignore_errors=True)

    def settle(self) -> int:
        """After the links moved: copy again the live entries the old programs made since the
        first copy (those the new maps do not have), then close the old maps. The entries
        copied again."""
        again = 0
        try:
            for name in LIVE_MAPS:
                if name not in self.old_fds:
                    continue
                old, new = self.old[name], self.new[name]
                converts = _converts(name, old, new)
                if not converts and (old.key_size, old.value_size) != (
                    new.key_size,
                    new.value_size,
                ):
                    continue
                fd = libbpf.obj_get(self.pin_root / name)
                try:
                    if converts:
                        again += _convert_conntrack(self.old_fds[name], fd, old)
                    else:
                        again += self._copy(self.old_fds[name], fd, old, new, libbpf.BPF_NOEXIST)
                finally:
                    os.close(fd)
        finally:
            self.close()
        return again

    def abort(self) -> None:
        """Before `swap()`: drop the staging pins; the old maps stay in force."""
        shutil.rmtree(self.pin_root / MIGRATE_DIR, ignore_errors=True)
        self.close()

    def close(self) -> None:
        for fd in self.old_fds.values():
            os.close(fd)
        self.old_fds = {}

    def describe(self) -> str:
        return ", ".join(
            f"{name} {self.old[name].max_entries} -> {self.new[name].max_entries} "
            f"({self.copied.get(name, 0)} entries carried over)"
            for name in sorted(self.old)
        )


def _converts(name: str, old: MapDef, new: MapDef) -> bool:
    """Whether `name` is a conntrack table of the one-flow-per-entry layout going to the
    current one."""
    return (
        name == "conntrack"
        and old.key_size == new.key_size == abi.CT_KEY.size
        and old.value_size == OLD_CT_ENTRY_SIZE
        and new.value_size == abi.CT_ENTRY.size
    )


def _convert_conntrack(src: int, dst: int, old: MapDef) -> int:
    """Each flow of the old table (one per entry, under its original tuple) into its slot of the
    entry under its ordered key in `dst`; a slot `dst` holds already (the new programs made it)
    is kept. The flows written."""
    entries: dict[bytes, list[bytes]] = {}
    empty = bytes(abi.CT_FLOW.size)
    for key, value in _entries(src, old):
        norm, slot = maps.ct_normalize(key)
        entries.setdefault(norm, [empty] * abi.CT_SLOTS)[slot] = value
    count = 0
    for norm, flows in entries.items():
        have = libbpf.map_lookup(dst, norm, abi.CT_ENTRY.size)
        merged = list(flows)
        if have is not None:
            for slot, flow in enumerate(maps.ct_flows(have)):
                if abi.CT_FLOW.get(flow, "expires_ns"):
                    merged[slot] = flow
        try:
            libbpf.map_update(dst, norm, b"".join(merged))
        except libbpf.BpfError:
            continue  # an LRU map smaller than the old one: keeps what fits
        count += sum(1 for a, b in zip(merged, flows, strict=True) if a is b and b != empty)
    return count
