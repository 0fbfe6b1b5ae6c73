"""The rate-limited runner of the operator's reconcile pass and of the agent's sync.

Events only `request()` a run; one thread runs `fn(full)`, retries a failed run with exponential
backoff (from `min_backoff`, capped at `max_backoff`; equal values retry at a fixed delay; a new
request does not cut a backoff short, so a failing kernel or API is not hammered) with what it
was asked to do, and runs a full run every `resync` seconds even when nothing was requested
(kubernetes-sigs/kube-network-policies `pkg/runner`, BoundedFrequencyRunner, in spirit).

`full` tells the run whether its inputs changed (the operator lowers) or only a cheaper look is
wanted (the operator's status-only pass); requests coalesce, and a pending full request is never
downgraded. The agent only ever asks for full runs.

A request after a quiet period runs at once: a lone `kubectl apply` is not made to wait. Only
bursts are limited: a full run starts at least `min_interval` after the previous full run, and
any other at least `min_interval` after the previous run of any kind (so a cheap run never delays
the next full one). A run that returns False did nothing (the agent's published set was still
incomplete, or was the one already applied) and does not count against the minimum interval, so
the event that completes a set is applied at once. A request that has to wait for the limit also
waits at least `debounce` after it arrived, so that a burst that is still arriving goes into one
run. Everything requested while a run runs or waits goes into the next run.

`stockade.control.app` builds one Runner around `Reconciler.run`, `stockade.agent.app` one around
`Syncer.sync`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

NEVER = float("-inf")


class Runner:
    def __init__(
        self,
        fn: Callable[[bool], bool | None],
        *,
        name: str = "stockade-runner",
        task: str = "run",
        debounce: float = 0.0,
        min_interval: float = 0.1,
        resync: float = 300.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self._fn = fn
        self._task = task  # what the logs call one run: "reconcile failed", "sync failed"
        self._debounce = debounce
        self._min_interval = min_interval
        self._resync = resync
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._cond = threading.Condition()
        self._pending: bool | None = None  # None: nothing requested; else "full"
        self._since = 0.0  # when the first pending request arrived
        self._requested = 0.0  # the same, for the run under way
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._last_full = NEVER  # start of the last full run that did work
        self._last_any = NEVER  # start of the last run of any kind that did work
        self.runs = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error = ""

    def request(self, full: bool = True) -> None:
        """Ask for a run (never blocks); `full=False` asks only for the cheaper look."""
        with self._cond:
            if self._pending is None:
                self._since = time.monotonic()
            self._pending = bool(self._pending) or full
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _due(self) -> float:
        """When the pending request may run (called with the lock held)."""
        limit = (self._last_full if self._pending else self._last_any) + self._min_interval
        if limit <= self._since:
            return self._since  # quiet before this request: run at once
        return max(limit, self._since + self._debounce)

    def _take(self) -> bool | None:
        """Wait for a request and its turn; the coalesced `full` flag, or None when stopped."""
        with self._cond:
            deadline = time.monotonic() + self._resync
            while not self._stopped:
                now = time.monotonic()
                if self._pending is None:
                    if now >= deadline:
                        self._pending, self._since = True, now  # the periodic full run
                        continue
                    self._cond.wait(deadline - now)
                    continue
                due = self._due()
                if now >= due:
                    full, self._pending = self._pending, None
                    self._requested = self._since
                    return full
                self._cond.wait(due - now)
            return None

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds` (requests do not wake it); True when stopped meanwhile."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopped and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._stopped

    def _worked(self, began: float, full: bool) -> None:
        with self._cond:
            self._last_any = began
            if full:
                self._last_full = began

    def _loop(self) -> None:
        while True:
            full = self._take()
            if full is None:
                return
            began = time.monotonic()
            try:
                did_work = self._fn(full)
            except Exception as exc:
                self._worked(began, full)
                self.failures += 1
                self.consecutive_failures += 1
                self.last_error = str(exc)
                backoff = min(
                    self._max_backoff, self._min_backoff * 2 ** (self.consecutive_failures - 1)
                )
                log.warning(
                    "%s failed (retry in %.1fs): %s", self._task, backoff, exc, exc_info=True
                )
                if self._sleep(backoff):
                    return
                self.request(full)
            else:
                if did_work is not False:
                    self._worked(began, full)
                log.debug(
                    "%s (full: %s, did work: %s) began %.1f ms after its request, took %.1f ms",
                    self._task,
                    full,
                    did_work is not False,
                    (began - self._requested) * 1e3,
                    (time.monotonic() - began) * 1e3,
                )
                self.runs += 1
                self.consecutive_failures = 0
                self.last_error = ""
