"""The agent's side of the hand-off: a node's DatapathTable objects assembled into one complete
`HandoffSet` (Shape, tables, generation), or found incomplete.

`stockade.agent.watch` reads each watched object into a `TableObject`; `stockade.agent.sync`
calls `Assembler.assemble()` on every sync. A set is complete when the `program` shard exists and
every shard its manifest lists is present with the manifest's digest (and its entries hash to
that digest, checked once per object received): a half-published change is never written into
the maps. A small node's tables come inline in the `program` object (`codec.INLINE_ENTRIES`) and
are complete with it. Decoded shards are cached by digest, so a change that rewrote one shard
decodes only that shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stockade.compiler import ir
from stockade.handoff import codec
from stockade.handoff.codec import HandoffError
from stockade.handoff.objects import TableObject, object_name


class IncompleteError(LookupError):
    """The published set is not complete yet; the message says what is missing."""


@dataclass(frozen=True)
class HandoffSet:
    """One complete, consistent publication for the node."""

    generation: int  # spec.generation of `<node>.program.0`
    program: codec.Program
    tables: ir.NodeTables
    digests: tuple[tuple[str, int, str], ...]  # (part, shard, digest) of every applied shard
    changed_at: int | None = None  # Unix ns of the earliest change it carries (objects.CHANGED_AT)


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
            found = codec.decode_tables({part: [obj.entries]})
            self._decoded[key] = found
            self.decodes += 1
        return found

    def assemble(self, objects: Mapping[str, TableObject]) -> HandoffSet:
        program_name = object_name(self.node, codec.PROGRAM, 0)
        program_obj = objects.get(program_name)
        if program_obj is None:
            raise IncompleteError(f"{program_name} is not published")
        program = codec.decode_program(program_obj.entries)
        pieces: list[ir.NodeTables] = []
        used: set[tuple[str, str]] = set()
        digests = []
        for part in codec.TABLE_PARTS:
            for shard, want in sorted(program.manifest.get(part, {}).items()):
                name = object_name(self.node, part, shard)
                obj = objects.get(name)
                if obj is None:
                    raise IncompleteError(
                        f"{name} (listed by generation {program_obj.generation}) is not published"
                    )
                if obj.part != part or obj.shard != shard:
                    raise HandoffError(f"DatapathTable {name}: spec says {obj.part}.{obj.shard}")
                if obj.digest != want:
                    raise IncompleteError(f"{name} has digest {obj.digest}, the manifest {want}")
                if obj.content_digest != want:
                    raise HandoffError(f"DatapathTable {name}: entries do not match its digest")
                pieces.append(self._shard(part, obj))
                used.add((part, want))
                digests.append((part, shard, want))
        if any(program.inline.values()):
            if program_obj.content_digest != program_obj.digest:
                raise HandoffError(f"DatapathTable {program_name}: entries do not match its digest")
            key = (codec.PROGRAM, program_obj.digest)
            found = self._decoded.get(key)
            if found is None:
                found = codec.decode_tables({p: [e] for p, e in program.inline.items()})
                self._decoded[key] = found
                self.decodes += 1
            pieces.append(found)
            used.add(key)
        for key in set(self._decoded) - used:
            del self._decoded[key]
        return HandoffSet(
            program_obj.generation,
            program,
            _merge(pieces),
            tuple(digests),
            program_obj.changed_at,
        )


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
        services=tuple(e for p in pieces for e in p.services),
        service_verdicts=tuple(e for p in pieces for e in p.service_verdicts),
    )
