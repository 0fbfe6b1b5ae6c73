"""The conntrack clock: what the programs read for "now", as cheaply as the kernel allows.

Conntrack keeps its times in CLOCK_MONOTONIC nanoseconds (bpf/maps.h, `expires_ns`), which the
agent's recount compares with its own clock. Reading that clock in a program
(`bpf_ktime_get_coarse_ns`) costs about 17 ns here, a fifth of an established packet;
`bpf_jiffies64` costs about 1 ns. The jiffies count follows CLOCK_MONOTONIC tick by tick (the
kernel advances it from the monotonic clock), so

    now = jiffies * tick_ns - base_ns

is CLOCK_MONOTONIC at a tick's resolution, as the coarse clock is: the two advance in the same
interrupt, each on a grid of its own (jiffies on TICK_NSEC, the coarse clock on the
timekeeper's NTP-adjusted interval), so they differ by a tick at most, and drift apart by
nanoseconds a second at most (the agent measures again when it starts). `measure()`
finds `tick_ns` (one tick of this kernel's HZ) and `base_ns`; the agent writes both into the
config map (`maps.write_clock`), and a program whose config has no tick falls back to the
coarse clock (bpf/conntrack.h, `ct_now`).

User space cannot read jiffies directly, so `measure()` runs a three-instruction program that
returns them (BPF_PROG_TEST_RUN; the return value is 32 bits, so one program returns the low
half and another the high half).
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from stockade.datapath import libbpf

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FUNC_JIFFIES64 = 118
# The HZ values an x86-64 or arm64 kernel can be built with (kernel/Kconfig.hz).
KERNEL_HZ = (100, 250, 300, 1000)
TOLERANCE = 0.03  # how far a measured tick may be from the nearest HZ's
MEASURE_SECONDS = 0.05  # how long the tick is measured over, at least
MEASURE_TICKS = 3  # and over how many ticks, at least
BASE_SAMPLES = 5  # tick edges the base is the median of
EDGE_SLACK_NS = 200_000  # how closely a tick edge is placed (two reads and an interrupt)
ATTEMPTS = 5  # measurements of the tick before giving up
EDGE_TIMEOUT_NS = 2 * 10**9  # how long an edge is waited for before giving up
_FRAME = bytes(64)  # any frame: the program does not look at it
CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; the time module does not name it


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_CALL = _insn(0x85, imm=BPF_FUNC_JIFFIES64)  # BPF_JMP | BPF_CALL
_EXIT = _insn(0x95)  # BPF_JMP | BPF_EXIT
_HIGH = _insn(0x77, imm=32)  # BPF_ALU64 | BPF_RSH | BPF_K: r0 >>= 32


@dataclass(frozen=True)
class TickClock:
    """now = jiffies * tick_ns - base_ns, in CLOCK_MONOTONIC nanoseconds."""

    tick_ns: int
    base_ns: int


class ClockError(RuntimeError):
    pass


def tick_ns_of(hz: int) -> int:
    """One tick of a kernel built with `hz`, as the kernel rounds it (TICK_NSEC)."""
    return (1_000_000_000 + hz // 2) // hz


def nearest_hz(tick_ns: float) -> int | None:
    """The HZ whose tick `tick_ns` is, within TOLERANCE; None when no HZ is that close."""
    hz = min(KERNEL_HZ, key=lambda h: abs(tick_ns_of(h) - tick_ns))
    return hz if abs(tick_ns_of(hz) - tick_ns) <= TOLERANCE * tick_ns_of(hz) else None


class Jiffies:
    """Reads the kernel's jiffies count through two loaded programs; owns their fds."""

    def __init__(self) -> None:
        self._low = libbpf.prog_load_insns(BPF_PROG_TYPE_SCHED_CLS, "jiffies_low", _CALL + _EXIT)
        try:
            self._high = libbpf.prog_load_insns(
                BPF_PROG_TYPE_SCHED_CLS, "jiffies_high", _CALL + _HIGH + _EXIT
            )
        except BaseException:
            os.close(self._low)
            raise

    def _half(self, fd: int) -> int:
        return libbpf.prog_test_run(fd, _FRAME).retval & 0xFFFFFFFF

    def low(self) -> int:
        """The count's low 32 bits: one test run, for watching it change."""
        return self._half(self._low)

    def read(self) -> int:
        while True:
            high = self._half(self._high)
            low = self._half(self._low)
            if self._half(self._high) == high:  # the low half did not wrap in between
                return (high << 32) | low

    def close(self) -> None:
        os.close(self._low)
        os.close(self._high)

    def __enter__(self) -> Jiffies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _coarse_ns() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def measure() -> TickClock:
    """This kernel's tick and the base that makes jiffies CLOCK_MONOTONIC.

    The tick is measured between two tick edges at least MEASURE_SECONDS and MEASURE_TICKS
    apart (about 50 ms), each placed within EDGE_SLACK_NS, and taken as the nearest HZ's; the
    base is the median of BASE_SAMPLES taken in mid-tick, away from the edges where jiffies and
    the coarse clock may change in different interrupts. Raises ClockError when the kernel's
    ticks match no HZ, ATTEMPTS times over, or no edge could be placed in EDGE_TIMEOUT_NS."""
    with Jiffies() as jiffies:

        def edge() -> tuple[int, int]:
            """(jiffies, CLOCK_MONOTONIC) at the next tick edge that two reads close together
            bracket: one before it saw the old count, the next the new one."""
            began, last = time.monotonic_ns(), jiffies.low()
            deadline = began + EDGE_TIMEOUT_NS
            while True:
                now = time.monotonic_ns()
                if now > deadline:
                    raise ClockError(
                        f"no tick edge placed within {EDGE_SLACK_NS // 1000} us in "
                        f"{EDGE_TIMEOUT_NS // 10**9} s (is the machine that busy?)"
                    )
                count = jiffies.low()
                ended = time.monotonic_ns()
                if count != last and ended - began <= EDGE_SLACK_NS:
                    whole = jiffies.read()
                    return whole - ((whole - count) & 0xFFFFFFFF), (began + ended) // 2
                began, last = now, count

        for _ in range(ATTEMPTS):
            j0, m0 = edge()
            while True:
                j1, m1 = edge()
                if j1 - j0 >= MEASURE_TICKS and m1 - m0 >= MEASURE_SECONDS * 1e9:
                    break
            measured = (m1 - m0) / (j1 - j0)
            hz = nearest_hz(measured)
            if hz is not None:
                break
        else:
            raise ClockError(f"the kernel's ticks ({measured:.0f} ns over {j1 - j0}) match no HZ")
        tick = tick_ns_of(hz)
        bases: list[int] = []
        for _ in range(100):
            edge()
            time.sleep(tick / 2e9)
            j = jiffies.read()
            coarse = _coarse_ns()
            if jiffies.read() == j:  # no tick between the two reads
                bases.append(j * tick - coarse)
                if len(bases) == BASE_SAMPLES:
                    return TickClock(tick, sorted(bases)[BASE_SAMPLES // 2])
        raise ClockError("jiffies kept changing between two reads")
