"""What to write: the desired DatapathTables of every node against what is already published.

Pure: the publisher passes what it last saw on the API server (`TableHead`s, from its own writes
and from listing the objects when it became leader) and the encoded parts of every node; the
result lists only objects whose content differs, so write volume follows the change, and an
operator that restarts with nothing changed writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stockade import handoff
from stockade.handoff import TableHead, TableObject

NodeParts = Mapping[str, handoff.Shards]  # part -> shard -> Shard (entries and digest)


@dataclass(frozen=True)
class Plan:
    writes: tuple[TableObject, ...]  # written together (see publish.py)
    deletes: tuple[str, ...]
    generations: Mapping[str, int]  # node -> its program generation after this plan

    @property
    def empty(self) -> bool:
        return not self.writes and not self.deletes


def plan(
    published: Mapping[str, TableHead],
    desired: Mapping[str, NodeParts],
    generation: int,
) -> Plan:
    """Objects to write (at `generation`) and to delete, so that the API server holds exactly
    `desired`; nodes whose content is unchanged keep their generation, also when one of their
    shards is written back. Compares the digests the
    shards carry: nothing is hashed here."""
    tables: list[TableObject] = []
    programs: list[TableObject] = []
    wanted: set[str] = set()
    generations: dict[str, int] = {}
    for node, parts in sorted(desired.items()):
        changed: list[tuple[str, int, int, handoff.Shard]] = []
        for part, shards in parts.items():
            for number, shard in shards.items():
                name = handoff.object_name(node, part, number)
                wanted.add(name)
                have = published.get(name)
                if have is None or have.digest != shard.digest:
                    changed.append((part, number, len(shards), shard))
        program = published.get(handoff.program_name(node))
        generations[node] = program.generation if program is not None else 0
        if not changed:
            continue
        # The program object's manifest names every shard's digest: while it is unchanged, so is
        # the node's content, and a shard written anyway (deleted or edited by someone else) is
        # restored at the node's generation, which its agent applied or is applying.
        restored = program is not None and all(c[0] != handoff.PROGRAM for c in changed)
        at = generations[node] if restored else generation
        generations[node] = at
        for part, number, count, shard in changed:
            target = programs if part == handoff.PROGRAM else tables
            target.append(TableObject.build(node, part, number, count, at, shard))
    deletes = tuple(sorted(n for n in published if n not in wanted))
    return Plan(tuple(tables + programs), deletes, generations)
