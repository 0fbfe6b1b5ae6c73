"""The DatapathTable object reads back as it was built, a program object's status is found for
its node, and an object that breaks the CRD's schema is refused naming the field."""

from __future__ import annotations

import pytest

from stockade import handoff
from stockade.handoff import HandoffError, Shard, TableObject


def test_an_object_reads_back_as_it_was_built_with_the_shards_digest() -> None:
    shard = Shard(("1 0 64 1 0 0 1 0 0 0",))
    built = TableObject.build("n0", handoff.POLICY, 1, 2, 7, shard)
    body = built.body()
    assert body["metadata"]["name"] == "n0.policy.1"
    assert body["metadata"]["labels"] == {handoff.NODE_LABEL: "n0", handoff.PART_LABEL: "policy"}
    read = TableObject.from_api(body)
    assert read == built
    assert read.digest == read.content_digest == handoff.digest(shard.entries)


SPEC = {"node": "n0", "part": "policy", "shard": 0, "shards": 1, "generation": 1, "digest": ""}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({k: v for k, v in SPEC.items() if k != "node"}, "spec.node"),
        ({**SPEC, "part": "sideways"}, "spec.part"),
        ({**SPEC, "entries": [1]}, "spec.entries.0"),
    ],
    ids=["missing-node", "unknown-part", "entry-not-a-string"],
)
def test_an_object_that_breaks_the_schema_is_refused_naming_the_field(
    spec: dict[str, object], field: str
) -> None:
    with pytest.raises(HandoffError, match=f"DatapathTable n0.policy.0: {field}"):
        TableObject.from_api({"metadata": {"name": "n0.policy.0"}, "spec": spec})


def test_only_a_program_object_carries_its_nodes_report() -> None:
    program = TableObject.build("n0", handoff.PROGRAM, 0, 1, 3, Shard(())).body()
    status = {"appliedGeneration": 3}
    assert handoff.program_report({**program, "status": status}) == ("n0", status)
    assert handoff.applied_generation(status) == 3
    shard = TableObject.build("n0", handoff.RULES, 0, 1, 3, Shard(())).body()
    assert handoff.program_report(shard) is None
