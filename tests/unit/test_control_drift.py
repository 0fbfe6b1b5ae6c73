"""Drift is told from a watched DatapathTable without a round trip: our own writes, late events
of them and the agent's status writes are not drift; a spec someone else wrote is, whether or not
they recomputed the digest, and so is a removed label or an object made again under our name.
The publisher forgets what drifted (keeping the version it saw, for the rewrite's precondition)
and follows status writes' versions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from kubernetes.client import ApiClient

from stockade import handoff
from stockade.control.drift import Stamp, drifted, holds
from stockade.control.publish import Publisher
from stockade.handoff import TableObject

ENTRIES = ("1 0 64 1 0 0 1 0 0 0", "1 0 64 1 0 0 2 0 0 0")
TABLE = TableObject("a.policy.0", "a", handoff.POLICY, 0, 1, 4, handoff.digest(ENTRIES), ENTRIES)
OURS = Stamp("uid-1", 7, "100")


def watched(
    table: TableObject = TABLE, uid: str = "uid-1", generation: int = 7, version: str = "100"
) -> dict[str, Any]:
    obj = table.body()
    obj["metadata"] |= {"uid": uid, "generation": generation, "resourceVersion": version}
    return obj


EDITED = dataclasses.replace(TABLE, entries=ENTRIES[:1])


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (watched(), False),
        (watched(version="120"), False),  # the agent wrote its status
        (watched(dataclasses.replace(TABLE, generation=3), generation=6, version="90"), False),
        (watched(EDITED, generation=8, version="130"), True),  # entries, digest left stale
        (
            watched(
                dataclasses.replace(EDITED, digest=handoff.digest(EDITED.entries)), generation=8
            ),
            True,
        ),  # entries and a recomputed digest
        (watched(dataclasses.replace(TABLE, generation=9), generation=8), True),
        (watched(uid="uid-2", generation=1), False),  # made again, with the same content
        (watched(EDITED, uid="uid-2", generation=1), True),  # made again, other content
        ({**watched(generation=8), "spec": {"node": "a"}}, True),  # not a table any more
    ],
    ids=[
        "our-write",
        "status-write",
        "late-event",
        "entries-edited",
        "digest-recomputed",
        "generation-edited",
        "recreated-same",
        "recreated-other",
        "garbage",
    ],
)
def test_a_watched_table_has_drifted_only_when_someone_else_changed_what_it_holds(
    obj: dict[str, Any], expected: bool
) -> None:
    assert drifted(TABLE.head(), OURS, obj) is expected


def test_a_removed_label_is_drift_even_in_our_own_version() -> None:
    obj = watched(version="140")
    del obj["metadata"]["labels"][handoff.NODE_LABEL]
    assert drifted(TABLE.head(), OURS, obj)
    assert not holds(TABLE.head(), obj)


def test_without_a_known_version_the_content_decides() -> None:
    assert not drifted(TABLE.head(), None, watched(generation=50))
    assert drifted(TABLE.head(), None, watched(EDITED, generation=50))


def test_an_object_without_metadata_has_no_stamp() -> None:
    assert Stamp.from_api({"metadata": {"name": "x"}}) is None
    assert Stamp.from_api(watched()) == OURS


def publisher() -> Publisher:
    published = Publisher(ApiClient())
    published.published[TABLE.name] = TABLE.head()
    published.stamps[TABLE.name] = OURS
    return published


def test_the_publisher_forgets_a_drifted_table_and_keeps_the_version_it_saw() -> None:
    pub = publisher()
    assert pub.observe(watched(EDITED, generation=8, version="130"))
    assert TABLE.name not in pub.published
    assert pub.stamps[TABLE.name] == Stamp("uid-1", 8, "130")  # the rewrite is fenced by it
    assert not pub.observe(watched(EDITED, generation=8, version="130"))  # forgotten already


def test_the_publisher_follows_status_writes_and_ignores_late_events() -> None:
    pub = publisher()
    assert not pub.observe(watched(version="120"))
    assert pub.stamps[TABLE.name] == Stamp("uid-1", 7, "120")
    old = dataclasses.replace(TABLE, generation=3)
    assert not pub.observe(watched(old, generation=6, version="90"))
    assert pub.stamps[TABLE.name] == Stamp("uid-1", 7, "120")
    assert TABLE.name in pub.published


def test_tables_the_publisher_did_not_publish_are_not_its_concern() -> None:
    pub = Publisher(ApiClient())
    assert not pub.observe(watched(EDITED, generation=8))


class EchoingObjects:
    """A CustomObjectsApi whose watch delivers each write's event (and then whatever `after`
    sends, such as the agent's status write) before the write's answer, as a server does."""

    def __init__(self, pub: Publisher, after: list[dict[str, Any]]) -> None:
        self.pub = pub
        self.after = after
        self.drift: list[bool] = []
        self.version = 200

    def patch_cluster_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        body = args[-1]
        stored = watched(TableObject.from_api(body), generation=8, version=str(self.version))
        self.drift.append(self.pub.observe(stored))
        for event in self.after:
            self.drift.append(self.pub.observe(event))
        return stored

    def delete_cluster_custom_object(self, *args: Any, **_: Any) -> None:
        self.drift.append(self.pub.observe_deleted(args[-1]))


NEW = dataclasses.replace(
    TABLE, generation=2, entries=ENTRIES[:1], digest=handoff.digest(ENTRIES[:1])
)


@pytest.mark.parametrize(
    ("after", "drift"),
    [
        ([], [False]),
        ([watched(NEW, generation=8, version="210")], [False, False]),  # the agent's status
        ([watched(EDITED, generation=9, version="220")], [False, True]),  # someone else's
    ],
    ids=["echo", "echo-then-status", "echo-then-edit"],
)
def test_the_event_of_a_write_that_arrives_before_its_answer_is_not_drift(
    after: list[dict[str, Any]], drift: list[bool]
) -> None:
    pub = publisher()
    api = EchoingObjects(pub, after)
    pub._objects = api  # type: ignore[assignment]
    assert pub._write(NEW) is None
    assert api.drift == drift
    if True in drift:  # forgotten, at the version seen: the next plan writes it again
        assert TABLE.name not in pub.published
        assert pub.stamps[TABLE.name] == Stamp("uid-1", 9, "220")
    else:
        assert pub.published[TABLE.name] == NEW.head()  # recorded by the write's answer
    assert pub._writing == {}
    assert pub._spoiled == set()


def test_the_event_of_a_delete_that_arrives_before_its_answer_is_not_drift() -> None:
    pub = publisher()
    api = EchoingObjects(pub, [])
    pub._objects = api  # type: ignore[assignment]
    assert pub._delete(TABLE.name) is None
    assert api.drift == [False]
    assert TABLE.name not in pub.published
    assert pub.observe_deleted(TABLE.name) is False  # forgotten: not ours any more
    pub.published[TABLE.name] = TABLE.head()
    assert pub.observe_deleted(TABLE.name) is True  # someone else deleted it
