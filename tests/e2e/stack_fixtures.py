"""The whole stack for the e2e enforcement and restart tests: a sandbox of their own (API server,
etcd, two routed network-namespace nodes, the operator and one agent per node, all started by
`stockade.sandbox.session.up` exactly as `stockade sandbox up` starts them), a small model of
pods with TCP echo servers, and helpers that observe reachability with real connections.

Each test module opens one `running_stack()` for all its tests (`stockade.sandbox.session.down`
removes every process, namespace and pin afterwards, also when a test failed) and calls
`Stack.reset()` between tests, which deletes every policy, restores the model's labels, removes
pods a test added and waits until every pair of pods connects again.

Waits poll until the observation holds and fail with the last observation at their deadline;
nothing here sleeps in place of an observation.

The sandbox CLI tests (test_sandbox_cli.py, test_sandbox_stack.py) run `stockade sandbox` as a
user does instead: `stockade()` runs one command, `sandbox_state_dir()` gives a private state
directory that `down` clears afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.sandbox import session, stack
from stockade.sandbox.controlplane.server import free_port
from stockade.sandbox.node.registration import set_pod_labels
from stockade.sandbox.processes import Child, ProcessRecord, is_alive
from stockade.sandbox.topology import PodNet
from stockade.sandbox.workloads.running import RunningSandbox
from stockade.sandbox.workloads.traffic import Outcome, PodProcesses, Probe

CLI_TIMEOUT_S = 600  # `stockade sandbox up` starts a control plane, nodes, operator and agents
PORT = 80
DENIED_TIMEOUT_S = 0.5  # a probe that sees nothing for this long is a drop
CONVERGE_TIMEOUT_S = 30.0
NAMESPACES: Mapping[str, Mapping[str, str]] = {"x": {"ns": "x"}, "y": {"ns": "y"}}
# pod -> (node, labels): every namespace has a pod on each node, so traffic crosses nodes.
PODS: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "x/a": ("node-1", {"pod": "a"}),
    "x/b": ("node-2", {"pod": "b"}),
    "y/a": ("node-1", {"pod": "a"}),
    "y/b": ("node-2", {"pod": "b"}),
}

Pair = tuple[str, str]


def _say(message: str) -> None:
    print(f"stack: {message}", file=sys.stderr, flush=True)


def stockade(
    state_dir: Path, *args: str, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`stockade sandbox --state-dir STATE_DIR ARGS...` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "sandbox", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def sandbox_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A private state directory below `tmp_path`; `down` runs afterwards whatever happened."""
    path = tmp_path / "sandbox"
    try:
        yield path
    finally:
        stockade(path, "down")


def describe(observed: Mapping[Pair, Outcome], denied: set[Pair]) -> str:
    wrong = [
        f"{src}->{dst}: {seen} (expected {'denied' if (src, dst) in denied else 'allowed'})"
        for (src, dst), seen in sorted(observed.items())
        if seen != (Outcome.TIMEOUT if (src, dst) in denied else Outcome.CONNECTED)
    ]
    return "; ".join(wrong) or "as expected"


@dataclass
class Stack:
    """A running sandbox with stockade in it, and the model's pods."""

    state_dir: Path
    sandbox: RunningSandbox
    workload: PodProcesses
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # pod -> current labels
    processes: dict[str, ProcessRecord] = field(default_factory=dict)  # name -> running record
    metrics_ports: dict[str, int] = field(default_factory=dict)  # name -> --metrics-port
    children: list[Child] = field(default_factory=list)  # started by `start()`, to reap

    @property
    def api(self) -> Any:
        return self.sandbox.api

    @property
    def kubeconfig(self) -> Path:
        return self.sandbox.kubeconfig

    # -- pods ----------------------------------------------------------------------------------

    def add_pod(self, key: str, node: str, labels: Mapping[str, str]) -> PodNet:
        """A pod with a TCP echo server on PORT, registered as the sandbox kubelet does."""
        net = self.sandbox.add_pod(key, node, labels, [(f"serve-{PORT}-tcp", PORT, "TCP")])
        self.workload.serve(key, [(PORT, "tcp")])
        self.labels[key] = dict(labels)
        return net

    def remove_pod(self, key: str) -> None:
        self.workload.forget(key)
        self.sandbox.remove_pod(key)
        self.labels.pop(key, None)

    def pod(self, key: str) -> PodNet:
        return self.sandbox.topology.pods[key]

    def set_pod_labels(self, key: str, labels: Mapping[str, str]) -> None:
        namespace, _, name = key.partition("/")
        set_pod_labels(self.api, namespace, name, dict(labels))
        self.labels[key] = dict(labels)

    def pairs(self) -> list[Pair]:
        """Every ordered pair of distinct pods."""
        pods = sorted(self.labels)
        return [(src, dst) for src in pods for dst in pods if src != dst]

    # -- traffic -------------------------------------------------------------------------------

    def observe(
        self, pairs: Iterable[Pair], timeout: float = DENIED_TIMEOUT_S
    ) -> dict[Pair, Outcome]:
        """One TCP connection per pair, all at once."""
        pairs = list(pairs)
        probes = [Probe(src, self.pod(dst).ip_v4, PORT, "tcp", timeout) for src, dst in pairs]
        results = self.workload.probe_many(probes)
        return {pair: result.outcome for pair, result in zip(pairs, results, strict=True)}

    def wait_reachability(
        self,
        denied: Iterable[Pair],
        pairs: Iterable[Pair] | None = None,
        timeout: float = CONVERGE_TIMEOUT_S,
    ) -> dict[Pair, Outcome]:
        """Probe `pairs` (default: all) until exactly `denied` time out and every other pair
        connects; fail at the deadline with the last observation."""
        denied = set(denied)
        pairs = list(pairs) if pairs is not None else self.pairs()
        unknown = denied - set(pairs)
        assert not unknown, f"denied pairs {sorted(unknown)} are not probed"
        deadline = time.monotonic() + timeout
        while True:
            observed = self.observe(pairs)
            if describe(observed, denied) == "as expected":
                return observed
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"reachability did not converge within {timeout:.0f}s: "
                    f"{describe(observed, denied)}"
                )

    # -- policies and reset --------------------------------------------------------------------

    def apply(self, obj: Mapping[str, Any]) -> None:
        """Create the policy as `kubectl apply` would (a create of the whole object)."""
        self.sandbox.create_policy(obj)

    def replace(self, obj: Mapping[str, Any]) -> None:
        self.sandbox.replace_policy(obj)

    def delete(self, obj: Mapping[str, Any]) -> None:
        assert self.sandbox.delete_policy(obj), f"{obj['metadata']['name']} did not exist"

    def reset(self) -> None:
        """Back to the model: no policies, the model's labels and pods, everything reachable."""
        self.sandbox.delete_all_policies(sorted(NAMESPACES))
        for name, labels in NAMESPACES.items():
            self.sandbox.set_namespace_labels(name, labels)
        for key in sorted(set(self.labels) - set(PODS)):
            self.remove_pod(key)
        for key, (_, labels) in PODS.items():
            if self.labels.get(key) != labels:
                self.set_pod_labels(key, labels)
        self.wait_reachability(denied=())

    # -- stockade's processes ------------------------------------------------------------------

    def pin_root(self, node: str) -> Path:
        return stack.pin_root(self.sandbox.topology.run_id) / node

    def kill(self, name: str) -> None:
        """SIGKILL a running operator or agent (`operator-0`, `agent-node-1`) and reap it."""
        record = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
        mine = [c for c in self.children if c.record == record]
        if mine and mine[0].popen is not None:
            mine[0].popen.wait()
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(record.pid, 0)
        assert not is_alive(record), f"{name} (pid {record.pid}) survived SIGKILL"

    def start(self, name: str) -> None:
        """Start `name` again as the sandbox starts it, plus a metrics port to watch it by."""
        kubeconfig = self.kubeconfig
        if name.startswith("operator-"):
            argv = stack.operator_argv(kubeconfig, int(name.split("-")[1]), 1)
        else:
            node = self.sandbox.topology.node(name.removeprefix("agent-"))
            argv = stack.agent_argv(kubeconfig, node, stack.pin_root(self.sandbox.topology.run_id))
        port = free_port()
        argv.append(f"--metrics-port={port}")
        log = self.state_dir / stack.STACK_DIR / f"{name}.log"
        child = Child.spawn(name, argv, log, detach=False)
        self.children.append(child)
        self.processes[name] = child.record
        self.metrics_ports[name] = port

    def metrics(self, name: str) -> dict[str, float]:
        """The gauges of a process started by `start()` ({} while it is not up)."""
        return stack.read_metrics(self.metrics_ports[name])

    def published(self) -> dict[str, int | None]:
        return stack.published_generations(self.api, [n.name for n in self.sandbox.nodes])

    def wait_agents_applied(self, timeout: float = CONVERGE_TIMEOUT_S) -> list[stack.AgentReport]:
        """Until every node's agent reports the generation published for its node."""
        nodes = [n.name for n in self.sandbox.nodes]
        deadline = time.monotonic() + timeout
        while True:
            reports = stack.agent_reports(self.api, nodes)
            if all(r.ready for r in reports):
                return reports
            if time.monotonic() > deadline:
                raise AssertionError(
                    "agents did not apply what was published within "
                    f"{timeout:.0f}s: {'; '.join(f'{r.node}: {r.describe()}' for r in reports)}"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def running_stack(state_dir: Path) -> Iterator[Stack]:
    """A two-node sandbox with stockade and the model's pods; everything removed afterwards."""
    children: list[Child] = []
    try:
        # `up` keeps only records of the processes it starts as children of this one; their
        # Popen handles go at once, which warns while they run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            session.up(state_dir, 2, "routed", _say, detach=False)
        sandbox = RunningSandbox.open(state_dir)
        state = session.SandboxState.load(state_dir)
        assert state is not None and state.stack is not None
        with PodProcesses(sandbox.topology) as workload:
            running = Stack(state_dir, sandbox, workload)
            running.processes = {p.name: p for p in state.stack.processes}
            children = running.children
            for name, labels in NAMESPACES.items():
                sandbox.ensure_namespace(name, labels)
            for key, (node, labels) in PODS.items():
                running.add_pod(key, node, labels)
            running.wait_reachability(denied=())
            try:
                yield running
            finally:
                sandbox.close()
    finally:
        session.down(state_dir, _say)
        for child in children:
            if child.popen is not None:
                child.popen.wait(timeout=30)
