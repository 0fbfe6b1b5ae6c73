"""The time of a change, from the operator taking it in to the agent's histogram: the Store keeps
the earliest change no pass has taken, the publisher stamps it on the program objects of the
generation that carries it (and holds it for a node whose write failed), the annotation reads
back to the nanosecond, an object without it (or with a bad one) is accepted, and the histogram
renders cumulative buckets, sum and count; the agent observes each new generation once (not the
first after its start), a negative time (clock skew) as 0."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.agent.metrics import APPLY_BUCKETS, APPLY_SECONDS, Histogram
from stockade.agent.sync import Syncer
from stockade.control.publish import Publisher
from stockade.control.store import Store
from stockade.handoff import CHANGED_AT, HandoffSet, Shard, TableObject
from stockade.model.cluster import Namespace

# 2026-12-02T12:00:00Z and some nanoseconds
AT = 1_796_212_800 * handoff.objects.NANOS + 123_456_789


def test_a_time_reads_back_to_the_nanosecond() -> None:
    assert handoff.format_time(AT) == "2026-12-02T12:00:00.123456789Z"
    assert handoff.parse_time(handoff.format_time(AT)) == AT
    assert handoff.parse_time(handoff.format_time(AT - AT % handoff.objects.NANOS)) == (
        AT - AT % handoff.objects.NANOS
    )


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("2026-12-02T12:00:00Z", AT - 123_456_789),
        ("2026-12-02T12:00:00.5Z", AT - 123_456_789 + 500_000_000),
        ("2026-12-02T14:00:00.123456789+02:00", AT),
        ("2026-12-02t12:00:00.123456789z", AT),
    ],
)
def test_rfc3339_times_with_any_fraction_and_offset_are_read(text: str, nanos: int) -> None:
    assert handoff.parse_time(text) == nanos


@pytest.mark.parametrize(
    "value", ["", "yesterday", "2026-12-02 12:00:00Z", "2026-13-02T12:00:00Z", "1.5", 17, None]
)
def test_a_value_that_is_no_rfc3339_time_is_no_time(value: object) -> None:
    assert handoff.parse_time(value) is None


def program(changed_at: int | None = None, entries: tuple[str, ...] = ("p",)) -> TableObject:
    return TableObject.build("n0", handoff.PROGRAM, 0, 1, 3, Shard(entries), changed_at)


def test_a_program_object_carries_its_change_time_as_an_annotation_and_reads_it_back() -> None:
    body = program(AT).body()
    assert body["metadata"]["annotations"] == {CHANGED_AT: "2026-12-02T12:00:00.123456789Z"}
    assert TableObject.from_api(body).changed_at == AT
    assert TableObject.from_api(body) == program(AT)


@pytest.mark.parametrize("annotations", [None, {}, {CHANGED_AT: "soon"}, {"other": "x"}])
def test_an_object_without_a_readable_change_time_is_accepted_without_one(
    annotations: dict[str, str] | None,
) -> None:
    body = program().body()
    assert "annotations" not in body["metadata"]
    if annotations is not None:
        body["metadata"]["annotations"] = annotations
    read = TableObject.from_api(body)
    assert read.changed_at is None
    assert read.head() == program().head()


class Clock:
    def __init__(self) -> None:
        self.now = 1000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def test_the_store_hands_over_its_earliest_untaken_change_once() -> None:
    clock = Clock()
    store = Store(clock=clock)
    assert store.snapshot(take_changes=True).changed_at is None
    store.put_namespace("a", Namespace("a", {}))
    first = clock.now
    store.put_namespace("b", Namespace("b", {}))
    assert store.snapshot().changed_at is None  # a status-only pass takes nothing
    assert store.snapshot(take_changes=True).changed_at == first
    assert store.snapshot(take_changes=True).changed_at is None
    store.put_namespace("b", Namespace("b", {}))  # the same value: no change
    store.put_report("n0", {"appliedGeneration": 1})  # an agent's report: no table change
    assert store.snapshot(take_changes=True).changed_at is None
    store.put_namespace("b", None)
    assert store.snapshot(take_changes=True).changed_at == clock.now


class Objects:
    """The DatapathTable calls of CustomObjectsApi, in memory; writes for `failing` nodes fail."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.stored: dict[str, dict[str, Any]] = {}
        self.patches: dict[str, Mapping[str, Any]] = {}

    def _fail(self, body: Mapping[str, Any]) -> None:
        if body["metadata"]["name"].split(".")[0] in self.failing:
            raise ApiException(status=500, reason="Internal Server Error")

    def create_cluster_custom_object(self, *args: Any) -> dict[str, Any]:
        body = args[-1]
        self._fail(body)
        name = body["metadata"]["name"]
        meta = {**body["metadata"], "uid": name, "generation": 1, "resourceVersion": "1"}
        self.stored[name] = {**body, "metadata": meta}
        return self.stored[name]

    def patch_cluster_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        name, body = args[-2], args[-1]
        self._fail({"metadata": {"name": name}})
        self.patches[name] = body
        old = self.stored[name]["metadata"]
        annotations = {**old.get("annotations", {}), **body["metadata"]["annotations"]}
        meta = {
            **old,
            "annotations": {k: v for k, v in annotations.items() if v is not None},  # merge
            "generation": old["generation"] + 1,
        }
        self.stored[name] = {**body, "metadata": meta}
        return self.stored[name]

    def delete_cluster_custom_object(self, *args: Any, **_: Any) -> None:
        self.stored.pop(args[3], None)


def publisher() -> tuple[Publisher, Objects]:
    pub = Publisher(ApiClient())
    objects = Objects()
    pub._objects = objects  # type: ignore[assignment]
    return pub, objects


def parts(version: str) -> dict[str, handoff.Shards]:
    return {handoff.PROGRAM: {0: Shard((version,))}, handoff.POLICY: {0: Shard(("x",))}}


def stamps(plan: Any) -> dict[str, int | None]:
    return {w.name: w.changed_at for w in plan.writes}


def test_the_program_objects_of_a_generation_carry_its_change_time_and_the_shards_do_not() -> None:
    pub, objects = publisher()
    planned = pub.plan({"a": parts("1"), "b": parts("1")}, AT)
    assert stamps(planned) == {
        "a.policy.0": None,
        "b.policy.0": None,
        "a.program.0": AT,
        "b.program.0": AT,
    }
    pub.apply(planned)
    assert objects.stored["a.program.0"]["metadata"]["annotations"] == {
        CHANGED_AT: handoff.format_time(AT)
    }
    assert "annotations" not in objects.stored["a.policy.0"]["metadata"]
    # unchanged nodes are not written, so they carry nothing new
    assert stamps(pub.plan({"a": parts("1"), "b": parts("1")}, AT + 5)) == {}


def test_a_program_object_written_without_a_change_time_has_the_old_one_removed() -> None:
    pub, objects = publisher()
    pub.apply(pub.plan({"a": parts("1")}, AT))
    pub.apply(pub.plan({"a": parts("2")}, None))
    patch = objects.patches["a.program.0"]
    assert patch["metadata"]["annotations"] == {CHANGED_AT: None}  # merge patch: delete it
    assert TableObject.from_api(objects.stored["a.program.0"]).changed_at is None


def test_a_node_whose_write_failed_keeps_its_change_time_for_the_retry() -> None:
    pub, objects = publisher()
    pub.apply(pub.plan({"a": parts("1"), "b": parts("1")}, AT))
    objects.failing.add("b")
    with pytest.raises(ApiException):
        pub.apply(pub.plan({"a": parts("2"), "b": parts("2")}, AT + 10))
    assert pub.held == {"b": AT + 10}
    objects.failing.clear()
    later = pub.plan({"a": parts("3"), "b": parts("2")}, AT + 20)
    assert stamps(later)["b.program.0"] == AT + 10  # the earlier change it carries
    assert stamps(later)["a.program.0"] == AT + 20
    pub.apply(later)
    assert pub.held == {}
    assert TableObject.from_api(objects.stored["b.program.0"]).changed_at == AT + 10


def test_the_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    histogram = Histogram(APPLY_SECONDS, APPLY_BUCKETS)
    assert APPLY_BUCKETS[0] == 0.001
    assert APPLY_BUCKETS[-1] == 60.0
    for value in (0.0005, 0.001, 0.2, 3.0, 90.0):
        histogram.observe(value)
    lines = histogram.render().splitlines()
    assert lines[0] == "# TYPE stockade_agent_policy_apply_seconds histogram"
    buckets = dict(line.rsplit(" ", 1) for line in lines[1:] if "_bucket" in line)
    name = "stockade_agent_policy_apply_seconds_bucket"
    assert buckets[f'{name}{{le="0.001"}}'] == "2"  # le is inclusive
    assert buckets[f'{name}{{le="0.1"}}'] == "2"
    assert buckets[f'{name}{{le="0.25"}}'] == "3"
    assert buckets[f'{name}{{le="2.5"}}'] == "3"
    assert buckets[f'{name}{{le="5"}}'] == "4"
    assert buckets[f'{name}{{le="60"}}'] == "4"
    assert buckets[f'{name}{{le="+Inf"}}'] == "5"
    assert len(buckets) == len(APPLY_BUCKETS) + 1
    assert (
        lines[-2]
        == f"stockade_agent_policy_apply_seconds_sum {0.0005 + 0.001 + 0.2 + 3.0 + 90.0!r}"
    )
    assert lines[-1] == "stockade_agent_policy_apply_seconds_count 5"


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="buckets must increase"):
        Histogram("x", (1.0, 0.5))


def test_the_agent_observes_each_new_generation_once_from_its_change_time() -> None:
    none = cast(Any, None)
    now = AT + 250_000_000
    syncer = Syncer(
        "n0", dict, none, none, None, Path("/sys/fs/bpf/unused"), wall_clock=lambda: now
    )

    def applied(generation: int, changed_at: int | None) -> HandoffSet:
        return HandoffSet(generation, none, none, (), changed_at)

    syncer.observe_applied(-1, applied(3, AT))  # the first after a start: maybe applied before
    syncer.observe_applied(3, applied(3, AT))  # the same generation again
    syncer.observe_applied(3, applied(4, None))  # no change time
    assert syncer.apply_seconds.count == 0
    syncer.observe_applied(4, applied(5, AT))
    assert (syncer.apply_seconds.count, syncer.apply_seconds.sum) == (1, 0.25)
    syncer.observe_applied(5, applied(6, now + 5_000_000))  # the operator's clock is ahead
    assert (syncer.apply_seconds.count, syncer.apply_seconds.sum) == (2, 0.25)
