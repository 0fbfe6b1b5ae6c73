"""`stockade demo`: stockade enforcing the example policies on a sandbox, with real traffic.

Starts a 2-node sandbox (unless one is running), creates the conformance cases' 9-pod model
(namespaces x, y, z with pods a, b, c, each serving TCP 80, spread over the nodes), then applies
the example policies of examples/demo/ one by one (the examples/ policies adapted to the model's
namespaces; each file's leading comment says what it intends) and after each prints the 9x9
reachability matrix of real TCP/80 connections (`.` connected, `X` denied). The matrix the
reference evaluator predicts is what the probes are compared with; a connection is probed again
until it matches or a deadline passes, since enforcement is asynchronous. After an Audit-mode
policy, the connections it would have dropped are shown as `stockade observe` reports them.
Wired into the command line by `stockade.cli` through `add_parser()`; `python -m
stockade.sandbox.demo` runs it alone.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from stockade.model.admission import admit
from stockade.model.cluster import ClusterState, Namespace, Pod
from stockade.model.evaluator import evaluate
from stockade.model.flow import Flow
from stockade.model.policy import Policy, Protocol
from stockade.runtime import AGENTS_ENV
from stockade.sandbox import session
from stockade.sandbox.stack import published_generations, wait_applied
from stockade.sandbox.workloads.running import RunningSandbox
from stockade.sandbox.workloads.traffic import Outcome, PodProcesses, Probe

Progress = Callable[[str], None]
DEMO_DIR = Path(__file__).resolve().parents[3] / "examples" / "demo"
NAMESPACES = ("x", "y", "z")
PODS = tuple(f"{ns}/{name}" for ns in NAMESPACES for name in ("a", "b", "c"))
PORT = 80
DEADLINE_S = 10.0
PROBE_TIMEOUT_S = 1.0
SETTLE_TIMEOUT_S = 3.0
Pair = tuple[str, str]


@dataclass(frozen=True)
class DemoStep:
    path: Path
    obj: dict[str, Any]
    intent: str

    @property
    def title(self) -> str:
        meta = self.obj["metadata"]
        where = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        return f"{self.path.name}: {self.obj['kind']} {where}"


def load_steps(directory: Path = DEMO_DIR) -> list[DemoStep]:
    """The demo's policies in file-name order, each with its leading comment as its intent."""
    steps = []
    for path in sorted(directory.glob("*.yaml")):
        text = path.read_text()
        intent = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            intent.append(line.lstrip("#").strip())
        steps.append(DemoStep(path, yaml.safe_load(text), " ".join(w for w in intent if w)))
    if not steps:
        raise FileNotFoundError(f"no demo policies in {directory}")
    return steps


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace, "ns": namespace}


def pod_labels(key: str) -> dict[str, str]:
    return {"pod": key.partition("/")[2]}


def predict(addresses: Mapping[str, str], policies: Sequence[Policy]) -> dict[Pair, bool]:
    """Which TCP/80 connections the reference evaluator allows in the model."""
    pods = [
        Pod(
            key.partition("/")[0],
            key.partition("/")[2],
            pod_labels(key),
            (ipaddress.ip_address(ip),),
        )
        for key, ip in addresses.items()
    ]
    state = ClusterState([Namespace(ns, namespace_labels(ns)) for ns in NAMESPACES], pods)
    return {
        (src, dst): evaluate(
            state,
            policies,
            Flow(
                ipaddress.ip_address(addresses[src]),
                ipaddress.ip_address(addresses[dst]),
                Protocol.TCP,
                PORT,
            ),
        ).allowed
        for src in PODS
        for dst in PODS
        if src != dst
    }


def render(observed: Mapping[Pair, bool]) -> str:
    """The matrix: a row per source, a column per destination; `.` connected, `X` denied."""
    width = max(len(k) for k in PODS)
    corner = "from\\to"
    first = max(width, len(corner)) + 2
    lines = [f"{corner:<{first}}" + " ".join(f"{k:^{width}}" for k in PODS)]
    for src in PODS:
        cells = []
        for dst in PODS:
            mark = "-" if src == dst else ("." if observed[(src, dst)] else "X")
            cells.append(f"{mark:^{width}}")
        lines.append(f"{src:<{first}}" + " ".join(cells).rstrip())
    return "\n".join(lines)


class Demo:
    def __init__(self, sandbox: RunningSandbox, progress: Progress, out: TextIO) -> None:
        self.sandbox = sandbox
        self.progress = progress
        self.out = out
        self.workload = PodProcesses(sandbox.topology)
        self.addresses: dict[str, str] = {}
        self.applied: list[Policy] = []

    def build(self, steps: Sequence[DemoStep]) -> None:
        """The model's namespaces and pods, serving TCP 80; the demo's policies removed."""
        for step in steps:
            self.sandbox.delete_policy(step.obj)
        for namespace in NAMESPACES:
            self.sandbox.ensure_namespace(namespace, namespace_labels(namespace))
        nodes = [n.name for n in self.sandbox.nodes]
        self.progress(f"creating the 9 pods of the model on {', '.join(nodes)}")
        for index, key in enumerate(PODS):
            node = nodes[index % len(nodes)]
            net = self.sandbox.add_pod(key, node, pod_labels(key), [("serve-80-tcp", PORT, "TCP")])
            self.addresses[key] = net.ip_v4
        self.workload.start(PODS)
        for key in PODS:
            self.workload.serve(key, [(PORT, "TCP")])

    def show(self, title: str, intent: str) -> bool:
        """Probe the matrix until it is what the policies intend (or the deadline passes)."""
        wanted = predict(self.addresses, self.applied)
        self.progress(f"probing TCP/80 between the 9 pods ({title})")
        started = time.monotonic()
        observed: dict[Pair, bool] = {}
        pending = list(wanted)
        rounds = 0
        while pending:
            rounds += 1
            probes = [Probe(s, self.addresses[d], PORT, "tcp", PROBE_TIMEOUT_S) for s, d in pending]
            for pair, result in zip(pending, self.workload.probe_many(probes), strict=True):
                observed[pair] = result.outcome is Outcome.CONNECTED
            pending = [p for p in pending if observed[p] != wanted[p]]
            if not pending or time.monotonic() - started > DEADLINE_S:
                break
        denied = sum(not v for v in observed.values())
        print(f"\n== {title}", file=self.out)
        if intent:
            print(
                textwrap.fill(intent, 96, initial_indent="   ", subsequent_indent="   "),
                file=self.out,
            )
        print(render(observed), file=self.out)
        if pending:
            wrong = ", ".join(f"{s}->{d}" for s, d in pending)
            print(f"   NOT as intended ({denied} denied); differs at: {wrong}", file=self.out)
        else:
            seconds = time.monotonic() - started
            print(
                f"   as intended: {denied} of {len(observed)} connections denied "
                f"(probed in {rounds} round(s), {seconds:.1f}s)",
                file=self.out,
            )
        self.out.flush()
        return not pending

    def audited(self, step: DemoStep, state_dir: Path) -> bool:
        """For an Audit-mode policy: the connections it would have dropped, as `stockade
        observe` shows them (the agents' flow log, merged over the nodes). False when none
        showed within the deadline."""
        meta = step.obj["metadata"]
        state = session.SandboxState.load(state_dir)
        if state is None or state.stack is None or not state.stack.agent_ports:
            return False
        argv = [sys.executable, "-m", "stockade.cli", "observe", "--verdict", "audit"]
        argv += ["--policy", meta["name"], "--kubeconfig", str(self.sandbox.kubeconfig)]
        if "namespace" in meta:
            argv += ["-n", meta["namespace"]]
        env = dict(os.environ, **{AGENTS_ENV: state.stack.agents_setting()})
        deadline = time.monotonic() + DEADLINE_S
        while True:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            lines = done.stdout.splitlines()
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print(f"   `stockade observe --verdict audit --policy {meta['name']}`:", file=self.out)
        for line in lines or [f"(nothing: {done.stderr.strip() or 'no audit events'})"]:
            print(f"   {line}", file=self.out)
        self.out.flush()
        return bool(lines)

    def apply(self, step: DemoStep) -> None:
        nodes = [n.name for n in self.sandbox.nodes]
        before = published_generations(self.sandbox.api, nodes)
        self.progress(f"applying {step.path.relative_to(DEMO_DIR.parents[1])}")
        self.sandbox.create_policy(step.obj)
        self.applied.append(admit(step.obj))
        if not wait_applied(self.sandbox.api, nodes, before, SETTLE_TIMEOUT_S):
            self.progress("the agents have not reported the change yet; probing anyway")

    def clean(self, steps: Sequence[DemoStep]) -> None:
        """Remove the demo's policies and pods (the namespaces stay: nothing deletes them)."""
        for step in steps:
            self.sandbox.delete_policy(step.obj)
        for key in PODS:
            self.sandbox.remove_pod(key)

    def close(self) -> None:
        self.workload.close()


def run_demo(
    state_dir: Path,
    keep: bool,
    progress: Progress,
    out: TextIO = sys.stdout,
    confirm: Callable[[str], bool] | None = None,
) -> int:
    """Run the demo; 0 when every matrix was as the policies intend."""
    steps = load_steps()
    started_here = not session.running(state_dir)
    if started_here:
        progress("starting a 2-node sandbox with the operator and the agents")
        session.up(state_dir, 2, "routed", progress)
    else:
        progress(f"using the sandbox running in {state_dir}")
    sandbox = RunningSandbox.open(state_dir)
    demo = Demo(sandbox, progress, out)
    ok = True
    try:
        demo.build(steps)
        ok &= demo.show("no policy", "every pod reaches every other pod")
        for step in steps:
            demo.apply(step)
            ok &= demo.show(step.title, step.intent)
            if step.obj.get("spec", {}).get("mode") == "Audit":
                ok &= demo.audited(step, state_dir)
    finally:
        demo.close()
        print(file=out)
        if keep:
            print(
                f"the sandbox keeps running: kubectl --kubeconfig {sandbox.kubeconfig} "
                "get pods,networkpolicies.stockade.io -A; remove it with "
                f"`stockade sandbox --state-dir {state_dir} down`",
                file=out,
            )
            sandbox.close()
        else:
            _finish(state_dir, sandbox, demo, steps, started_here, progress, confirm)
    return 0 if ok else 1


def _finish(
    state_dir: Path,
    sandbox: RunningSandbox,
    demo: Demo,
    steps: Sequence[DemoStep],
    started_here: bool,
    progress: Progress,
    confirm: Callable[[str], bool] | None,
) -> None:
    """Offer `stockade sandbox down` (without a terminal: do it when the demo started the
    sandbox, else remove only what the demo added)."""
    question = f"remove the sandbox now (`stockade sandbox --state-dir {state_dir} down`)?"
    if confirm(question) if confirm is not None else started_here:
        sandbox.close()
        session.down(state_dir, progress)
    else:
        progress("removing the demo's policies and pods; the sandbox keeps running")
        demo.clean(steps)
        sandbox.close()


def _ask(question: str) -> bool:
    answer = input(f"{question} [Y/n] ").strip().lower()
    return answer in ("", "y", "yes")


def _cmd_demo(args: argparse.Namespace, progress: Progress) -> int:
    confirm = _ask if sys.stdin.isatty() and not args.keep else None
    return run_demo(args.state_dir, args.keep, progress, confirm=confirm)


def add_parser(subparsers: Any) -> None:
    """Add `demo` to the `stockade` command line."""
    demo = subparsers.add_parser(
        "demo",
        help="show stockade enforcing the example policies on a sandbox",
        description="Start a sandbox (unless one runs), create 9 pods in namespaces x, y, z, "
        "apply the policies of examples/demo/ one by one and print the TCP/80 reachability "
        "matrix after each.",
    )
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=session.default_state_dir(),
        help="the sandbox's state directory (default: $STOCKADE_SANDBOX_DIR or "
        "/run/stockade/sandbox)",
    )
    demo.add_argument(
        "--keep", action="store_true", help="leave the sandbox and the demo's pods running"
    )
    demo.set_defaults(run=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """`python -m stockade.sandbox.demo [--state-dir DIR] [--keep]`: the demo alone."""
    parser = argparse.ArgumentParser(prog="python -m stockade.sandbox.demo")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    status: int = args.run(args, progress)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
