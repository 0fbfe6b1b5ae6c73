"""The lowering, off kopf's event loop: a worker process (or, for debugging, the reconcile thread)
that holds the lowering's state and is fed the Store's changes.

kopf's handlers and the lowering share one interpreter when they share a process: a pass of pure
Python holds the GIL for most of its run, and kopf takes in pod events only in the gaps (#17).
So by default (`--lowering process`) the lowering lives in a child process: `Engine` holds a
`Mirror` of the Store (`stockade.control.store`), the `Lowerer` and its caches. Each pass the
reconciler (`stockade.control.reconciler`) takes the Store's journal, O(changes) under the
Store's lock, and sends it; the engine applies it, builds the snapshot, lowers, and answers with
only what changed: the nodes whose encoded parts are new objects, the nodes gone, and, for the
status reporter, the endpoints per node of each policy subject whose members moved. The
reconciler keeps the last parts of every node for `Publisher.plan`.

The child is `python -m stockade.control.worker`, started with subprocess (a new interpreter
exec'd at once: no Python runs in a forked copy of the threaded operator), its standard input
and output a pipe carrying pickled messages
(`multiprocessing.connection.Connection`'s framing). multiprocessing's own spawn would also
start its resource-tracker process, which outlives the worker, and import the parent's
`__main__` again. The worker runs at nice `NICE`, so that when the two want the same CPU the
kernel prefers the operator's intake. The worker dies with the operator: at the end of its input
(the operator closed the pipe, or died) it exits. A worker that dies or answers nothing sensible
is started again and given the whole store (`Store.take(full=True)`), so no state is lost; the
log says so.

`--lowering thread` runs the same `Engine` in the reconcile thread: the same journal, mirror and
answers, without the process hop (for debugging and profiling).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Protocol

from stockade import handoff
from stockade.compiler.shape import Shape
from stockade.control.config import LOWERING_MODES
from stockade.control.lowering import Lowerer
from stockade.control.plan import NodeParts
from stockade.control.policies import PolicyKey, PolicyRecord
from stockade.control.store import Changes, Mirror
from stockade.model.cluster import ClusterState
from stockade.model.policy import PodSet

log = logging.getLogger(__name__)

STOP_S = 2.0  # seconds a worker is given to exit at the end of its input before it is killed
# The worker's niceness: when intake and lowering want the same CPU, the kernel gives the
# operator's own process (kopf's intake) most of it; the lowering takes what intake leaves.
# bench/intake.py measures the intake with the lowering running beside it (README).
NICE = 10
# A pass that has lowered for this long hands on what it has so far, and then again each time
# this much more time has passed: one label change lowers a node or two in a few milliseconds
# and streams nothing; the pass that follows a burst of policies lowers every node for seconds,
# and its first nodes are written while it lowers the rest (#17)
STREAM_AFTER = 0.1
FULL_COLLECT_GROWTH = 0.25  # heap growth that calls for a full garbage collection (Collector)


@dataclass(frozen=True)
class Settings:
    """What a lowering is built with (sent to a worker process first)."""

    shape: Shape | None = None
    inline_entries: int = handoff.INLINE_ENTRIES
    services: bool = False
    stream_after: float = STREAM_AFTER  # seconds of a pass before its nodes are streamed


@dataclass(frozen=True)
class Partial:
    """Nodes whose encoded parts changed, sent while a long pass goes on (`Engine.lower`), so
    that the reconciler publishes them while the lowering works on the other nodes; the pass's
    `Result` leaves them out."""

    parts: Mapping[str, NodeParts]


Stream = Callable[[Mapping[str, NodeParts]], None]  # told of each `Partial`'s parts


@dataclass(frozen=True)
class Result:
    """One pass's answer, against the engine's previous answer (with `full`, against nothing:
    the engine is new and the receiver drops what it kept)."""

    parts: Mapping[str, NodeParts]  # the nodes whose encoded parts changed
    gone: tuple[str, ...]  # nodes no longer lowered
    # policy subject -> node -> its endpoints there, for the subjects whose answer changed
    selected: Mapping[PodSet, Mapping[str, int]]
    unselected: tuple[PodSet, ...]  # subjects no policy names any more
    full: bool
    nodes_lowered: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # the engine's stages
    streamed: tuple[str, ...] = ()  # nodes whose parts this pass handed on in `Partial`s


class Engine:
    """The lowering's state: a mirror of the Store, the Lowerer, and what it last answered."""

    def __init__(self, settings: Settings) -> None:
        self.mirror = Mirror()
        self.lowerer = Lowerer(settings.shape, settings.inline_entries, settings.services)
        self._stream_after = settings.stream_after
        self._parts: dict[str, NodeParts] = {}
        self._selected: dict[PodSet, dict[str, int]] = {}
        self._subjects: set[PodSet] | None = None  # every policy's subject (None: to find again)
        self._answered = False

    def lower(self, changes: Changes, stream: Stream | None = None) -> Result:
        """Apply `changes` and lower; a pass that runs longer than `stream_after` hands the
        nodes that changed to `stream` as it goes, and its `Result` holds the rest."""
        began = time.monotonic()
        same = (changes.configured_cidrs, changes.node_port_range) == (
            self.mirror.configured_cidrs,
            self.mirror.node_port_range,
        )
        if self._answered and not changes.full and not changes.entries and same:
            return Result({}, (), {}, (), full=False)  # nothing changed: the last answer holds
        self.mirror.apply(changes)
        if changes.full or any(name == "policies" for name, _ in changes.entries):
            self._subjects = None
        snap = self.mirror.snapshot()
        built = time.monotonic()
        streamed: set[str] = set()
        waiting: dict[str, NodeParts] = {}
        due = began + self._stream_after

        def on_node(node: str, parts: NodeParts) -> None:
            nonlocal due
            # The Lowerer hands back the same parts object for a node it did not encode again.
            if stream is None or self._parts.get(node) is parts:
                return
            waiting[node] = parts
            if (now := time.monotonic()) >= due:
                stream(dict(waiting))
                streamed.update(waiting)
                waiting.clear()
                due = now + self._stream_after

        desired = self.lowerer.desired(snap, on_node)
        lowered = time.monotonic()
        changed = {
            n: p for n, p in desired.items() if self._parts.get(n) is not p and n not in streamed
        }
        gone = tuple(sorted(set(self._parts) - set(desired)))
        self._parts = desired
        selected, unselected = self._selections(snap.state, snap.policies)
        full, self._answered = not self._answered, True
        seconds = {
            "snapshot": built - began,
            "lower": lowered - built,
            "select": time.monotonic() - lowered,
        }
        return Result(
            changed,
            gone,
            selected,
            unselected,
            full,
            self.lowerer.nodes_lowered,
            seconds,
            tuple(sorted(streamed)),
        )

    def _selections(
        self, state: ClusterState, policies: Mapping[PolicyKey, PolicyRecord]
    ) -> tuple[dict[PodSet, dict[str, int]], tuple[PodSet, ...]]:
        """The endpoints per node of every policy subject whose members may have moved: those
        the lowering's membership (which followed `state`) saw change, new subjects, all of
        them after a reset.
        Counted as the status wants them: scheduled, addressed, not host-network pods."""
        membership = self.lowerer.membership
        if self._subjects is None or membership.reset:  # a policy changed, or every pod set
            self._subjects = {r.policy.subject for r in policies.values() if r.policy is not None}
            looked = self._subjects
        else:  # the same subjects: only those whose members moved can count otherwise
            looked = self._subjects & membership.changed
        subjects = self._subjects
        out: dict[PodSet, dict[str, int]] = {}
        for subject in looked:
            if (
                subject in self._selected
                and not membership.reset
                and subject not in membership.changed
            ):
                continue
            counts: dict[str, int] = {}
            for pod in membership.pods_in(state, subject):
                if pod.node is not None and pod.ips:
                    counts[pod.node] = counts.get(pod.node, 0) + 1
            if self._selected.get(subject) != counts:
                out[subject] = counts
                self._selected[subject] = counts
        gone = tuple(s for s in self._selected if s not in subjects) if looked is subjects else ()
        for subject in gone:
            del self._selected[subject]
        return out, gone


class Lowering(Protocol):
    """Where the reconciler's lowering runs. `full()` takes the whole store, for a lowering
    that has to start from nothing; `stream` is told of the nodes a long pass hands on before
    its `Result` (`Engine.lower`)."""

    def lower(
        self, changes: Changes, full: Callable[[], Changes], stream: Stream | None = None
    ) -> Result: ...

    def close(self) -> None: ...


class InThread:
    """`--lowering thread`: the engine in the caller's thread; one that raised may be half
    updated, so the next pass starts a new one from the whole store."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.engine: Engine | None = None

    def lower(
        self, changes: Changes, full: Callable[[], Changes], stream: Stream | None = None
    ) -> Result:
        if self.engine is None:
            self.engine = Engine(self._settings)
            changes = _merged(changes, full())
        try:
            return self.engine.lower(changes, stream)
        except Exception:
            self.engine = None
            raise

    def close(self) -> None:
        pass


class WorkerError(RuntimeError):
    """The worker process died or broke the protocol."""


class InProcess:
    """`--lowering process`: the engine in a child process, started on first use and again
    after it died."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._child: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self.starts = 0  # worker processes started (1 + restarts)

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def lower(
        self, changes: Changes, full: Callable[[], Changes], stream: Stream | None = None
    ) -> Result:
        if self._child is None:
            if self.starts:
                log.warning("lowering worker: starting a new worker with the whole store")
            self._start()
            changes = _merged(changes, full())
        try:
            return self._call(changes, stream)
        except WorkerError as exc:
            log.warning(
                "lowering worker (pid %s) failed: %s; starting a new one with the whole store, "
                "no state is lost",
                self.pid,
                exc,
            )
            self.close()
            self._start()
            try:
                return self._call(_merged(changes, full()), stream)
            except WorkerError:
                self.close()  # the runner's retry starts another, again from the whole store
                raise

    def _call(self, changes: Changes, stream: Stream | None) -> Result:
        """Send `changes` (asking for `Partial`s only when there is a `stream` to hand them
        to) and read the answer, handing each `Partial` to `stream` as it comes."""
        assert self._send is not None and self._recv is not None
        try:
            self._send.send((changes, stream is not None))
            answer = self._recv.recv()
            while isinstance(answer, Partial):
                assert stream is not None
                stream(answer.parts)
                answer = self._recv.recv()
        except Exception as exc:  # EOF, a broken pipe, an answer that does not unpickle
            code = self._child.poll() if self._child is not None else None
            why = f"exit status {code}" if code is not None else repr(exc)
            raise WorkerError(why) from exc
        if isinstance(answer, BaseException):  # the engine raised: a bug, not a lost worker
            raise WorkerError(f"the lowering raised {answer!r}") from answer
        if not isinstance(answer, Result):
            raise WorkerError(f"unexpected answer {type(answer).__name__}")
        return answer

    def _start(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "stockade.control.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self._child.stdin is not None and self._child.stdout is not None
        # The Connections own duplicates; the Popen's file objects are closed now.
        self._send = Connection(os.dup(self._child.stdin.fileno()), readable=False)
        self._recv = Connection(os.dup(self._child.stdout.fileno()), writable=False)
        self._child.stdin.close()
        self._child.stdout.close()
        self.starts += 1
        self._send.send(self._settings)
        log.info("lowering worker started (pid %d)", self._child.pid)

    def close(self) -> None:
        """End the worker's input and reap it (killed if it does not exit within STOP_S)."""
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.wait(STOP_S)
        except subprocess.TimeoutExpired:
            log.warning("lowering worker (pid %d) did not exit; killing it", child.pid)
            child.kill()
            child.wait()


def _merged(changes: Changes, whole: Changes) -> Changes:
    """The whole store, keeping the time of the latest change either take saw."""
    latest = [t for t in (changes.latest_change, whole.latest_change) if t is not None]
    return Changes(
        whole.entries,
        True,
        whole.configured_cidrs,
        whole.node_port_range,
        max(latest, default=None),
    )


def lowering(mode: str, settings: Settings) -> Lowering:
    if mode == "thread":
        return InThread(settings)
    if mode == "process":
        return InProcess(settings)
    raise ValueError(f"lowering mode {mode!r}: choose one of {', '.join(LOWERING_MODES)}")


class Collector:
    """The worker's garbage collection, between passes instead of in them, and in proportion to
    the heap's growth.

    The worker's heap is the lowering's caches: about 430,000 objects that the collector tracks
    at 10,000 pods, millions at 50,000. Python's automatic collection scans all of them now and
    then, in the middle of whatever pass allocates the object that tips it over (165 ms at
    10,000 pods): the slowest one-change latencies waited for that. After each answer the
    worker freezes what is alive (`gc.freeze`: later automatic collections look only at what
    the next passes allocate; a frozen object that dies is still freed by its reference count).

    A pass makes no garbage in reference cycles (tests/unit/test_lowering_worker.py), so the
    frozen objects hold none. To keep one that a future change makes from piling up, the worker
    unfreezes and collects everything once the frozen heap has grown by `growth` (a quarter)
    since the last full collection, when no change waits (and at four times that growth, even
    when one does): cycles that pile up show as growth, and a heap that only churns is not
    scanned again. This is the rule CPython applies to its own oldest generation. A full
    collection costs about 1 s at 50,000 pods and 15 to 30 ms with an empty cluster: one every
    100 passes, the rule before this one, made a change that arrived meanwhile wait for it
    (bench/convergence.py shows such a trial as a slow `published` stage)."""

    def __init__(self, growth: float = FULL_COLLECT_GROWTH) -> None:
        self.growth = growth
        self.baseline = 0  # frozen objects right after the last full collection
        self.full_collections = 0
        self.last_full_seconds = 0.0

    def after_pass(self, idle: bool) -> None:
        gc.freeze()
        grown = gc.get_freeze_count() - self.baseline
        if grown > self.growth * self.baseline and (
            idle or grown > 4 * self.growth * self.baseline
        ):
            began = time.monotonic()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.baseline = gc.get_freeze_count()
            self.full_collections += 1
            self.last_full_seconds = time.monotonic() - began
            log.debug(
                "full garbage collection in %.1f ms, %d objects alive",
                self.last_full_seconds * 1000,
                self.baseline,
            )


def serve(recv: Connection, send: Connection) -> None:
    """The worker's loop: settings first, then for each `(Changes, streamed)` the `Partial`s
    of a long pass (when `streamed`) and one `Result` (or the exception the engine raised),
    until the input ends; garbage is collected between passes (`Collector`)."""
    collector = Collector()

    def partial(parts: Mapping[str, NodeParts]) -> None:
        send.send(Partial(parts))

    try:
        settings = recv.recv()
        engine = Engine(settings)
        while True:
            changes, streamed = recv.recv()
            try:
                answer: Result | BaseException = engine.lower(
                    changes, partial if streamed else None
                )
            except Exception as exc:
                log.exception("the lowering failed")
                answer = exc
                engine = Engine(settings)  # its state may be half-updated: the next is full
            send.send(answer)
            collector.after_pass(idle=not recv.poll(0))
    except (EOFError, BrokenPipeError):
        return  # the operator closed the pipe or is gone


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the operator decides when this one ends
    os.nice(NICE)
    logging.basicConfig(
        level=os.environ.get("STOCKADE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s lowering-worker %(name)s: %(message)s",
    )
    recv = Connection(os.dup(0), writable=False)
    send = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a stray print goes to the log, never into the pipe
    serve(recv, send)


if __name__ == "__main__":
    # Run the module's own copy (`stockade.control.worker`), not this `__main__` one, so that
    # what it pickles names classes the operator can import.
    from stockade.control.worker import main as worker_main

    worker_main()
