"""The runner as the operator's reconcile uses it: a request after a quiet period runs at once,
bursts are held back by the minimum interval, a status-only request never lowers and never holds
back a lowering, requests coalesce, and a failed pass is retried with what it was asked to do.

No timed assertions: the intervals are either zero or far longer than any test, and a wait that
would only end after a long interval shows up as a pass that never comes (`WAIT` is a liveness
bound, not a measure).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import pytest

from stockade.runtime.runner import Runner

WAIT = 20.0  # seconds a pass that should run at once may take to show up on a busy machine
LONG = 3600.0  # an interval no test waits for


class Calls:
    """What the runner called, with an event per call index."""

    def __init__(self, fail_first: int = 0) -> None:
        self.tables: list[bool] = []
        self._fail = fail_first
        self._cond = threading.Condition()
        self.release = threading.Event()  # passes block until this is set
        self.release.set()

    def __call__(self, tables: bool) -> None:
        with self._cond:
            self.tables.append(tables)
            self._cond.notify_all()
        self.release.wait()
        if self._fail:
            self._fail -= 1
            raise RuntimeError("the API server said no")

    def wait_for(self, count: int) -> list[bool]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.tables) >= count, WAIT), self.tables
            return list(self.tables)


@pytest.fixture
def calls() -> Calls:
    return Calls()


MakeRunner = Callable[..., Runner]


@pytest.fixture
def make_runner(calls: Calls) -> Iterator[MakeRunner]:
    """Started runners around `calls`, stopped after the test."""
    started: list[Runner] = []

    def make(**settings: float) -> Runner:
        runner = Runner(calls, **settings)
        started.append(runner)
        runner.start()
        return runner

    yield make
    calls.release.set()
    for runner in started:
        runner.stop()


def test_a_request_after_a_quiet_period_runs_without_the_debounce(
    make_runner: MakeRunner, calls: Calls
) -> None:
    runner = make_runner(debounce=LONG, min_interval=LONG)
    runner.request(True)
    assert calls.wait_for(1) == [True]


def test_a_second_lowering_within_the_minimum_interval_waits_for_it(
    make_runner: MakeRunner, calls: Calls
) -> None:
    runner = make_runner(debounce=0.0, min_interval=LONG)
    runner.request(True)
    calls.wait_for(1)
    runner.request(True)
    runner.stop()
    assert calls.tables == [True]


def test_a_status_only_pass_does_not_hold_back_the_next_lowering(
    make_runner: MakeRunner, calls: Calls
) -> None:
    runner = make_runner(debounce=0.0, min_interval=LONG)
    runner.request(False)
    assert calls.wait_for(1) == [False]
    runner.request(True)
    assert calls.wait_for(2) == [False, True]


def test_a_status_only_request_right_after_a_pass_waits_for_the_minimum_interval(
    make_runner: MakeRunner, calls: Calls
) -> None:
    runner = make_runner(debounce=0.0, min_interval=LONG)
    runner.request(True)
    calls.wait_for(1)
    runner.request(False)
    runner.stop()
    assert calls.tables == [True]


def test_requests_during_a_pass_coalesce_into_one_lowering_pass(
    make_runner: MakeRunner, calls: Calls
) -> None:
    calls.release.clear()
    runner = make_runner(debounce=0.0, min_interval=0.0)
    runner.request(False)
    calls.wait_for(1)
    for tables in (False, True, False, False):
        runner.request(tables)
    calls.release.set()
    assert calls.wait_for(2) == [False, True]
    runner.stop()
    assert calls.tables == [False, True]


def test_a_failed_pass_is_retried_with_what_it_was_asked_to_do() -> None:
    failing = Calls(fail_first=1)
    runner = Runner(failing, debounce=0.0, min_interval=0.0, min_backoff=0.0, max_backoff=0.0)
    runner.start()
    try:
        runner.request(True)
        assert failing.wait_for(2) == [True, True]
        assert runner.failures == 1
    finally:
        runner.stop()


def test_nothing_runs_without_a_request_until_the_resync_period(
    make_runner: MakeRunner, calls: Calls
) -> None:
    runner = make_runner(debounce=0.0, min_interval=0.0, resync=LONG)
    runner.stop()
    assert calls.tables == []


def test_the_periodic_pass_lowers(make_runner: MakeRunner, calls: Calls) -> None:
    make_runner(debounce=0.0, min_interval=LONG, resync=0.0)
    assert calls.wait_for(1) == [True]


def test_a_failed_pass_is_logged_as_a_failed_task_with_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = Calls(fail_first=1)
    runner = Runner(
        failing, task="reconcile", debounce=0.0, min_interval=0.0, min_backoff=0.0, max_backoff=0.0
    )
    with caplog.at_level(logging.WARNING, logger="stockade.runtime.runner"):
        runner.start()
        try:
            runner.request(True)
            failing.wait_for(2)
        finally:
            runner.stop()
    assert "reconcile failed (retry in 0.0s): the API server said no" in caplog.text
