"""What to write: the desired DatapathTables of every node against what is already published.

Pure: the reconciler passes what it last saw on the API server (`Published`, from its own writes
and from listing the objects when it became leader) and the encoded parts of every node; the
result lists only objects whose content differs, so write volume follows the change, and an
operator that restarts with nothing changed writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.compiler import handoff
from stockade.model.crd import API_VERSION, DATAPATH_TABLE

NodeParts = Mapping[str, handoff.Shards]  # part -> shard -> entries


@dataclass(frozen=True)
class Published:
    """One DatapathTable as it stands on the API server."""

    name: str
    node: str
    part: str
    shard: int
    digest: str
    generation: int


@dataclass(frozen=True)
class Plan:
    writes: tuple[dict[str, Any], ...]  # whole objects, written together (see publish.py)
    deletes: tuple[str, ...]
    generations: Mapping[str, int]  # node -> its program generation after this plan

    @property
    def empty(self) -> bool:
        return not self.writes and not self.deletes


def table_object(
    node: str, part: str, shard: int, shards: int, generation: int, entries: tuple[str, ...]
) -> dict[str, Any]:
    """The DatapathTable object of one shard."""
    return {
        "apiVersion": API_VERSION,
        "kind": DATAPATH_TABLE.kind,
        "metadata": {
            "name": handoff.object_name(node, part, shard),
            "labels": {handoff.NODE_LABEL: node, handoff.PART_LABEL: part},
        },
        "spec": {
            "node": node,
            "part": part,
            "shard": shard,
            "shards": shards,
            "generation": generation,
            "digest": handoff.digest(entries),
            "entries": list(entries),
        },
    }


def plan(
    published: Mapping[str, Published],
    desired: Mapping[str, NodeParts],
    generation: int,
) -> Plan:
    """Objects to write (at `generation`) and to delete, so that the API server holds exactly
    `desired`; nodes whose content is unchanged keep their generation."""
    tables: list[dict[str, Any]] = []
    programs: list[dict[str, Any]] = []
    wanted: set[str] = set()
    generations: dict[str, int] = {}
    for node, parts in sorted(desired.items()):
        changed: list[tuple[str, int, int, tuple[str, ...]]] = []
        for part, shards in parts.items():
            for shard, entries in shards.items():
                name = handoff.object_name(node, part, shard)
                wanted.add(name)
                have = published.get(name)
                if have is None or have.digest != handoff.digest(entries):
                    changed.append((part, shard, len(shards), entries))
        program = published.get(handoff.object_name(node, handoff.PROGRAM, 0))
        generations[node] = program.generation if program is not None and not changed else 0
        if not changed:
            continue
        generations[node] = generation
        for part, shard, count, entries in changed:
            target = programs if part == handoff.PROGRAM else tables
            target.append(table_object(node, part, shard, count, generation, entries))
    deletes = tuple(sorted(n for n in published if n not in wanted))
    return Plan(tuple(tables + programs), deletes, generations)
