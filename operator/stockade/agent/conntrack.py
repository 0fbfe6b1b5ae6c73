"""The conntrack recount: every few seconds, delete the expired conntrack entries and set each
endpoint's count of entries (`ct_owned`, the per-endpoint budget of bpf/conntrack.h) to what the
table holds.

The programs count the entries they create and delete, but the LRU evicts entries silently
and an entry that expires without being looked up again is never deleted by them; without the
recount those counts would only grow, until an endpoint could open no new flow at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stockade.datapath import maps

log = logging.getLogger(__name__)


def monotonic_ns() -> int:
    """The clock of the programs' `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class ConntrackRecount:
    """Recounts the maps `pinned()` returns (None: nothing loaded yet) every `interval`
    seconds, holding `lock` (the agent's sync lock) while it does."""

    def __init__(
        self,
        pinned: Callable[[], maps.PinnedMaps | None],
        lock: threading.Lock,
        interval: float,
    ) -> None:
        self.pinned = pinned
        self.lock = lock
        self.interval = interval
        self.recounts = 0
        self.failures = 0
        self.entries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stockade-ct-recount", daemon=True)

    def recount(self) -> bool:
        """One recount; False when there is no conntrack table to recount."""
        with self.lock:
            pinned = self.pinned()
            if pinned is None or "ct_owned" not in pinned.fds or "conntrack" not in pinned.fds:
                return False
            counts = maps.recount_conntrack(pinned, monotonic_ns())
        self.recounts += 1
        self.entries = sum(counts.values())
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.recount()
            except OSError:
                self.failures += 1
                log.exception("conntrack recount failed")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def gauges(self) -> dict[str, float]:
        return {
            "stockade_agent_conntrack_recounts_total": self.recounts,
            "stockade_agent_conntrack_recount_failures_total": self.failures,
            "stockade_agent_conntrack_entries": self.entries,
        }
