"""Intake benchmark (#17 item 5): how fast the operator's handlers take in pod events while the
lowering runs, without an API server.

    .venv/bin/python bench/intake.py [--quick] [--rounds N] [--output bench/results/intake.json]

A Store holds 100 namespaces, `--nodes` nodes and `--policies` policies (bench/convergence.py's
scale policy), taken in through the operator's own kopf handlers (`stockade.control.handlers`).
Then `--pods` new pods (Running, with an address; every one in some policies' subjects and peer
sets) are handed to the real pod handler, the coroutine kopf awaits, one after another on an
asyncio loop as fast as it returns, while the operator's `Runner` (the operator's debounce and
minimum interval) runs reconcile passes on every change, in one of these modes:

- `none`: no pass runs: what the handler alone allows (the ceiling);
- `inline`: the lowering as it ran before the worker process: every pass takes the Store's
  `snapshot()` (the whole cluster, sorted and copied under the Store's lock), lowers it in the
  reconcile thread, plans, and finds every policy's endpoints through the snapshot's index, as
  the status reporter did;
- `thread`: the Reconciler's lowering with `--lowering thread`: the Store's journal, the
  engine in the reconcile thread;
- `process`: `--lowering process` (the default): the journal sent to the worker process.

`pod_events_per_s` is the events over the time from the first handler call to the last return;
`handler_p99_us` and `handler_max_us` the time one event spent in the handler (a wait for the
Store's lock shows there). 10,000 events at this rate take well under a second, less than one
lowering pass, so the bench then sends `--sustained` seconds of relabel events (every pod moved
to the next app and back, each event a change, so passes run back to back):
`sustained_events_per_s` is the handler's rate while the lowering keeps running. Each round runs
every mode once, interleaved; `ratio_to_none` and `sustained_ratio_to_none` are each mode's
rates over the `none` rates of the same round, and the figures are medians over the rounds.
After the intake the pass catches up, then `pass_ms` times passes of one pod's label
change each (median of 5), by stage, in the reconcile thread: `take` (under the Store's lock:
the snapshot before, the journal now), `lower` (in this process for inline and thread; for
process the wait for the worker, which the main process spends blocked), `plan`, `status` (the
status reporter's computation, no API writes), and `main_ms`, the reconcile thread's own work
(everything but the wait for the worker).

The machine's load average at the start and the end is recorded beside the figures.

`--quick` is a smoke run (small scale, one round); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from convergence import Bench
from kubernetes.client import ApiClient

from stockade.control.config import OperatorConfig
from stockade.control.handlers import build_registry
from stockade.control.lowering import Lowerer
from stockade.control.publish import Publisher
from stockade.control.reconciler import Reconciler
from stockade.control.reporter import StatusReporter
from stockade.control.store import Store, View
from stockade.control.worker import InProcess
from stockade.model.policy import PodSet
from stockade.runtime.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "inline", "thread", "process")
NAMESPACES = 100
CHANGES = 5  # one-change passes timed after the intake

Handler = Callable[..., Coroutine[Any, Any, None]]


def say(message: str) -> None:
    print(f"[intake] {message}", file=sys.stderr, flush=True)


def handlers(store: Store) -> dict[str, Handler]:
    """The operator's kopf handlers, by function name (`pod_event`, `policy_event`, ...)."""
    registry = build_registry(store, lambda obj, deleted: None)
    fns: dict[str, Any] = {
        getattr(h.fn, "__name__", ""): h.fn for h in registry._watching.get_all_handlers()
    }
    return fns


def pod_object(seq: int, nodes: int) -> dict[str, Any]:
    """bench/convergence.py's scale pod: app<i % 10> in namespace big-<seq % 100>."""
    ns, i = f"big-{seq % NAMESPACES}", seq // NAMESPACES
    base = 10 << 24 | 128 << 16  # 10.128.0.0
    address = ".".join(str((base + 10 + seq) >> s & 255) for s in (24, 16, 8, 0))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"p{i}", "namespace": ns, "labels": {"app": f"app{i % 10}"}},
        "spec": {"nodeName": f"virtual-{seq % nodes}", "containers": [{"name": "main"}]},
        "status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}]},
    }


async def fill(store: Store, policies: int, nodes: int) -> None:
    fns = handlers(store)
    for i in range(NAMESPACES):
        labels = {"ns": f"big-{i}", "tier": f"t{i % 10}", "kubernetes.io/metadata.name": f"big-{i}"}
        ns: dict[str, Any] = {"metadata": {"name": f"big-{i}", "labels": labels}}
        await fns["namespace_event"](event={"type": "ADDED", "object": ns})
    for i in range(nodes):
        status = {"addresses": [{"type": "InternalIP", "address": f"172.18.1.{i + 1}"}]}
        obj: dict[str, Any] = {"metadata": {"name": f"virtual-{i}"}, "status": status}
        await fns["node_event"](event={"type": "ADDED", "object": obj})
    for i in range(policies):
        obj = Bench.policy(f"big-{i % NAMESPACES}", i)
        await fns["policy_event"](event={"type": "ADDED", "object": obj})


async def feed(store: Store, events: list[dict[str, Any]]) -> tuple[float, list[float]]:
    """Every event through the pod handler; the seconds it all took and each event's."""
    pod_event = handlers(store)["pod_event"]
    each = []
    began = time.perf_counter()
    for event in events:
        t = time.perf_counter()
        await pod_event(event=event)
        each.append(time.perf_counter() - t)
    return time.perf_counter() - began, each


async def sustain(store: Store, events: list[dict[str, Any]], seconds: float) -> tuple[int, float]:
    """Events from `events`, over and over, through the pod handler for `seconds`: how many
    were taken in and in what time."""
    pod_event = handlers(store)["pod_event"]
    began = time.perf_counter()
    count = 0
    while time.perf_counter() - began < seconds:
        await pod_event(event=events[count % len(events)])
        count += 1
    return count, time.perf_counter() - began


def relabelled(pods: int, nodes: int) -> list[dict[str, Any]]:
    """Every pod moved to the next app, then back: each event a change."""
    out = []
    for step in (1, 0):
        for seq in range(pods):
            obj = pod_object(seq, nodes)
            obj["metadata"]["labels"] = {"app": f"app{(seq // NAMESPACES + step) % 10}"}
            out.append({"type": "MODIFIED", "object": obj})
    return out


class Inline:
    """The lowering as it ran before the worker: a snapshot under the Store's lock, the Lowerer
    in the reconcile thread, and every policy's endpoints from the snapshot's index."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lowerer = Lowerer(services=True)
        self.publisher = Publisher(ApiClient(), is_leader=lambda: False)
        self.reporter = StatusReporter(ApiClient(), is_leader=lambda: False)
        self.stages: dict[str, float] = {}

    def run(self, tables: bool) -> None:
        t0 = time.perf_counter()
        snap = self.store.snapshot(take_changes=True)
        t1 = time.perf_counter()
        desired = self.lowerer.desired(snap)
        t2 = time.perf_counter()
        planned = self.publisher.plan(desired, snap.changed_at)
        t3 = time.perf_counter()
        selected: dict[PodSet, dict[str, int]] = {}
        for record in snap.policies.values():
            if record.policy is not None:
                counts: dict[str, int] = {}
                for pod in snap.state.index.pods_in(record.policy.subject):
                    if pod.node is not None and pod.ips:
                        counts[pod.node] = counts.get(pod.node, 0) + 1
                selected[record.policy.subject] = counts
        view = View(snap.policies, snap.reports)
        self.reporter.report(view, planned.generations, selected)
        t4 = time.perf_counter()
        self.stages = {"take": t1 - t0, "lower": t2 - t1, "plan": t3 - t2, "status": t4 - t3}
        self.stages["main"] = sum(self.stages.values())

    def close(self) -> None:
        pass


class Journal:
    """The Reconciler's own lowering (`--lowering thread|process`): the journal, the engine's
    answer kept in the Reconciler, the plan and the statuses (no API writes)."""

    def __init__(self, store: Store, mode: str) -> None:
        self.store = store
        self.reconciler = Reconciler(store, ApiClient(), services=True, mode=mode)
        self.reporter = StatusReporter(ApiClient(), is_leader=lambda: False)
        self.stages: dict[str, float] = {}

    def run(self, tables: bool) -> None:
        t0 = time.perf_counter()
        view = self.store.take(changes=True)
        t1 = time.perf_counter()
        assert view.changes is not None
        result = self.reconciler.lower(view.changes)
        t2 = time.perf_counter()
        planned = self.reconciler.publisher.plan(self.reconciler.parts, view.changed_at)
        t3 = time.perf_counter()
        self.reporter.report(view, planned.generations, self.reconciler.selected)
        t4 = time.perf_counter()
        self.stages = {"take": t1 - t0, "lower": t2 - t1, "plan": t3 - t2, "status": t4 - t3}
        # In the worker: applying the journal, the snapshot, the lowering, the selections.
        away = (
            sum(result.seconds.values()) if isinstance(self.reconciler.lowering, InProcess) else 0
        )
        self.stages["main"] = sum(self.stages.values()) - away

    def close(self) -> None:
        self.reconciler.close()


def one_round(mode: str, policies: int, pods: int, nodes: int, sustained: float) -> dict[str, Any]:
    asked: list[Callable[[bool], None]] = []  # the runner's request, once there is a runner

    def changed(tables: bool) -> None:
        for ask in asked:
            ask(tables)

    store = Store(on_change=changed)
    asyncio.run(fill(store, policies, nodes))
    events = [{"type": "ADDED", "object": pod_object(i, nodes)} for i in range(pods)]
    changes = relabelled(pods, nodes)
    config = OperatorConfig()
    passes: Inline | Journal | None = None
    runner = None
    if mode != "none":
        passes = Inline(store) if mode == "inline" else Journal(store, mode)
        passes.run(True)  # the policies lowered before the pods arrive, as in a cluster
        runner = Runner(
            passes.run, debounce=config.debounce, min_interval=config.min_interval, resync=1e9
        )
        asked.append(runner.request)
        runner.start()
    try:
        seconds, each = asyncio.run(feed(store, events))
        out: dict[str, Any] = {
            "pod_events_per_s": pods / seconds,
            "handler_p99_us": statistics.quantiles(each, n=100)[98] * 1e6,
            "handler_max_us": max(each) * 1e6,
        }
        runs = runner.runs if runner is not None else 0
        count, seconds = asyncio.run(sustain(store, changes, sustained))
        out["sustained_events_per_s"] = count / seconds
        if runner is not None and passes is not None:
            out["passes_during_intake"] = runs
            out["passes_during_sustained"] = runner.runs - runs
            runner.stop()
            asked.clear()
            passes.run(True)  # catch up with every pod
            stages = []
            for trial in range(CHANGES):
                obj = pod_object(trial, nodes)
                obj["metadata"]["labels"] = {"app": f"app{(trial + 5) % 10}"}
                asyncio.run(handlers(store)["pod_event"](event={"type": "MODIFIED", "object": obj}))
                passes.run(True)
                stages.append(passes.stages)
            out["pass_ms"] = {
                k: statistics.median(s[k] for s in stages) * 1e3 for k in stages[0] if k != "main"
            }
            out["main_ms"] = statistics.median(s["main"] for s in stages) * 1e3
        return out
    finally:
        if runner is not None:
            runner.stop()
        if passes is not None:
            passes.close()


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, dict):
            out[key] = median_of([r[key] for r in rounds])
        else:
            out[key] = round(statistics.median(r[key] for r in rounds), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; numbers mean nothing")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--sustained", type=float, default=5.0, help="seconds of relabel events after the intake"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "intake.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.policies, args.pods, args.nodes, args.sustained = 1, 50, 500, 4, 0.5
    modes = [m for m in args.modes.split(",") if m]
    load_before = os.getloadavg()[0]
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            result = one_round(mode, args.policies, args.pods, args.nodes, args.sustained)
            rounds[mode].append(result)
            say(f"round {r + 1} {mode}: {json.dumps(result)}")
    if "none" in rounds:
        for mode in modes:
            for result, ceiling in zip(rounds[mode], rounds["none"], strict=True):
                result["ratio_to_none"] = result["pod_events_per_s"] / ceiling["pod_events_per_s"]
                result["sustained_ratio_to_none"] = (
                    result["sustained_events_per_s"] / ceiling["sustained_events_per_s"]
                )
    out = {
        "policies": args.policies,
        "pods": args.pods,
        "nodes": args.nodes,
        "rounds": args.rounds,
        "quick": args.quick,
        "load_average": {"start": load_before, "end": os.getloadavg()[0]},
        "modes": {mode: median_of(rounds[mode]) for mode in modes},
        "per_round": rounds,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    say(f"wrote {args.output}")
    print(json.dumps(out["modes"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
