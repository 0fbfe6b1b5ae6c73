"""The publish plan writes only what differs, keeps unchanged nodes' generations, writes table
shards before the manifests that name them, and deletes what nothing references."""

from __future__ import annotations

from stockade import handoff
from stockade.control.plan import plan
from stockade.handoff import Shard, TableHead


def _parts(policy: tuple[str, ...]) -> dict[str, handoff.Shards]:
    return {
        handoff.PROGRAM: {0: Shard(("shape ipv6 1", f"shard policy 0 {handoff.digest(policy)}"))},
        handoff.POLICY: {0: Shard(policy)},
    }


def _published(node: str, parts: dict[str, handoff.Shards], gen: int) -> dict[str, TableHead]:
    return {
        handoff.object_name(node, part, number): TableHead(
            handoff.object_name(node, part, number),
            node,
            part,
            number,
            len(shards),
            gen,
            handoff.digest(shard.entries),
        )
        for part, shards in parts.items()
        for number, shard in shards.items()
    }


def test_nothing_is_written_when_nothing_changed() -> None:
    parts = _parts(("1 0 64 1 0 0 1 0 0 0",))
    result = plan(_published("a", parts, 4), {"a": parts}, 5)
    assert result.empty and result.generations == {"a": 4}


def test_a_changed_shard_is_written_before_its_manifest_at_the_new_generation() -> None:
    old, new = _parts(("1 0 64 1 0 0 1 0 0 0",)), _parts(("1 0 64 1 0 0 2 0 0 0",))
    published = {**_published("a", old, 4), **_published("b", old, 4)}
    result = plan(published, {"a": new, "b": old}, 5)
    names = [w.name for w in result.writes]
    assert names == ["a.policy.0", "a.program.0"]
    assert {w.generation for w in result.writes} == {5}
    assert result.generations == {"a": 5, "b": 4}
    assert result.writes[0].body()["metadata"]["labels"] == {
        handoff.NODE_LABEL: "a",
        handoff.PART_LABEL: handoff.POLICY,
    }


def test_objects_of_a_node_that_is_gone_are_deleted() -> None:
    parts = _parts(("1 0 64 1 0 0 1 0 0 0",))
    result = plan(_published("gone", parts, 2), {}, 3)
    assert result.deletes == ("gone.policy.0", "gone.program.0") and not result.writes


def test_a_shard_written_back_keeps_the_nodes_generation() -> None:
    parts = _parts(("1 0 64 1 0 0 1 0 0 0",))
    published = _published("a", parts, 4)
    del published["a.policy.0"]  # deleted, or edited, by someone else: forgotten
    result = plan(published, {"a": parts}, 5)
    assert [(w.name, w.generation) for w in result.writes] == [("a.policy.0", 4)]
    assert result.generations == {"a": 4}  # the manifest the agent applied is unchanged


def test_a_program_object_written_back_gets_the_new_generation() -> None:
    parts = _parts(("1 0 64 1 0 0 1 0 0 0",))
    published = _published("a", parts, 4)
    del published["a.program.0"]
    result = plan(published, {"a": parts}, 5)
    assert [(w.name, w.generation) for w in result.writes] == [("a.program.0", 5)]
    assert result.generations == {"a": 5}
