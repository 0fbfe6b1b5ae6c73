"""A debounced, rate-limited runner for the level-triggered reconcile.

Events only `request()` a pass; one thread runs `fn(tables)` at most once per `min_interval`,
after `debounce` seconds of quiet have collected a burst, with retries after failures and a
periodic full pass (kube-network-policies `pkg/runner`, in spirit). `tables` tells the pass
whether the lowering's inputs changed or only statuses need a look.
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
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="stockade-reconcile", daemon=True)
        self.passes = 0
        self.failures = 0

    def request(self, tables: bool = True) -> None:
        with self._cond:
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

    def _take(self) -> bool | None:
        with self._cond:
            if self._pending is None and not self._stopped and not self._cond.wait(self._resync):
                self._pending = True  # the periodic full pass
            if self._stopped:
                return None
        time.sleep(self._debounce)
        with self._cond:
            tables, self._pending = bool(self._pending), None
            return tables

    def _loop(self) -> None:
        last = 0.0
        while True:
            tables = self._take()
            if tables is None:
                return
            wait = last + self._min_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            last = time.monotonic()
            try:
                self._fn(tables)
                self.passes += 1
            except Exception:
                self.failures += 1
                log.exception("reconcile failed; retrying in %.1fs", self._retry)
                time.sleep(self._retry)
                self.request(tables)
