"""A pass whose publish fails for one object still writes the policy statuses, carries the
policies at the plan's generations (so the failed node stays Pending), and then fails, so that
the runner runs it again. Before, the failure left the pass before the statuses: one object the
API server refused (too large) stopped every status write in the cluster. A lowering pass hands
the plan the time of the earliest change it takes over; a status pass takes none."""

from __future__ import annotations

import time
from collections.abc import Mapping

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from stockade.control.plan import Plan
from stockade.control.reconciler import Reconciler
from stockade.control.store import Changes, Store, View
from stockade.control.worker import Result
from stockade.model.cluster import Namespace

TOO_LARGE = 413


class Publisher:
    generations: Mapping[str, int] = {"fine": 2, "broken": 1}
    stale = False

    def plan(self, desired: object, changed_at: int | None = None) -> Plan:
        return Plan((), (), {"fine": 2, "broken": 2})

    def apply(self, plan: Plan, partial: bool = False) -> None:
        raise ApiException(status=TOO_LARGE, reason="Request entity too large")


class Reporter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, int]]] = []

    def carried(self, snap: View, generations: Mapping[str, int]) -> None:
        self.calls.append(("carried", dict(generations)))

    def report(self, snap: View, generations: Mapping[str, int], selected: object) -> None:
        self.calls.append(("report", dict(generations)))


class Lowering:
    """Lowers nothing."""

    def lower(self, changes: Changes, full: object, stream: object = None) -> Result:
        return Result({}, (), {}, (), full=False)

    def close(self) -> None:
        pass


def test_a_failed_write_still_writes_the_statuses_then_fails_the_pass() -> None:
    reconciler = Reconciler(Store(), ApiClient())
    reporter = Reporter()
    reconciler.publisher = Publisher()  # type: ignore[assignment]
    reconciler.reporter = reporter  # type: ignore[assignment]
    reconciler._synced, reconciler._listed_at = True, time.monotonic()
    reconciler.lowering = Lowering()
    with pytest.raises(ApiException) as failed:
        reconciler.run(tables=True)
    assert failed.value.status == TOO_LARGE
    # The broken node carries the policies at the generation it did not get: Pending there.
    assert reporter.calls == [
        ("carried", {"fine": 2, "broken": 2}),
        ("report", {"fine": 2, "broken": 1}),
    ]


class Planning(Publisher):
    """Records the change time each plan was given; writes succeed."""

    def __init__(self) -> None:
        self.changed: list[int | None] = []

    def plan(self, desired: object, changed_at: int | None = None) -> Plan:
        self.changed.append(changed_at)
        return Plan((), (), {})

    def apply(self, plan: Plan, partial: bool = False) -> None:
        pass


def test_a_lowering_pass_hands_the_earliest_change_to_the_plan_and_a_status_pass_keeps_it() -> None:
    ticks = iter(range(100, 200))
    store = Store(clock=lambda: next(ticks))
    reconciler = Reconciler(store, ApiClient())
    publisher = Planning()
    reconciler.publisher = publisher  # type: ignore[assignment]
    reconciler.reporter = Reporter()  # type: ignore[assignment]
    reconciler._synced, reconciler._listed_at = True, time.monotonic()
    reconciler.lowering = Lowering()
    store.put_namespace("a", Namespace("a"))
    store.put_namespace("b", Namespace("b"))
    reconciler.run(tables=False)  # a status pass: no plan, the change stays for the next
    reconciler.run(tables=True)
    reconciler.run(tables=True)
    assert publisher.changed == [100, None]


def test_a_pass_is_shown_running_while_it_runs_and_not_after_it_ends_or_fails() -> None:
    """A long pass moves no counter until it ends: `running` says one is under way."""
    reconciler = Reconciler(Store(), ApiClient())
    seen: list[bool] = []

    class Watching(Reporter):
        def report(self, snap: View, generations: Mapping[str, int], selected: object) -> None:
            seen.append(reconciler.stats.running)

    reconciler.reporter = Watching()  # type: ignore[assignment]
    reconciler._synced, reconciler._listed_at = True, time.monotonic()
    reconciler.lowering = Lowering()
    reconciler.publisher = Planning()  # type: ignore[assignment]
    assert not reconciler.stats.running
    reconciler.run(tables=True)
    assert (seen, reconciler.stats.running, reconciler.stats.passes) == ([True], False, 1)
    reconciler.publisher = Publisher()  # type: ignore[assignment]
    with pytest.raises(ApiException):
        reconciler.run(tables=True)
    assert (seen, reconciler.stats.running) == ([True, True], False)


def test_the_pass_that_first_publishes_a_change_records_when_it_began_and_ended() -> None:
    """`published_pass_began` and `published_at` bracket the pass that first carried the
    latest change; a pass with nothing new leaves both as they were."""
    store = Store()
    reconciler = Reconciler(store, ApiClient())
    reconciler.publisher = Planning()  # type: ignore[assignment]
    reconciler.reporter = Reporter()  # type: ignore[assignment]
    reconciler._synced, reconciler._listed_at = True, time.monotonic()
    reconciler.lowering = Lowering()
    store.put_namespace("a", Namespace("a"))
    before = time.time()
    reconciler.run(tables=True)
    stats = reconciler.stats
    assert before <= stats.published_pass_began <= stats.published_at <= time.time()
    assert stats.published_inputs == store.latest_change
    first = (stats.published_pass_began, stats.published_at)
    reconciler.run(tables=True)  # nothing changed since
    assert stats.began_at > first[0]
    assert (stats.published_pass_began, stats.published_at) == first
