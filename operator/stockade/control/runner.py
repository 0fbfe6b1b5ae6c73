"""A rate-limited runner for the level-triggered reconcile.

Events only `request()` a pass; one thread runs `fn(tables)`, with retries after failures and a
periodic full pass (kube-network-policies `pkg/runner`, in spirit). `tables` tells the pass
whether the lowering's inputs changed or only statuses need a look; requests coalesce, and a
pending tables request is never downgraded to a status-only pass.

When the runner has been quiet, a request runs at once: a lone `kubectl apply` is not made to
wait. Only bursts are limited: a pass that lowers starts at least `min_interval` after the previous
pass that lowered, and a status-only pass at least `min_interval` after the previous pass of any
kind (so a status-only pass, which is cheap, never delays the next lowering). A request that has
to wait for the limit also waits at least `debounce` after it arrived, so that a burst that is
still arriving goes into one pass. Everything requested while a pass runs or waits goes into the
next pass. `stockade.control.app` builds one Runner around `Reconciler.run`.
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
        fn: Callable[[bool], None],
        *,
        debounce: float = 0.02,
        min_interval: float = 0.1,
        retry: float = 1.0,
        resync: float = 300.0,
    ) -> None:
        self._fn = fn
        self._debounce = debounce
        self._min_interval = min_interval
        self._retry = retry
        self._resync = resync
        self._cond = threading.Condition()
        self._pending: bool | None = None  # None: nothing requested; else "tables changed"
        self._since = 0.0  # when the first pending request arrived
        self._requested = 0.0  # the same, for the pass under way
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="stockade-reconcile", daemon=True)
        self._last_tables = NEVER  # start of the last pass that lowered
        self._last_any = NEVER  # start of the last pass of any kind
        self.passes = 0
        self.failures = 0

    def request(self, tables: bool = True) -> None:
        """Ask for a pass (never blocks); `tables=False` asks only for a status look."""
        with self._cond:
            if self._pending is None:
                self._since = time.monotonic()
            self._pending = bool(self._pending) or tables
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _due(self) -> float:
        """When the pending request may run (called with the lock held)."""
        limit = (self._last_tables if self._pending else self._last_any) + self._min_interval
        if limit <= self._since:
            return self._since  # quiet before this request: run at once
        return max(limit, self._since + self._debounce)

    def _take(self) -> bool | None:
        """Wait for a request and its turn; the coalesced `tables` flag, or None when stopped."""
        with self._cond:
            deadline = time.monotonic() + self._resync
            while not self._stopped:
                now = time.monotonic()
                if self._pending is None:
                    if now >= deadline:
                        self._pending, self._since = True, now  # the periodic full pass
                        continue
                    self._cond.wait(deadline - now)
                    continue
                due = self._due()
                if now >= due:
                    tables, self._pending = self._pending, None
                    self._requested = self._since
                    return tables
                self._cond.wait(due - now)
            return None

    def _loop(self) -> None:
        while True:
            tables = self._take()
            if tables is None:
                return
            began = time.monotonic()
            with self._cond:
                self._last_any = began
                if tables:
                    self._last_tables = began
            try:
                self._fn(tables)
                self.passes += 1
                log.debug(
                    "reconcile pass (tables=%s) began %.1f ms after its request, took %.1f ms",
                    tables,
                    (began - self._requested) * 1e3,
                    (time.monotonic() - began) * 1e3,
                )
            except Exception:
                self.failures += 1
                log.exception("reconcile failed; retrying in %.1fs", self._retry)
                time.sleep(self._retry)
                self.request(tables)
