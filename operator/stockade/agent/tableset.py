"""The node's hand-off set: DatapathTable objects as the watch holds them, assembled into one
complete `HandoffSet` (Shape, tables, generation) or found incomplete.

`stockade.agent.watch` turns each watched object into a `TableObject`; `stockade.agent.sync`
calls `Assembler.assemble()` on every sync. A set is complete when the `program` shard exists and
every shard its manifest lists is present with the manifest's digest (and its entries hash to
that digest): a half-published change is never written into the maps. A small node's tables come
inline in the `program` object (`stockade.compiler.handoff.INLINE_ENTRIES`) and are complete with
it. Decoded shards are cached by digest, so a change that rewrote one shard decodes only that
shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.compiler import handoff, ir
from stockade.compiler.handoff import HandoffError


class IncompleteError(LookupError):
    """The published set is not complete yet; the message says what is missing."""


@dataclass(frozen=True)
class TableObject:
    """The parts of one DatapathTable the agent reads (spec only: status is ours)."""

    name: str
    part: str
    shard: int
    shards: int
    generation: int
    digest: str
    entries: tuple[str, ...]

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> TableObject:
        """Parse a listed or watched object; HandoffError names the field that is wrong."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        name = str(meta.get("name", "?"))
        try:
            entries = spec.get("entries") or []
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise HandoffError(f"DatapathTable {name}: spec.entries must be a list of strings")
            return cls(
                name=name,
                part=str(spec["part"]),
                shard=int(spec["shard"]),
                shards=int(spec["shards"]),
                generation=int(spec["generation"]),
                digest=str(spec["digest"]),
                entries=tuple(entries),
            )
        except KeyError as exc:
            raise HandoffError(f"DatapathTable {name}: spec.{exc.args[0]} is missing") from None
        except (TypeError, ValueError) as exc:
            raise HandoffError(f"DatapathTable {name}: bad spec: {exc}") from None


@dataclass(frozen=True)
class HandoffSet:
    """One complete, consistent publication for the node."""

    generation: int  # spec.generation of `<node>.program.0`
    program: handoff.Program
    tables: ir.NodeTables
    digests: tuple[tuple[str, int, str], ...]  # (part, shard, digest) of every applied shard


def _empty() -> ir.NodeTables:
    return ir.NodeTables(endpoints=(), classes=(), policy=(), rules={})


class Assembler:
    """Assembles sets for one node; keeps decoded shards by (part, digest) between calls."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._decoded: dict[tuple[str, str], ir.NodeTables] = {}
        self.decodes = 0  # shards decoded (a cache miss), for tests and metrics

    def _shard(self, part: str, obj: TableObject) -> ir.NodeTables:
        key = (part, obj.digest)
        found = self._decoded.get(key)
        if found is None:
            found = handoff.decode_tables({part: [obj.entries]})
            self._decoded[key] = found
            self.decodes += 1
        return found

    def assemble(self, objects: Mapping[str, TableObject]) -> HandoffSet:
        program_name = handoff.object_name(self.node, handoff.PROGRAM, 0)
        program_obj = objects.get(program_name)
        if program_obj is None:
            raise IncompleteError(f"{program_name} is not published")
        program = handoff.decode_program(program_obj.entries)
        pieces: list[ir.NodeTables] = []
        used: set[tuple[str, str]] = set()
        digests = []
        for part in handoff.TABLE_PARTS:
            for shard, want in sorted(program.manifest.get(part, {}).items()):
                name = handoff.object_name(self.node, part, shard)
                obj = objects.get(name)
                if obj is None:
                    raise IncompleteError(
                        f"{name} (listed by generation {program_obj.generation}) is not published"
                    )
                if obj.part != part or obj.shard != shard:
                    raise HandoffError(f"DatapathTable {name}: spec says {obj.part}.{obj.shard}")
                if obj.digest != want:
                    raise IncompleteError(f"{name} has digest {obj.digest}, the manifest {want}")
                if handoff.digest(obj.entries) != want:
                    raise HandoffError(f"DatapathTable {name}: entries do not match its digest")
                pieces.append(self._shard(part, obj))
                used.add((part, want))
                digests.append((part, shard, want))
        if any(program.inline.values()):
            if handoff.digest(program_obj.entries) != program_obj.digest:
                raise HandoffError(f"DatapathTable {program_name}: entries do not match its digest")
            key = (handoff.PROGRAM, program_obj.digest)
            found = self._decoded.get(key)
            if found is None:
                found = handoff.decode_tables({p: [e] for p, e in program.inline.items()})
                self._decoded[key] = found
                self.decodes += 1
            pieces.append(found)
            used.add(key)
        for key in set(self._decoded) - used:
            del self._decoded[key]
        return HandoffSet(program_obj.generation, program, _merge(pieces), tuple(digests))


def _merge(pieces: list[ir.NodeTables]) -> ir.NodeTables:
    if not pieces:
        return _empty()
    rules: dict[int, ir.RuleInfo] = {}
    for p in pieces:
        rules.update(p.rules)
    return ir.NodeTables(
        endpoints=tuple(e for p in pieces for e in p.endpoints),
        classes=tuple(c for p in pieces for c in p.classes),
        policy=tuple(e for p in pieces for e in p.policy),
        rules=rules,
    )
