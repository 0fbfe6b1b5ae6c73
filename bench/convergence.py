"""Convergence benchmark (DESIGN.md §7): how fast the whole stack turns an API change into
enforcement, and what the operator costs at scale.

    .venv/bin/python bench/convergence.py [--quick] [--output bench/results/convergence.json]

Runs a sandbox of its own (`stockade.sandbox.session.up`: API server, etcd, two routed nodes, the
operator and one agent per node, restarted here with metrics ports) and measures:

- `apply_to_enforced_ms`: from the API create of a policy (as `kubectl apply` sends it) to the
  first probe of the final run of dropped probes, a TCP connection from the client pod every
  5 ms (the send time of that probe; resolution 5 ms).
- `apply_to_enforced_by_stage_ms`: when each stage of those trials ended, from the stamps on
  this machine's clock (`Bench.split`): the operator's Store took the create in (`taken`: the API
  server, the watch, kopf), the reconcile pass that carries it began (`started`), its publish
  ended (`published`), an agent wrote its map (`mapped`),
  the probes saw it (`enforced`); `label_change_by_stage_ms` likewise for the label trials.
- `label_change_ms`: from the API patch of a client pod's labels (into or out of the peer set a
  policy admits) to the peer set updated in the map: the wall-clock stamp of the last map write
  that changed entries, as the agents report it
  (`stockade_agent_last_map_change_timestamp_seconds`), on the same machine's clock.
- `label_change_to_probe_ms`: from the same patch to the first probe of the final run that shows
  the new outcome (end to end, so also the probe's 5 ms resolution).
- `recompiles_on_label_change`: compile-cache lookups (hits + misses, i.e. program renders that
  reached the compiler) and program loads counted by both agents across all label trials.
- `policies_250_pods_100_s`: 250 policies created one after another over 100 pods (real pods on
  the sandbox nodes, the rest API objects on nodes without an agent), until the last policy's
  effect is seen on real pods and every agent reports the published generation. Policies are
  created in order and the operator reconciles a level-triggered snapshot, so a snapshot that
  holds the last policy holds all of them.
- `scale` (at `--scales`, one scale per run; default 1,000 policies over 10,000 pod objects on
  20 nodes without an agent): `pod_events_per_s` (pod events the operator took in per second,
  from the bench's first pod create to the last event taken in; `pod_events_sent_per_s` is what
  the bench sent, the pods and their statuses as raw JSON from several processes (`podsender`),
  `pod_events_sent_without_operator_per_s` what the same sender reaches with the operator
  stopped (the ceiling of the API server and the sender on this machine), `intake_cpu_s` the CPU
  time the operator, its worker and the machine used meanwhile, and `restart_pod_events_per_s`
  a restarted operator's watch taking in every pod at once),
  `initial_converged_s` (from the last policy create to the end of the publish that carries every
  input, from the operator's gauges; `initial_from_first_create_s` from the first, with the
  DatapathTable writes and the passes until it settled in `initial_tables_written` and
  `initial_reconcile_passes`), `statuses_settled_s` (to the last status write), with what bounds
  them here: `initial_cpu_s` (the CPU time the operator, its lowering worker and the whole
  machine used from the first policy create until the operator settled, beside the machine's
  capacity in that time) and `cold_lowering_s` (the same cluster lowered once from nothing in
  the bench's own process), `one_label_change_ms` and `one_policy_change_ms` (20 trials each:
  from sending one pod's label patch, or one policy's replacement, to the end of the publish
  that first carries it, every node's tables written), `operator_rss_mb` at the end (the
  operator process and its lowering worker together), and the last reconcile pass by stage.

`--quick` is a smoke run (few trials, small scale) for tests; its numbers mean nothing.
Needs root (network namespaces, eBPF), clang and the sandbox toolchain.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import MappingProxyType
from typing import Any

import kubernetes.client
from podsender import send_pods

from stockade import handoff
from stockade.control.lowering import Lowerer
from stockade.control.policies import PolicyRecord
from stockade.control.store import Snapshot
from stockade.model import cluster
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.parse import parse_policy
from stockade.sandbox import session, stack
from stockade.sandbox.controlplane.server import free_port
from stockade.sandbox.node.registration import register_node, set_pod_labels
from stockade.sandbox.processes import Child, is_alive, stop_record
from stockade.sandbox.topology import NodeNet
from stockade.sandbox.workloads.running import RunningSandbox
from stockade.sandbox.workloads.traffic import PodProcesses

ROOT = Path(__file__).resolve().parents[1]
PORT = 80
PROBE_EVERY_S = 0.005
PROBE_TIMEOUT_S = 0.1
STABLE_RUN = 20  # consecutive probes with the new outcome that end a trial
TRIAL_DEADLINE_S = 10.0
CHANGE_TRIALS = 20  # one-change trials per scale
NS = "bench"


def say(message: str) -> None:
    print(f"convergence: {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
    return {
        "p50": round(statistics.median(ordered), 1),
        "p99": round(p99, 1),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
        "trials": len(ordered),
        "each": [round(v, 1) for v in values],  # in order: a slow trial tells more by its place
    }


def by_stage(splits: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """The percentiles of each stage of `Bench.split`'s trials."""
    return {stage: percentiles([s[stage] for s in splits]) for stage in splits[0]}


def stages(split: dict[str, float]) -> str:
    return ", ".join(f"{stage} {ms:.1f}" for stage, ms in split.items())


def metrics(port: int) -> dict[str, float]:
    return stack.read_metrics(port, timeout=5)


def wait(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout:.0f}s (last: {value!r})")
        time.sleep(every)


class PassLog:
    """The operator's reconcile passes as its gauges show them, sampled every `every` s in a
    thread: each sample where the pass count moved, with the wall time, the passes since the
    last sample and the last pass's seconds by stage (several passes between two samples show
    as one line whose stages are the last one's)."""

    def __init__(self, port: int, every: float = 0.1) -> None:
        self.port, self.every = port, every
        self.lines: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pass-log", daemon=True)

    def __enter__(self) -> PassLog:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        passes = metrics(self.port).get("stockade_operator_reconcile_passes_total", 0)
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):
                m = metrics(self.port)
                now = m.get("stockade_operator_reconcile_passes_total", 0)
                if now == passes:
                    continue
                self.lines.append(
                    {
                        "wall": time.time(),
                        "passes": now - passes,
                        "pass_s": round(m.get("stockade_operator_reconcile_seconds", 0.0), 3),
                        **{
                            stage: round(
                                m.get(
                                    f'stockade_operator_reconcile_stage_seconds{{stage="{stage}"}}',
                                    0.0,
                                ),
                                3,
                            )
                            for stage in ("take", "lower", "publish", "status")
                        },
                    }
                )
                passes = now

    def since(self, wall: float, until: float) -> list[dict[str, Any]]:
        """The lines from `wall` to the first at or after `until` (and the one before `wall`),
        their time as seconds from `wall`."""
        first = max([i for i, line in enumerate(self.lines) if line["wall"] <= wall] or [0])
        out = []
        for line in self.lines[first:]:
            fields = {k: v for k, v in line.items() if k != "wall"}
            out.append({**fields, "t": round(line["wall"] - wall, 2)})
            if line["wall"] >= until:
                break
        return out


class Bench:
    """The sandbox, stockade restarted with metrics ports, and three real pods."""

    def __init__(self, state_dir: Path, quick: bool) -> None:
        self.state_dir = state_dir
        self.quick = quick
        self.children: list[Child] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.last_sent = 0.0  # the wall time `published_after` sent its last change
        self.splits: list[dict[str, float]] = []  # apply -> enforced trials by stage (`split`)
        self.label_splits: list[dict[str, float]] = []  # label change trials, likewise
        self.sandbox: RunningSandbox
        self.workload: PodProcesses

    # -- set-up --------------------------------------------------------------------------------

    def start(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            session.up(self.state_dir, 2, "routed", say, detach=False)
        self.sandbox = RunningSandbox.open(self.state_dir)
        state = session.SandboxState.load(self.state_dir)
        assert state is not None and state.stack is not None
        kubeconfig = self.sandbox.kubeconfig
        pins = stack.pin_root(self.sandbox.topology.run_id)
        for record in state.stack.processes:  # the same processes again, with metrics ports
            stop_record(record)
            if record.name.startswith("operator-"):
                argv = stack.operator_argv(kubeconfig, 0, 1)
            else:
                node = self.sandbox.topology.node(record.name.removeprefix("agent-"))
                argv = stack.agent_argv(kubeconfig, node, pins)
            self.ports[record.name] = port = free_port()
            log = self.state_dir / stack.STACK_DIR / f"{record.name}.log"
            child = Child.spawn(record.name, [*argv, f"--metrics-port={port}"], log, detach=False)
            self.children.append(child)
            self.pids[record.name] = child.record.pid
        for name, port in self.ports.items():
            wait(f"{name} serves metrics", lambda p=port: metrics(p), 60)  # type: ignore[misc]
        self.workload = PodProcesses(self.sandbox.topology)
        self.sandbox.ensure_namespace(NS, {"ns": NS})
        for key, on, labels in (
            (f"{NS}/server", "node-1", {"pod": "server"}),
            (f"{NS}/client", "node-2", {"pod": "client"}),
            (f"{NS}/other", "node-1", {"pod": "other"}),
        ):
            self.sandbox.add_pod(key, on, labels, [("serve-80-tcp", PORT, "TCP")])
            self.workload.serve(key, [(PORT, "tcp")])
        self.wait_open()

    def stop(self) -> None:
        with contextlib.suppress(AttributeError):
            self.workload.close()
        with contextlib.suppress(AttributeError):
            self.sandbox.close()
        session.down(self.state_dir, say)
        for child in self.children:
            if child.popen is not None:
                child.popen.wait(timeout=30)

    @property
    def api(self) -> Any:
        return self.sandbox.api

    # -- probes --------------------------------------------------------------------------------

    def connects(self, src: str = f"{NS}/client", dst: str = f"{NS}/server") -> bool:
        ip = self.sandbox.topology.pods[dst].ip_v4
        return self.workload.probe(src, ip, PORT, "tcp", timeout=0.5).value == "connected"

    def wait_open(self) -> None:
        wait("client reaches server", self.connects, 30)

    def wait_agents(self) -> None:
        nodes = [n.name for n in self.sandbox.nodes]
        wait(
            "every agent applied what was published",
            lambda: all(r.ready for r in stack.agent_reports(self.api, nodes)),
            60,
        )

    def timed_change(self, change: Callable[[], None], want_connected: bool) -> float:
        """Probe client -> server every PROBE_EVERY_S; run `change`; return ms from the start of
        `change` to the first probe of the final run of STABLE_RUN probes with the new outcome."""
        agent = self.workload.agent(f"{NS}/client")
        ip = self.sandbox.topology.pods[f"{NS}/server"].ip_v4
        sent: list[tuple[float, Future[dict[str, Any]]]] = []
        stop = threading.Event()

        def loop() -> None:
            tick = time.monotonic()
            while not stop.is_set():
                fut = agent.request(
                    "probe", proto="tcp", dst=ip, port=PORT, timeout=PROBE_TIMEOUT_S, src=None
                )
                sent.append((time.monotonic(), fut))
                tick += PROBE_EVERY_S
                stop.wait(max(0.0, tick - time.monotonic()))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            wait("probes under way", lambda: len(sent) >= 5, 5, 0.005)
            began = time.monotonic()
            change()
            deadline = began + TRIAL_DEADLINE_S
            first = None
            while time.monotonic() < deadline:
                run = 0
                first = None
                for at, fut in list(sent):
                    if at < began or not fut.done():
                        continue
                    ok = fut.result().get("outcome") == "connected"
                    if ok == want_connected:
                        first = at if run == 0 else first
                        run += 1
                    else:
                        run, first = 0, None
                if first is not None and run >= STABLE_RUN:
                    return (first - began) * 1000.0
                time.sleep(0.02)
            raise TimeoutError(f"the change was not enforced within {TRIAL_DEADLINE_S}s")
        finally:
            stop.set()
            thread.join()
            for _, fut in sent:
                with contextlib.suppress(Exception):
                    fut.result(timeout=10)

    # -- measures ------------------------------------------------------------------------------

    def apply_to_enforced(self, trials: int) -> list[float]:
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "isolate-server", "namespace": NS},
            "spec": {"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"]},
        }
        out = []
        for trial in range(trials):
            sent: list[float] = []

            def create(at: list[float] = sent) -> None:
                at.append(time.time())
                self.sandbox.create_policy(policy)

            out.append(self.timed_change(create, False))
            self.splits.append(self.split(sent[0], out[-1]))
            say(
                f"apply -> enforced, trial {trial + 1}/{trials}: {out[-1]:.1f} ms "
                f"({stages(self.splits[-1])})"
            )
            self.sandbox.delete_policy(policy)
            self.wait_open()
            self.wait_agents()
        return out

    def label_changes(self, trials: int) -> tuple[list[float], list[float], dict[str, float]]:
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "clients-only", "namespace": NS},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}],
            },
        }
        self.sandbox.create_policy(policy)
        wait("client isolated", lambda: not self.connects(), 30)
        self.wait_agents()
        counters = (
            "stockade_agent_compile_cache_hits_total",
            "stockade_agent_compile_cache_misses_total",
            "stockade_agent_program_loads_total",
        )
        agents = [n for n in self.ports if n.startswith("agent-")]
        core = kubernetes.client.CoreV1Api(self.api)
        before = {c: sum(metrics(self.ports[a]).get(c, 0.0) for a in agents) for c in counters}
        out, to_map = [], []
        for trial in range(trials):
            joined = trial % 2 == 0
            # One PATCH, no read first: the figure is the change's, not the client's.
            patch = {"metadata": {"labels": {"role": "client" if joined else None}}}
            sent: list[float] = []

            def change(body: dict[str, Any] = patch, at: list[float] = sent) -> None:
                at.append(time.time())
                core.patch_namespaced_pod("client", NS, body)

            out.append(self.timed_change(change, joined))
            self.wait_agents()
            to_map.append(self.map_changed_after(agents, sent[0]))
            self.label_splits.append(self.split(sent[0], out[-1]))
            say(
                f"label change ({'in' if joined else 'out'}), trial {trial + 1}: "
                f"map {to_map[-1]:.1f} ms, probe {out[-1]:.1f} ms "
                f"({stages(self.label_splits[-1])})"
            )
        after = {c: sum(metrics(self.ports[a]).get(c, 0.0) for a in agents) for c in counters}
        self.sandbox.delete_policy(policy)
        set_pod_labels(self.api, NS, "client", {"pod": "client"})
        self.wait_open()
        return to_map, out, {c: after[c] - before[c] for c in counters}

    def split(self, sent: float, total_ms: float) -> dict[str, float]:
        """When each stage of one trial ended, in ms after `sent` (the change), from the stamps
        on this machine's clock: `taken` (the operator's Store took the change in: the API
        write, the watch and kopf), `started` (the start of the reconcile pass that carries it:
        after `taken`, the change waited for a pass under way or the rate limit; a pass that
        began before it and took it in shows before `taken`), `published` (the end of the
        publish that carries it, every node's objects written), `mapped` (the last map write
        that changed entries, on any agent) and `enforced` (`total_ms`, the first probe with
        the new outcome). An agent may write its map before the publish ends (it watches its
        own node's objects, written in parallel) and a probe sent just before the map write may
        still see the change (it arrives after it), so only `taken` is bound to come first.
        Read right after the trial, before anything else changes."""
        op = metrics(self.ports["operator-0"])
        taken = op.get("stockade_operator_input_change_timestamp_seconds", 0.0)
        published = op.get("stockade_operator_published_timestamp_seconds", 0.0)
        started = op.get("stockade_operator_published_pass_started_timestamp_seconds", 0.0)
        mapped = self.last_map_write([a for a in self.ports if a.startswith("agent-")])
        if not sent <= taken <= min(published, mapped):
            raise RuntimeError(
                f"stamps out of order: sent {sent}, taken {taken}, published {published}, "
                f"mapped {mapped}"
            )
        return {
            "taken": (taken - sent) * 1000.0,
            "started": (started - sent) * 1000.0,
            "published": (published - sent) * 1000.0,
            "mapped": (mapped - sent) * 1000.0,
            "enforced": total_ms,
        }

    def last_map_write(self, agents: list[str]) -> float:
        """The wall-clock stamp of the last map write that changed entries on any of `agents`."""
        return max(
            metrics(self.ports[a]).get("stockade_agent_last_map_change_timestamp_seconds", 0.0)
            for a in agents
        )

    def map_changed_after(self, agents: list[str], sent: float) -> float:
        """Milliseconds from `sent` (wall clock, just before the PATCH) to the last map write that
        changed entries on any agent: the peer set updated in the map on every node."""
        stamp = self.last_map_write(agents)
        if stamp < sent:
            raise RuntimeError("no agent wrote a map entry after the label change")
        return (stamp - sent) * 1000.0

    # -- scale ---------------------------------------------------------------------------------

    def virtual_nodes(self, count: int) -> list[str]:
        nets = [virtual_node(index) for index in range(count)]
        for net in nets:
            register_node(self.api, net)
        return [net.name for net in nets]

    def api_pods(
        self, namespaces: list[str], total: int, nodes: list[str], base: str = "10.128.0.10"
    ) -> tuple[set[tuple[str, str]], tuple[float, float]]:
        """Pod objects (Running, with an address) with no network namespace behind them, sent
        by `podsender` (several processes, raw JSON) so that the bench is not the bound: the
        (namespace, app) pairs made, and the wall times of the first request and the last
        answer."""
        for ns in namespaces:
            self.sandbox.ensure_namespace(ns, namespace_labels(ns))
        pods = scale_pods(namespaces, total, nodes, base)
        jobs = [
            (
                ns,
                name,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {
                        "nodeName": node,
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "containers": [{"name": "main", "image": "stockade.invalid/none"}],
                    },
                },
                {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
            )
            for ns, name, labels, ip, node in pods
        ]
        sent = send_pods(str(self.sandbox.kubeconfig), jobs)
        return {(ns, labels["app"]) for ns, _, labels, _, _ in pods}, sent

    @staticmethod
    def policy(ns: str, index: int) -> dict[str, Any]:
        """A typical namespace policy: app<n> admits app<n+1> of its namespace and any pod of
        namespaces of one tier, on a port of its own (so that no policy is shadowed by an
        identical one and every policy's rule decides some traffic and so is published)."""
        app = index % 10
        kind = "NetworkPolicy"
        return {
            "apiVersion": "networking.k8s.io/v1" if index % 2 else "stockade.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": f"pol{index}", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": f"app{app}"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {"matchLabels": {"app": f"app{(app + 1) % 10}"}}},
                            {"namespaceSelector": {"matchLabels": {"tier": f"t{index % 10}"}}},
                        ],
                        "ports": [{"protocol": "TCP", "port": 8000 + index}],
                    }
                ],
            },
        }

    def many_policies(self, namespaces: list[str], count: int) -> list[dict[str, Any]]:
        made = []
        for index in range(count):
            obj = self.policy(namespaces[index % len(namespaces)], index)
            self.sandbox.create_policy(obj)
            made.append(obj)
        return made

    def published_rule_names(self) -> set[str]:
        custom = kubernetes.client.CustomObjectsApi(self.api)
        listing: Any = custom.list_cluster_custom_object(
            "stockade.io",
            "v1alpha1",
            "datapathtables",
            label_selector="stockade.io/part in (rules,program)",
        )
        return {
            handoff.decode_rule(entry)[1].name
            for item in listing["items"]
            for entry in handoff.rule_entries(item["spec"]["part"], item["spec"].get("entries", []))
        }

    def policies_over_pods(self, policies: int, pods: int) -> dict[str, float]:
        """`policies` policies over `pods` pods (three real), until the last is enforced."""
        nodes = self.virtual_nodes(2)
        namespaces = [f"scale-{i}" for i in range(10)]
        self.api_pods(namespaces, pods - 3, nodes)
        last = {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny-client", "namespace": NS},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "action": "Deny",
                        "from": [{"podSelector": {"matchLabels": {"pod": "client"}}}],
                    }
                ],
            },
        }
        self.wait_agents()
        began = time.monotonic()
        made = self.many_policies(namespaces, policies - 1)
        self.sandbox.create_policy(last)
        created = time.monotonic() - began
        wait("the last policy is enforced", lambda: not self.connects(), 120, 0.0)
        self.wait_agents()
        enforced = time.monotonic() - began
        for obj in [*made, last]:
            self.sandbox.delete_policy(obj)
        self.wait_open()
        return {"seconds": round(enforced, 2), "create_seconds": round(created, 2)}

    @staticmethod
    def settled(port: int, quiet: float = 5.0, timeout: float = 900.0) -> dict[str, float]:
        """The operator's metrics once it has run no reconcile pass (so no event changed what it
        knows: its intake of watch events has caught up), written nothing for `quiet` s and has
        no pass under way (a long one, at scale, moves no counter until it ends)."""
        keys = (
            "stockade_operator_generation",
            "stockade_operator_status_writes_total",
            "stockade_operator_reconcile_passes_total",
        )
        last, since = metrics(port), time.monotonic()
        deadline = since + timeout
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator kept writing for {timeout:.0f}s: {last}")
            time.sleep(0.5)
            now = metrics(port)
            running = now.get("stockade_operator_reconcile_running", 0.0)
            if running or any(now.get(k) != last.get(k) for k in keys):
                last, since = now, time.monotonic()
        return last

    def _initial(
        self, op: int, apps: Any, made: list[dict[str, Any]]
    ) -> tuple[float, float, list[dict[str, Any]]]:
        """Wait for the operator to publish the policies `made` and settle: the wall times of
        its last publish and its last status write, and the policies that select pods."""
        # The last policy that selects pods (one that selects none publishes no rule).
        selecting = [
            p
            for p in made
            if (p["metadata"]["namespace"], p["spec"]["podSelector"]["matchLabels"]["app"]) in apps
        ]
        name = selecting[-1]["metadata"]["name"]
        wait(
            "the operator publishes the last policy",
            lambda: name in self.published_rule_names(),
            1800,
            1.0,
        )
        self.settled(op)
        m = metrics(op)
        return (
            m["stockade_operator_published_timestamp_seconds"],
            m["stockade_operator_last_status_write_timestamp_seconds"],
            selecting,
        )

    def operator_at_scale(self, policies: int, pods: int, node_count: int) -> dict[str, Any]:
        """`policies` policies over `pods` pod objects on `node_count` nodes without an agent:
        the operator's intake, convergence, one-change latencies and memory."""
        op = self.ports["operator-0"]
        nodes = self.virtual_nodes(node_count)
        namespaces = [f"big-{i}" for i in range(100)]
        before = metrics(op)
        intake_began, intake_cpu = time.monotonic(), cpu_seconds(self.pids["operator-0"])
        apps, (first_sent, last_sent) = self.api_pods(namespaces, pods, nodes)
        sent_s = last_sent - first_sent
        say(f"{pods} pod objects in {sent_s:.0f}s")
        # Every pod is two events (created, then its status with the address).
        wait(
            "the operator takes in every pod event",
            lambda: (
                metrics(op).get("stockade_operator_pod_events_total", 0)
                - before.get("stockade_operator_pod_events_total", 0)
                >= 2 * pods
            ),
            1800,
            0.5,
        )
        taken = metrics(op)
        intake_wall, intake_cpu_after = (
            time.monotonic() - intake_began,
            cpu_seconds(self.pids["operator-0"]),
        )
        events = taken["stockade_operator_pod_events_total"] - before.get(
            "stockade_operator_pod_events_total", 0
        )
        intake_s = taken["stockade_operator_last_pod_event_timestamp_seconds"] - first_sent
        self.settled(op)
        began, began_wall = time.monotonic(), time.time()
        quiet = metrics(op)
        cpu_before = cpu_seconds(self.pids["operator-0"])
        with PassLog(op) as passes:
            made = self.many_policies(namespaces, policies)
            created, created_wall = time.monotonic(), time.time()
            say(f"{len(made)} policies in {created - began:.0f}s")
            initial, statuses, selecting = self._initial(op, apps, made)
            settled = metrics(op)
            cpu_after = cpu_seconds(self.pids["operator-0"])
            settled_s = time.monotonic() - began
            core = kubernetes.client.CoreV1Api(self.api)
            labels, first_label = [], 0.0
            for trial in range(CHANGE_TRIALS):
                app = "app9" if trial % 2 == 0 else "app0"
                body = {"metadata": {"labels": {"app": app}}}
                patch = functools.partial(core.patch_namespaced_pod, "p0", namespaces[0], body)
                labels.append(self.published_after(op, patch))
                first_label = first_label or self.last_sent
        changed = []
        for trial in range(CHANGE_TRIALS):
            obj = json.loads(json.dumps(selecting[trial % len(selecting)]))
            port = obj["spec"]["ingress"][0]["ports"][0]
            port["port"] += 20_000 if (trial // len(selecting)) % 2 == 0 else 0
            changed.append(self.published_after(op, lambda o=obj: self.sandbox.replace_policy(o)))
        m = metrics(op)
        rss, hwm = memory(self.pids["operator-0"])
        restart, unwatched = self.restart_intake(pods, nodes)
        say("the same cluster lowered cold in this process")
        cold = cold_lowering_s(namespaces, policies, pods, node_count)
        return {
            "policies": len(made),
            "pods": pods,
            "nodes": node_count,
            "initial_converged_s": round(initial - created_wall, 2),
            # from the first policy create instead, and what the operator wrote and how many
            # passes it ran from then until it settled (a burst's write volume)
            "initial_from_first_create_s": round(initial - began_wall, 2),
            "initial_tables_written": int(
                settled["stockade_operator_tables_written_total"]
                - quiet["stockade_operator_tables_written_total"]
            ),
            "initial_reconcile_passes": int(
                settled["stockade_operator_reconcile_passes_total"]
                - quiet["stockade_operator_reconcile_passes_total"]
            ),
            "statuses_settled_s": round(statuses - created_wall, 2),
            # What bounds the two above on this machine. The CPU time used from the first
            # policy create until the operator settled (`wall_s`): by the operator's process
            # (kopf's intake, the publisher), by its lowering worker, and by the whole machine
            # (`capacity` is wall_s times the CPUs: the API server, etcd and the bench share
            # them); and the same cluster's first lowering alone, in the bench's process.
            "initial_cpu_s": cpu_used(cpu_before, cpu_after, settled_s),
            "cold_lowering_s": cold,
            # what the operator did from the last policy create on (t: s after it): where the
            # two figures above went
            "initial_passes": passes.since(created_wall, until=initial),
            # likewise from the first label change's patch to its publish
            "first_label_change_passes": passes.since(
                first_label, until=first_label + labels[0] / 1000.0
            ),
            "one_label_change_ms": percentiles(labels),
            "one_policy_change_ms": percentiles(changed),
            "pod_events_per_s": round(events / intake_s, 1),
            # what the bench sent: when it is close to the figure above, the sender bounds it
            "pod_events_sent_per_s": round(2 * pods / sent_s, 1),
            # a new operator's watch taking in every pod at once while it lowers
            "restart_pod_events_per_s": restart,
            # what the sender and the API server reach with no operator running: the ceiling
            # of `pod_events_sent_per_s` on this machine
            "pod_events_sent_without_operator_per_s": unwatched,
            # the CPU time used from the start of the pods' send until the operator had taken
            # every event in, as `initial_cpu_s` counts it (the rest of `machine`: the API
            # server, etcd, the sender's processes, the agents)
            "intake_cpu_s": cpu_used(intake_cpu, intake_cpu_after, intake_wall),
            "operator_rss_mb": rss,
            "operator_peak_rss_mb": hwm,
            "reconcile_pass_s": round(m.get("stockade_operator_reconcile_seconds", 0.0), 3),
            "reconcile_stage_s": {
                stage: round(
                    m.get(f'stockade_operator_reconcile_stage_seconds{{stage="{stage}"}}', 0.0), 3
                )
                for stage in ("take", "lower", "publish", "status")
            },
            "policy_create_s": round(created - began, 1),
            "last_policy_checked": selecting[-1]["metadata"]["name"],
        }

    def restart_intake(self, pods: int, nodes: list[str]) -> tuple[float, float]:
        """Stop the operator; send half as many pods again (at most 5,000) with no operator
        watching, what the API server and the sender reach alone on this machine (events a
        second); then restart it and measure how fast its pod watch takes in every pod (from
        its first pod event to the last), while its first passes lower."""
        child = next(c for c in self.children if c.record.name == "operator-0")
        child.stop()
        self.children.remove(child)
        extra = max(1, min(pods // 2, 5000))
        _, (first_sent, last_sent) = self.api_pods(
            [f"unwatched-{i}" for i in range(10)], extra, nodes, base="10.250.0.10"
        )
        unwatched = round(2 * extra / max(last_sent - first_sent, 1e-3), 1)
        pods += extra
        argv = [*stack.operator_argv(self.sandbox.kubeconfig, 0, 1)]
        self.ports["operator-0"] = port = free_port()
        log = self.state_dir / stack.STACK_DIR / "operator-0-restarted.log"
        child = Child.spawn("operator-0", [*argv, f"--metrics-port={port}"], log, detach=False)
        self.children.append(child)
        self.pids["operator-0"] = child.record.pid
        wait("the operator serves metrics", lambda: metrics(port), 60)
        m = wait(
            "the restarted operator takes in every pod",
            lambda: (
                (got := metrics(port)).get("stockade_operator_pod_events_total", 0) >= pods and got
            ),
            900,
            0.2,
        )
        first = m["stockade_operator_first_pod_event_timestamp_seconds"]
        last = m["stockade_operator_last_pod_event_timestamp_seconds"]
        self.settled(port)
        taken = m["stockade_operator_pod_events_total"]
        return round(taken / max(last - first, 1e-3), 1), unwatched

    def published_after(self, port: int, change: Callable[[], Any]) -> float:
        """Milliseconds from sending `change` to the end of the publish that first carries it
        (every node's tables written), from the operator's gauges on this machine's clock; then
        waits until its statuses are written too, so that trials do not overlap."""
        sent = self.last_sent = time.time()
        change()

        def done() -> dict[str, float] | None:
            m = metrics(port)
            latest = m.get("stockade_operator_input_change_timestamp_seconds", 0.0)
            published = m.get("stockade_operator_published_input_change_timestamp_seconds", 0.0)
            return m if latest >= sent and published == latest else None

        m = wait("the change is published", done, 600, 0.01)
        self.settled(port, quiet=1.0)
        return (m["stockade_operator_published_timestamp_seconds"] - sent) * 1000.0


def virtual_node(index: int) -> NodeNet:
    """A node of the scale phase: registered, with no network namespace or agent behind it."""
    return NodeNet(
        name=f"virtual-{index}",
        netns="none",
        index=100 + index,
        pod_cidr_v4=f"10.{128 + index}.0.0/16",
        pod_cidr_v6=f"fd00:10:{128 + index}::/64",
        ip_v4=f"172.18.1.{index + 1}",
        ip_v6=f"fc00:f853:ccd:e794::{index + 1}",
    )


def namespace_labels(ns: str) -> dict[str, str]:
    return {"ns": ns, "tier": "t" + ns[-1]}


# namespace, name, labels, address, node
ScalePod = tuple[str, str, dict[str, str], str, str]


def scale_pods(
    namespaces: list[str], total: int, nodes: list[str], base: str = "10.128.0.10"
) -> list[ScalePod]:
    """The scale phase's pods: spread over the namespaces and the nodes in turn, their
    addresses from `base` on."""
    first = ipaddress.ip_address(base)
    out: list[ScalePod] = []
    for seq in range(total):
        ns, i = namespaces[seq % len(namespaces)], seq // len(namespaces)
        name = f"p{i}"
        labels = {"app": f"app{i % 10}", "pod": name}
        out.append((ns, name, labels, str(first + seq), nodes[seq % len(nodes)]))
    return out


def cold_lowering_s(namespaces: list[str], policies: int, pods: int, node_count: int) -> float:
    """The scale phase's cluster (the same namespaces, pods, nodes and policies, built here
    instead of read from the API) lowered and encoded once from nothing, in this process: what
    the operator's first pass costs on this machine with nothing else running."""
    nets = [virtual_node(index) for index in range(node_count)]
    state = ClusterState(
        [
            Namespace(ns, {**namespace_labels(ns), "kubernetes.io/metadata.name": ns})
            for ns in namespaces
        ],
        [
            Pod(ns, name, labels, (cluster.ip(address),), node)
            for ns, name, labels, address, node in scale_pods(
                namespaces, pods, [n.name for n in nets]
            )
        ],
        [Node(n.name, (cluster.ip(n.ip_v4), cluster.ip(n.ip_v6))) for n in nets],
    )
    made = []
    for index in range(policies):
        obj = Bench.policy(namespaces[index % len(namespaces)], index)
        made.append(parse_policy(obj))
    records = {
        (p.kind.value, p.namespace, p.name): PolicyRecord(p.kind, p.namespace, p.name, "", 1, p)
        for p in made
    }
    snap = Snapshot(state, MappingProxyType(records), MappingProxyType({}))
    began = time.perf_counter()
    Lowerer().desired(snap)
    return round(time.perf_counter() - began, 2)


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system, s) used so far by `pid` (`operator`), its children together
    (`worker`: the lowering worker), and the machine's CPUs together (`machine`, every process:
    the API server, etcd and the bench too)."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(one: int | str) -> float:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    busy = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    machine = sum(int(v) for i, v in enumerate(busy[:8]) if i not in (3, 4)) / tick
    return {
        "operator": of(pid),
        "worker": sum(of(c) for c in _children(pid)),
        "machine": machine,
    }


def cpu_used(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """The CPU time used between two `cpu_seconds` readings `wall` s apart, beside the
    machine's capacity in that time."""
    return {
        "wall_s": round(wall, 2),
        "capacity": round(wall * (os.cpu_count() or 1), 2),
        **{k: round(after[k] - before[k], 2) for k in after},
    }


def memory(pid: int) -> tuple[float, float]:
    """RSS and peak RSS in MB of `pid` and its children together (the operator's lowering
    worker: they share the operator container's memory limit); the peak is the sum of each
    one's peak, an upper bound."""
    pids = [pid, *(int(c) for c in _children(pid))]
    rss = hwm = 0
    for one in pids:
        fields = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        rss += int(fields.get("VmRSS", "0").split()[0])
        hwm += int(fields.get("VmHWM", "0").split()[0])
    return round(rss / 1024, 1), round(hwm / 1024, 1)


def _children(pid: int) -> list[str]:
    """The child processes of `pid`, whichever of its threads started them (each thread lists
    its own: the operator starts its lowering worker from a thread that is not the main one)."""
    out: list[str] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += (task / "children").read_text().split()
    return out


@contextlib.contextmanager
def bench(quick: bool) -> Iterator[Bench]:
    with tempfile.TemporaryDirectory(prefix="stockade-convergence-") as tmp:
        running = Bench(Path(tmp) / "sandbox", quick)
        try:
            running.start()
            yield running
        finally:
            running.stop()


PHASES = ("latency", "small", "scale")


def run(
    quick: bool,
    scales: tuple[tuple[int, int, int], ...] = ((1000, 10_000, 20),),
    phases: tuple[str, ...] = PHASES,
) -> dict[str, Any]:
    trials = 3 if quick else 40
    scale = (20, 10) if quick else (250, 100)
    if quick:
        scales = ((50, 200, 4),)
    out: dict[str, Any] = {
        "quick": quick,
        "phases": list(phases),
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    with bench(quick) as b:
        if "latency" in phases:
            applied = b.apply_to_enforced(trials)
            to_map, to_probe, compiles = b.label_changes(trials)
            out["apply_to_enforced_ms"] = percentiles(applied)
            out["apply_to_enforced_by_stage_ms"] = by_stage(b.splits)
            out["label_change_ms"] = percentiles(to_map)
            out["label_change_by_stage_ms"] = by_stage(b.label_splits)
            out["label_change_to_probe_ms"] = percentiles(to_probe)
            out["recompiles_on_label_change"] = int(
                compiles["stockade_agent_compile_cache_hits_total"]
                + compiles["stockade_agent_compile_cache_misses_total"]
            )
            out["program_loads_on_label_change"] = int(
                compiles["stockade_agent_program_loads_total"]
            )
        if "small" in phases:
            small = b.policies_over_pods(scale[0], scale[1])
            say(f"{scale[0]} policies over {scale[1]} pods: {small}")
            out["policies_250_pods_100_s"] = small["seconds"]
            out["policies_250_pods_100"] = {**small, "policies": scale[0], "pods": scale[1]}
        if "scale" in phases:
            out["scale"] = {}
            for policies, pods, nodes in scales:
                big = b.operator_at_scale(policies, pods, nodes)
                say(f"operator at {policies} policies, {pods} pods, {nodes} nodes: {big}")
                out["scale"][f"{policies}x{pods}"] = big
        out["stack_alive_at_end"] = all(is_alive(c.record) for c in b.children)
    out["load_average_at_end"] = round(os.getloadavg()[0], 2)
    out["probe"] = {"every_ms": PROBE_EVERY_S * 1000, "timeout_ms": PROBE_TIMEOUT_S * 1000}
    return out


def on_sigterm(pid: int) -> Callable[[int, Any], None]:
    """Leave through the `finally` blocks (which remove the sandbox) on SIGTERM; a forked copy of
    this process (pyroute2 forks helpers) just dies, as it would without the handler."""

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    return handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; numbers mean nothing")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "convergence.json"
    )
    parser.add_argument(
        "--scales",
        default="1000x10000x20",
        help="POLICIESxPODSxNODES of the scale phase (default 1000x10000x20); one per run: a "
        "second scale in the same sandbox would meet the first one's namespaces, pod names, "
        "addresses and policies",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    args = parser.parse_args(argv)
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown phase(s) {', '.join(unknown)}; choose from {PHASES}")
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))
    try:
        scales = tuple(
            (int(p), int(n), int(k))
            for p, n, k in (item.split("x") for item in args.scales.split(",") if item)
        )
    except ValueError:
        parser.error(f"--scales: {args.scales!r} is not POLICIESxPODSxNODES")
    if len(scales) > 1:
        parser.error(
            f"--scales: {args.scales!r} names {len(scales)} scales; run each in its own "
            "invocation (with its own --output): in one sandbox the second would meet the "
            "first one's namespaces, pod names, addresses and policies"
        )
    result = run(args.quick, scales, phases)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {args.output}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
