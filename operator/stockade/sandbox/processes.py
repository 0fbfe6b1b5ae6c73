"""Child processes of the sandbox that can outlive the Python process that started them.

The control plane runs etcd and kube-apiserver either as plain children (the test fixtures) or
detached (`stockade sandbox up`, where a later `stockade sandbox down` stops them). A
`ProcessRecord` identifies a process by pid *and* kernel start time, so that a recycled pid is
never mistaken for ours and never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """A sandbox process failed to start or to become healthy; the message has its log tail."""


@dataclass(frozen=True)
class ProcessRecord:
    """One running sandbox process: enough to find it again and to stop it from another process."""

    name: str
    pid: int
    start_ticks: int
    log: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "log": str(self.log),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_ticks=int(data["start_ticks"]),
            log=Path(data["log"]),
        )


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc/<pid>/stat, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def is_alive(record: ProcessRecord) -> bool:
    """True if the recorded process still runs (same pid, same start time, not a zombie)."""
    stat = _stat(record.pid)
    return stat is not None and stat[0] != "Z" and stat[1] == record.start_ticks


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it if the starting process dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """A started process, with its Popen handle when this process started it."""

    record: ProcessRecord
    popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def spawn(cls, name: str, argv: list[str], log: Path, *, detach: bool) -> Child:
        """Start `argv` with stdout and stderr appended to `log`.

        detach=False: the child dies with this process (the test fixtures' case).
        detach=True: the child gets its own session and keeps running after this process exits.
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
                # Only a pre-resolved prctl(2) runs between fork and exec: no locks, no imports.
                preexec_fn=None if detach else _die_with_parent,  # noqa: PLW1509
            )
        stat = _stat(popen.pid)
        ticks = stat[1] if stat is not None else 0
        return cls(ProcessRecord(name, popen.pid, ticks, log), popen)

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_alive(self.record)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
        stop_all([self], grace)

    def _terminate(self) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
        else:
            _signal(self.record, signal.SIGTERM)

    def _wait_or_kill(self, deadline: float) -> None:
        if self.popen is None:
            _wait_or_kill(self.record, deadline)
            return
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def stop_all(children: Sequence[Child], grace: float = 10.0) -> None:
    """Stop several processes at once: SIGTERM to each, then wait for them together, SIGKILL
    to those still running `grace` seconds later. Processes that each take a second to stop
    then cost a second, not one each."""
    for child in children:
        child._terminate()
    deadline = time.monotonic() + grace
    for child in children:
        child._wait_or_kill(deadline)


def stop_record(record: ProcessRecord, grace: float = 10.0) -> None:
    """Stop a process this process did not start (it was recorded by an earlier run)."""
    stop_records([record], grace)


def stop_records(records: Sequence[ProcessRecord], grace: float = 10.0) -> None:
    """`stop_record` for several processes at once (as `stop_all`)."""
    for record in records:
        _signal(record, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for record in records:
        _wait_or_kill(record, deadline)


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    if is_alive(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, sig)


def _wait_or_kill(record: ProcessRecord, deadline: float) -> None:
    """Wait until `deadline` for the process to be gone, then SIGKILL it and wait 10 s more."""
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            _signal(record, sig)
            deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and is_alive(record):
            time.sleep(0.05)
        if not is_alive(record):
            return
    raise ProcessError(f"{record.name} (pid {record.pid}) survived SIGKILL")


def find_processes(binaries: set[Path], directory: Path) -> list[ProcessRecord]:
    """Running processes of `binaries` with an argument `--flag=<directory>/...`: how a sandbox
    finds its own etcd and kube-apiserver even when no record of them was written."""
    names = {str(b) for b in binaries}
    marker = f"={directory}/"
    found: list[ProcessRecord] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        stat = _stat(int(entry))
        if stat is None or stat[0] == "Z" or args[0] not in names:
            continue
        if any(marker in a for a in args[1:]):
            found.append(ProcessRecord(Path(args[0]).name, int(entry), stat[1], Path(os.devnull)))
    return found
