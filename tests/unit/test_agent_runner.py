"""The runner as the agent's sync uses it: a request after a quiet period runs at once, a sync that
did work holds the next one back for the minimum interval, a sync that did nothing (an incomplete
set, or the set already applied) does not, and a failed sync is retried.

No timed assertions: the intervals are either zero or far longer than any test, and a sync held
back by a long interval shows up as a sync that never comes (`WAIT` is a liveness bound).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockade.runtime.runner import Runner

WAIT = 20.0  # seconds a sync that should run at once may take to show up on a busy machine
LONG = 3600.0  # an interval no test waits for


class Syncs:
    """A sync function that returns the given results in turn (then True), counting calls."""

    def __init__(self, *results: bool | Exception) -> None:
        self._results = list(results)
        self._cond = threading.Condition()
        self.count = 0

    def __call__(self, full: bool = True) -> bool:
        with self._cond:
            self.count += 1
            self._cond.notify_all()
            result = self._results.pop(0) if self._results else True
        if isinstance(result, Exception):
            raise result
        return result

    def wait_for(self, count: int) -> int:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= count, WAIT), self.count
            return self.count


MakeRunner = Callable[..., Runner]


@pytest.fixture
def make_runner() -> Iterator[MakeRunner]:
    """Started runners, stopped after the test."""
    started: list[Runner] = []

    def make(fn: Syncs, **settings: Any) -> Runner:
        runner = Runner(fn, **settings)
        started.append(runner)
        runner.start()
        return runner

    yield make
    for runner in started:
        runner.stop()


def test_the_first_request_runs_at_once(make_runner: MakeRunner) -> None:
    syncs = Syncs()
    make_runner(syncs, min_interval=LONG).request()
    assert syncs.wait_for(1) == 1


def test_a_sync_that_did_work_holds_back_the_next_for_the_minimum_interval(
    make_runner: MakeRunner,
) -> None:
    syncs = Syncs(True)
    runner = make_runner(syncs, min_interval=LONG)
    runner.request()
    syncs.wait_for(1)
    runner.request()
    runner.stop()
    assert syncs.count == 1


def test_a_sync_that_did_nothing_does_not_hold_back_the_next(make_runner: MakeRunner) -> None:
    syncs = Syncs(False)  # an incomplete set, or the set already applied
    runner = make_runner(syncs, min_interval=LONG)
    runner.request()
    syncs.wait_for(1)
    runner.request()
    assert syncs.wait_for(2) == 2


def test_requests_during_a_sync_coalesce_into_one_more_sync() -> None:
    release = threading.Event()
    syncs = Syncs()

    def blocking(full: bool) -> bool:
        result = syncs()
        release.wait()
        return result

    runner = Runner(blocking, min_interval=0.0)
    runner.start()
    try:
        runner.request()
        syncs.wait_for(1)
        for _ in range(5):
            runner.request()
        release.set()
        syncs.wait_for(2)
    finally:
        runner.stop()
    assert syncs.count == 2


def test_a_failed_sync_is_retried_and_counted(make_runner: MakeRunner) -> None:
    syncs = Syncs(RuntimeError("the kernel said no"))
    runner = make_runner(syncs, min_interval=0.0, min_backoff=0.0)
    runner.request()
    assert syncs.wait_for(2) == 2
    runner.stop()
    assert (runner.failures, runner.consecutive_failures, runner.runs) == (1, 0, 1)
