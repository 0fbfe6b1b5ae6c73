"""stockade itself inside the sandbox: the operator (one replica, or two with leader election) and
one node agent per node, started as child processes of `stockade sandbox up`.

`session.up` calls `start_stack` once the Nodes are Ready and the CRDs are installed, records the
returned `StackRecord` in the sandbox state, and `session.down` calls `stop_stack` before it
removes the namespaces, then `remove_pins`. Every process is spawned with the sandbox's admin
kubeconfig as `--kubeconfig=<state dir>/...`, which is how `stray_processes` finds them again when
no record was written. Each agent runs in the machine's namespace with `--netns <node netns>` and
pins its programs, maps and links under `pin_root(run_id)/<node>`; the links go with the node
namespaces, the pins with `remove_pins`.

The stack is ready when every node's `<node>.program.0` DatapathTable reports (status, written by
that node's agent) the generation the operator published: `agent_reports` reads that, and
`status` shows it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from stockade.sandbox.controlplane.server import free_port
from stockade.sandbox.node.kubelet import node_state_dir
from stockade.sandbox.node.network import SOCKET_FILE
from stockade.sandbox.processes import (
    Child,
    ProcessError,
    ProcessRecord,
    find_processes,
    is_alive,
    log_tail,
    stop_all,
    stop_records,
)
from stockade.sandbox.topology import NodeNet

Progress = Callable[[str], None]

PIN_BASE = Path("/sys/fs/bpf/stockade-sandbox")
STACK_DIR = "stack"  # logs, below the state directory
READY_TIMEOUT = 180.0
DATAPATH_GROUP, DATAPATH_VERSION, DATAPATH_PLURAL = "stockade.io", "v1alpha1", "datapathtables"
LEASE_NAMESPACE = "kube-system"
HTTP_NOT_FOUND = 404
AGENT_ADDRESS = "127.0.0.1"  # the agents serve on the machine's loopback only


class StackError(RuntimeError):
    """The operator or an agent did not start or did not become ready; the message says which."""


@dataclass(frozen=True)
class StackRecord:
    """What runs of stockade in one sandbox: processes (pids with start times) and the pins."""

    replicas: int
    pin_root: Path
    processes: tuple[ProcessRecord, ...] = ()
    agent_ports: Mapping[str, int] = field(default_factory=dict)  # node -> --metrics-port

    def to_json(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "pin_root": str(self.pin_root),
            "processes": [p.to_json() for p in self.processes],
            "agent_ports": dict(self.agent_ports),
        }

    def agent_urls(self) -> dict[str, str]:
        """Each node's agent HTTP endpoint (`/metrics`, and the routes `stockade explain`,
        `observe`, `usage` and `status` ask), on this machine's loopback."""
        return {node: f"http://{AGENT_ADDRESS}:{port}" for node, port in self.agent_ports.items()}

    def agents_setting(self) -> str:
        """The STOCKADE_AGENTS value that points `stockade explain` and co. at these agents."""
        return ",".join(f"{node}={url}" for node, url in sorted(self.agent_urls().items()))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackRecord:
        return cls(
            replicas=int(data["replicas"]),
            pin_root=Path(data["pin_root"]),
            processes=tuple(ProcessRecord.from_json(p) for p in data.get("processes", ())),
            agent_ports={str(k): int(v) for k, v in (data.get("agent_ports") or {}).items()},
        )


@dataclass(frozen=True)
class AgentReport:
    """One node as its agent reports it on `<node>.program.0` (None: nothing published yet)."""

    node: str
    published: int | None
    applied: int | None
    attached: int | None
    errors: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.published is not None and self.applied == self.published and not self.errors

    def describe(self) -> str:
        if self.published is None:
            return "no DatapathTable published yet"
        text = (
            f"generation {self.applied if self.applied is not None else '-'}/{self.published} "
            f"applied, {self.attached or 0} endpoint(s) attached"
        )
        return f"{text}; errors: {'; '.join(self.errors)}" if self.errors else text


def pin_root(run_id: str) -> Path:
    """Where the agents of sandbox run `run_id` pin (one directory per node below it)."""
    return PIN_BASE / run_id


def _python() -> str:
    return sys.executable


def operator_argv(kubeconfig: Path, index: int, replicas: int) -> list[str]:
    return [
        _python(),
        "-u",
        "-m",
        "stockade.control",
        f"--kubeconfig={kubeconfig}",
        "--leader-election",
        "on" if replicas > 1 else "off",
        f"--lease-namespace={LEASE_NAMESPACE}",
        f"--identity=sandbox-operator-{index}",
    ]


def agent_argv(
    kubeconfig: Path, node: NodeNet, pins: Path, cni_socket: Path | None = None
) -> list[str]:
    socket = [f"--cni-socket={cni_socket}"] if cni_socket is not None else []
    return [
        _python(),
        "-u",
        "-m",
        "stockade.agent",
        f"--kubeconfig={kubeconfig}",
        f"--node={node.name}",
        f"--netns={node.netns}",
        f"--pin-root={pins / node.name}",
        *socket,
    ]


def start_stack(
    state_dir: Path,
    kubeconfig: Path,
    nodes: Sequence[NodeNet],
    run_id: str,
    replicas: int,
    progress: Progress,
    *,
    detach: bool = True,
) -> StackRecord:
    """Start the operator replicas and one agent per node; return once every agent has applied
    what the operator published for its node. On failure, stop what was started and raise."""
    if replicas not in (1, 2):
        raise StackError(f"--replicas must be 1 or 2, got {replicas}")
    logs = state_dir / STACK_DIR
    pins = pin_root(run_id)
    pins.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    started = time.monotonic()
    try:
        for index in range(replicas):
            name = f"operator-{index}"
            progress(f"starting {name} (leader election {'on' if replicas > 1 else 'off'})")
            argv = operator_argv(kubeconfig, index, replicas)
            children.append(Child.spawn(name, argv, logs / f"{name}.log", detach=detach))
        ports = {}
        for node in nodes:
            name = f"agent-{node.name}"
            progress(f"starting {name} (netns {node.netns}, pins {pins / node.name})")
            ports[node.name] = free_port()
            socket = node_state_dir(state_dir, node.name) / SOCKET_FILE
            argv = agent_argv(kubeconfig, node, pins, socket)
            argv += [f"--metrics-port={ports[node.name]}", f"--bind-address={AGENT_ADDRESS}"]
            children.append(Child.spawn(name, argv, logs / f"{name}.log", detach=detach))
        record = StackRecord(replicas, pins, tuple(c.record for c in children), ports)
        progress("waiting for every agent to apply its node's DatapathTables")
        wait_ready(kubeconfig, record, [n.name for n in nodes], READY_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessError):
            stop_all(list(reversed(children)))
        raise
    progress(f"operator and {len(nodes)} agent(s) ready in {time.monotonic() - started:.1f}s")
    return record


def api_client(kubeconfig: Path) -> Any:
    new_client: Any = kubernetes.config.new_client_from_config  # untyped in the library
    return new_client(config_file=str(kubeconfig))


def agent_reports(api: Any, nodes: Sequence[str]) -> list[AgentReport]:
    """Each node's published generation and what its agent says it applied."""
    custom = kubernetes.client.CustomObjectsApi(api)
    reports = []
    for node in nodes:
        try:
            obj: Any = custom.get_cluster_custom_object(
                DATAPATH_GROUP, DATAPATH_VERSION, DATAPATH_PLURAL, f"{node}.program.0"
            )
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise
            reports.append(AgentReport(node, None, None, None, ()))
            continue
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        applied = status.get("appliedGeneration")
        attached = status.get("endpointsAttached")
        reports.append(
            AgentReport(
                node,
                int(spec.get("generation", 0)),
                int(applied) if applied is not None else None,
                int(attached) if attached is not None else None,
                tuple(str(e) for e in status.get("errors") or ()),
            )
        )
    return reports


def wait_ready(
    kubeconfig: Path, record: StackRecord, nodes: Sequence[str], timeout: float
) -> list[AgentReport]:
    """Until every node's agent has applied the published generation; a process that exits
    meanwhile fails at once, with the tail of its log."""
    deadline = time.monotonic() + timeout
    with api_client(kubeconfig) as api:
        while True:
            for process in record.processes:
                if not is_alive(process):
                    raise StackError(
                        f"{process.name} exited during start-up; the end of {process.log}:\n"
                        f"{log_tail(process.log)}"
                    )
            reports = agent_reports(api, nodes)
            if all(r.ready for r in reports):
                return reports
            if time.monotonic() > deadline:
                waiting = "; ".join(f"{r.node}: {r.describe()}" for r in reports if not r.ready)
                raise StackError(f"the stack was not ready within {timeout:.0f}s: {waiting}")
            time.sleep(0.2)


def checks(
    kubeconfig: Path, record: StackRecord, nodes: Sequence[str], api_ok: bool
) -> list[tuple[str, bool, str]]:
    """(what, ok, detail) lines for `stockade sandbox status`."""
    lines = [(p.name, is_alive(p), f"pid {p.pid}, log {p.log}") for p in record.processes]
    if api_ok:
        with api_client(kubeconfig) as api:
            for report in agent_reports(api, nodes):
                lines.append((f"datapath {report.node}", report.ready, report.describe()))
    return lines


def stray_processes(state_dir: Path) -> list[ProcessRecord]:
    """Operator and agent processes working for `state_dir` (their --kubeconfig lies in it),
    also those of a run that crashed before it could record them."""
    return find_processes({Path(_python())}, state_dir)


def stop_stack(record: StackRecord | None, state_dir: Path, progress: Progress) -> None:
    """Stop the agents and the operator replicas, all at once (SIGTERM, then SIGKILL): each
    takes about a second, which one after the other would add up. Idempotent."""
    recorded = [p for p in (record.processes if record is not None else ()) if is_alive(p)]
    for process in recorded:
        progress(f"stopping {process.name} (pid {process.pid})")
    stop_records(recorded)
    strays = stray_processes(state_dir)
    for process in strays:
        progress(f"stopping leftover {process.name} (pid {process.pid})")
    stop_records(strays)


def remove_pins(root: Path, progress: Progress) -> None:
    """Remove a run's pins (call after its node namespaces, and so its links, are gone)."""
    if root.exists():
        progress(f"removing the pinned programs and maps in {root}")
        shutil.rmtree(root)
    if root.parent == PIN_BASE:
        with contextlib.suppress(OSError):  # another run still pins there: leave it
            PIN_BASE.rmdir()


def remove_orphaned_pins(live_runs: Callable[[str], bool], progress: Progress) -> None:
    """Remove the pin roots of sandbox runs that no longer exist (`live_runs(run_id)` False)."""
    if not PIN_BASE.is_dir():
        return
    for root in sorted(PIN_BASE.iterdir()):
        if root.is_dir() and not live_runs(root.name):
            remove_pins(root, progress)


def read_metrics(port: int, timeout: float = 2.0) -> dict[str, float]:
    """Every series a stack process serves at http://127.0.0.1:<port>/metrics, by its name with
    labels (`name{label="value"}`); {} while the process does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def published_generations(api: Any, nodes: Sequence[str]) -> dict[str, int | None]:
    """Each node's published generation now (taken before a change, for `wait_applied`)."""
    return {r.node: r.published for r in agent_reports(api, nodes)}


def wait_applied(
    api: Any, nodes: Sequence[str], before: Mapping[str, int | None], timeout: float
) -> bool:
    """Wait until the operator has published something new since `before` and every agent has
    applied it; False when `timeout` passed first (a change may touch no node's tables)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = agent_reports(api, nodes)
        changed = any(r.published != before.get(r.node) for r in reports)
        if changed and all(r.ready for r in reports):
            return True
        time.sleep(0.05)
    return False
