"""The operator's and the agent's processes start the same way (`run_process`)."""

from __future__ import annotations

import argparse
import gc
import signal
import threading

from stockade.runtime.command import run_process


class App:
    """Records, when run, how many objects the collector no longer scans."""

    frozen = -1

    def __init__(self, config: object) -> None:
        self.config = config

    def run(self, stop: threading.Event) -> None:
        App.frozen = gc.get_freeze_count()


def test_what_lives_before_the_process_runs_is_frozen_out_of_full_collections() -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    gc.unfreeze()
    try:
        status = run_process(
            argparse.Namespace(verbose=False), "test", lambda args: "config", App, str
        )
        assert status == 0
        assert App.frozen > 10_000  # the imported modules, at least
    finally:
        gc.unfreeze()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
