"""The agent's choice of conntrack clock: jiffies when the kernel's tick was measured, the coarse
clock (and a warning) when it could not be."""

from __future__ import annotations

import logging

import pytest

from stockade.agent import app
from stockade.datapath import clock
from stockade.datapath.clock import TickClock


def test_a_measured_tick_is_the_agents_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = TickClock(4_000_000, 17_179_568_924_752_167)
    monkeypatch.setattr(clock, "measure", lambda: tick)
    assert app._conntrack_clock() == tick
    assert app._clock_name(tick) == "jiffies, 4000000 ns a tick"


def test_a_kernel_whose_tick_cannot_be_measured_keeps_the_coarse_clock(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail() -> TickClock:
        raise clock.ClockError("the kernel's ticks (7000000 ns over 8) match no HZ")

    monkeypatch.setattr(clock, "measure", fail)
    with caplog.at_level(logging.WARNING):
        assert app._conntrack_clock() is None
    assert "conntrack reads the coarse clock: the kernel's ticks" in caplog.text
    assert app._clock_name(None) == "coarse"
