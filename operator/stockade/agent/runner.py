"""A rate-limited runner for the agent's one idempotent `sync()`.

Events (a watched DatapathTable changed, the watch re-listed) only `request()` a sync; one thread
runs it, retries a failed sync with exponential backoff (capped at `max_backoff`; a new request
does not cut a backoff short, so a failing kernel or API is not hammered), and runs a full sync
every `resync` seconds even when nothing was requested. A request after a quiet period runs at
once; only bursts are limited: a sync starts at least `min_interval` after the previous sync that
did work. A sync that returns False did nothing (the published set was still incomplete, or was
the one already applied, as when a new shard arrives before the manifest that lists it) and does
not count against the minimum interval, so the event that completes a set is applied at once.
The same pattern as kubernetes-sigs/kube-network-policies `pkg/runner` (BoundedFrequencyRunner).

`stockade.agent.app` builds one Runner around `Syncer.sync`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Runner:
    def __init__(
        self,
        fn: Callable[[], bool | None],
        *,
        min_interval: float = 0.05,
        resync: float = 300.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        name: str = "stockade-agent-sync",
    ) -> None:
        self._fn = fn
        self._min_interval = min_interval
        self._resync = resync
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._cond = threading.Condition()
        self._pending = False
        self._since = 0.0  # when the first pending request arrived
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.runs = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error = ""

    def request(self) -> None:
        """Ask for a sync soon (never blocks, coalesces with pending requests)."""
        with self._cond:
            if not self._pending:
                self._since = time.monotonic()
            self._pending = True
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _wait(self, timeout: float, *, for_request: bool) -> bool:
        """Sleep up to `timeout`; True when stopped. With `for_request`, a request wakes it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stopped and not (for_request and self._pending):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._stopped

    def _loop(self) -> None:
        last = float("-inf")
        while True:
            if self._wait(self._resync, for_request=True):
                return
            delay = last + self._min_interval - time.monotonic()
            if delay > 0 and self._wait(delay, for_request=False):
                return
            with self._cond:
                requested = self._since if self._pending else time.monotonic()
                self._pending = False
            began = time.monotonic()
            try:
                did_work = self._fn()
            except Exception as exc:
                self.failures += 1
                self.consecutive_failures += 1
                self.last_error = str(exc)
                last = began
                backoff = min(
                    self._max_backoff, self._min_backoff * 2 ** (self.consecutive_failures - 1)
                )
                log.warning("sync failed (retry in %.1fs): %s", backoff, exc, exc_info=True)
                if self._wait(backoff, for_request=False):
                    return
                self.request()
            else:
                log.debug(
                    "sync (did work: %s) began %.1f ms after its request, took %.1f ms",
                    did_work is not False,
                    (began - requested) * 1e3,
                    (time.monotonic() - began) * 1e3,
                )
                if did_work is not False:
                    last = began
                self.runs += 1
                self.consecutive_failures = 0
                self.last_error = ""
