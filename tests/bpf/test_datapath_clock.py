"""The conntrack clock (stockade.datapath.clock) on this kernel: jiffies read through a test run,
the tick found, and jiffies * tick - base following CLOCK_MONOTONIC."""

from __future__ import annotations

import gzip
import platform
import re
import time
from pathlib import Path

import pytest

from stockade.datapath import clock

CLOCK_MONOTONIC_COARSE = 6
DRIFT_NS = 1_000


def _kernel_hz() -> int | None:
    """CONFIG_HZ from the kernel's build config, where the machine has it."""
    for path in (Path(f"/boot/config-{platform.release()}"), Path("/proc/config.gz")):
        if path.exists():
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()
            found = re.search(r"^CONFIG_HZ=(\d+)$", text, re.M)
            if found:
                return int(found.group(1))
    return None


def test_the_tick_is_the_kernels_and_jiffies_follow_the_monotonic_clock() -> None:
    tick = clock.measure()
    hz = _kernel_hz()
    if hz is not None:
        assert tick.tick_ns == clock.tick_ns_of(hz)
    with clock.Jiffies() as jiffies:
        for _ in range(20):  # over about 20 ticks, at points unrelated to the tick edges
            before = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
            now = jiffies.read() * tick.tick_ns - tick.base_ns
            after = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
            # Both advance in the tick's interrupt, each on a grid of its own: jiffies on
            # TICK_NSEC, the coarse clock on the timekeeper's NTP-adjusted interval. When the
            # two edges are close, one interrupt may advance one of them and the next the other;
            # and the grids drift apart by nanoseconds a second (DRIFT covers a minute's).
            bound = tick.tick_ns + DRIFT_NS
            assert before - bound <= now <= after + bound, (before, now, after)
            time.sleep(tick.tick_ns * 1.37 / 1e9)


def test_both_halves_of_the_jiffies_count_are_read() -> None:
    # The count starts 300 s short of 2**32 (the kernel's INITIAL_JIFFIES), so after five
    # minutes up its high half is set.
    hz = 1_000_000_000 // clock.measure().tick_ns
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    with clock.Jiffies() as jiffies:
        first = jiffies.read()
        expected = 2**32 - 300 * hz + uptime * hz
        assert abs(first - expected) <= hz, (first, expected)
        time.sleep(0.05)
        assert jiffies.read() > first


@pytest.mark.parametrize(
    ("tick_ns", "hz"),
    [(4_000_000, 250), (3_333_333, 300), (1_000_000, 1000), (10_000_000, 100), (4_050_000, 250)],
)
def test_a_measured_tick_is_taken_as_the_nearest_hz(tick_ns: float, hz: int) -> None:
    assert clock.nearest_hz(tick_ns) == hz


@pytest.mark.parametrize("tick_ns", [2_000_000, 5_000_000, 7_000_000])
def test_a_tick_of_no_hz_is_refused(tick_ns: float) -> None:
    assert clock.nearest_hz(tick_ns) is None


def test_a_machine_too_busy_to_place_a_tick_edge_gets_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No pair of reads is ever close enough: the measurement gives up (the agent then keeps
    # the coarse clock) instead of waiting for ever.
    monkeypatch.setattr(clock, "EDGE_SLACK_NS", -1)
    monkeypatch.setattr(clock, "EDGE_TIMEOUT_NS", 50_000_000)
    with pytest.raises(clock.ClockError, match="no tick edge placed"):
        clock.measure()
