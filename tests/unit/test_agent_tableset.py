"""The agent's `Assembler`: a node's DatapathTable objects become one complete set, whether the
tables come in shards listed by the program object's manifest or inline in the program object;
an incomplete or inconsistent publication is never assembled."""

from __future__ import annotations

import pytest

from stockade import handoff
from stockade.handoff import Assembler, HandoffError, IncompleteError, TableObject
from tests.fixtures.handoff_tables import NODE, same, tables


def objects(port: int, generation: int, inline_max: int) -> dict[str, TableObject]:
    parts = handoff.encode(tables(port), inline_max=inline_max)
    built = (
        TableObject.build(NODE, part, number, len(shards), generation, shard).body()
        for part, shards in parts.items()
        for number, shard in shards.items()
    )
    return {o["metadata"]["name"]: TableObject.from_api(o) for o in built}


PROGRAM = handoff.object_name(NODE, handoff.PROGRAM, 0)


def test_inline_tables_are_complete_with_the_program_object_alone() -> None:
    found = objects(80, 1, handoff.INLINE_ENTRIES)
    assert list(found) == [PROGRAM]
    assembled = Assembler(NODE).assemble(found)
    assert assembled.generation == 1 and same(assembled.tables, tables(80))


def test_shards_are_complete_only_when_every_listed_shard_has_its_digest() -> None:
    old, new = objects(80, 1, 0), objects(443, 2, 0)
    assembler = Assembler(NODE)
    assert same(assembler.assemble(old).tables, tables(80))
    ahead = {**old, PROGRAM: new[PROGRAM]}  # the manifest before its shards
    with pytest.raises(IncompleteError, match="the manifest"):
        assembler.assemble(ahead)
    missing = {n: o for n, o in new.items() if ".rules." not in n}
    with pytest.raises(IncompleteError, match="is not published"):
        assembler.assemble(missing)
    assert same(assembler.assemble(new).tables, tables(443))


def test_a_node_that_shrinks_to_inline_ignores_its_old_shards() -> None:
    sharded, inline = objects(80, 1, 0), objects(443, 2, handoff.INLINE_ENTRIES)
    assembled = Assembler(NODE).assemble({**sharded, **inline})  # stale shards not yet deleted
    assert assembled.generation == 2 and same(assembled.tables, tables(443))


def test_inline_entries_that_do_not_match_the_digest_are_refused() -> None:
    found = objects(80, 1, handoff.INLINE_ENTRIES)
    program = found[PROGRAM]
    tampered = TableObject(
        program.name,
        program.node,
        program.part,
        program.shard,
        program.shards,
        program.generation,
        program.digest,
        (*program.entries[:-1], "rules 1 NetworkPolicy.networking.k8s.io x evil Ingress 0"),
    )
    with pytest.raises(HandoffError, match="do not match its digest"):
        Assembler(NODE).assemble({PROGRAM: tampered})


def test_an_unchanged_inline_set_is_decoded_once() -> None:
    assembler = Assembler(NODE)
    found = objects(80, 1, handoff.INLINE_ENTRIES)
    assembler.assemble(found)
    assembler.assemble(found)
    assert assembler.decodes == 1
