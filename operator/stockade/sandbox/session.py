"""`stockade sandbox up | status | down`: a long-lived sandbox that outlives the command.

`up` starts the control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
detached, builds the node namespaces, registers the Nodes, starts kube-proxy in every node
(`stockade.sandbox.node.proxy`, nftables or iptables mode), installs the CRDs, starts a kubelet
stand-in per node (`stockade.sandbox.node`: it runs the Pods bound to its node, wired by the CNI
plugins; `--no-kubelets` leaves it out) and the cluster DNS (`stockade.sandbox.cluster.dns`, a
Deployment the kubelets run), starts stockade itself (the operator and one agent per
node, `stockade.sandbox.stack`) and records everything (pids with start times, ports, paths, run
id, pins) in a state directory, by default /run/stockade/sandbox; `status` reports on it; `down`
stops the kubelets first (they unwire their pods with CNI DEL), then kube-proxy and stockade,
then removes it all, and is idempotent. `up` first cleans what a crashed run left behind. The CLI
(`stockade.cli`) wires `add_parser()`; `stockade demo` and the e2e conformance engine call `up`
and `down` directly. `add_parser()` also adds `exec` and `probe`, into the sandbox's pods
(`stockade.sandbox.cluster.podcmd`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client

from stockade.runtime import AGENTS_ENV
from stockade.sandbox import netns, stack, toolchain
from stockade.sandbox.cluster import dns, podcmd
from stockade.sandbox.controlplane.crds import install_crds, warm_watch_caches
from stockade.sandbox.controlplane.server import (
    ControlPlane,
    ControlPlaneRecord,
    Progress,
)
from stockade.sandbox.node import supervise
from stockade.sandbox.node.cni import CniError, plugin_dir
from stockade.sandbox.node.kubelet import NODES_DIR, node_state_dir
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.node.proxy import (
    DEFAULT_MODE,
    PROXY_MODES,
    NodeProxies,
    ProxyMode,
    check_mode,
)
from stockade.sandbox.node.registration import register_node
from stockade.sandbox.processes import ProcessRecord, find_processes, is_alive, stop_record
from stockade.sandbox.stack import StackRecord
from stockade.sandbox.toolchain import ETCD, KUBERNETES
from stockade.sandbox.topology import Mode, Topology, cleanup_leftovers

STATE_FILE = "state.json"
TOPOLOGY_FILE = "topology.json"
CONTROL_PLANE_DIR = "controlplane"
PROXY_DIR = "proxy"
# What `down` removes from the state directory, which it may share with other sandbox records.
OWNED = (
    STATE_FILE,
    TOPOLOGY_FILE,
    CONTROL_PLANE_DIR,
    PROXY_DIR,
    stack.STACK_DIR,
    NODES_DIR,
    supervise.LOG_DIR,
)
NODES_READY_TIMEOUT = 60.0


def default_state_dir() -> Path:
    return Path(os.environ.get("STOCKADE_SANDBOX_DIR", "/run/stockade/sandbox"))


class SandboxError(RuntimeError):
    """`stockade sandbox` could not do what it was asked; the message says what and why."""


@dataclass(frozen=True)
class SandboxState:
    """What `up` leaves on disk (state.json) so that `status` and `down` can find everything."""

    run_id: str
    created: str
    nodes: int
    topology: str
    control_plane: ControlPlaneRecord | None = None
    node_names: tuple[str, ...] = ()
    stack: StackRecord | None = None
    topology_run_id: str = ""
    proxy_mode: str = ""
    proxies: tuple[ProcessRecord, ...] = ()  # a forwarder and a kube-proxy per node
    kubelets: tuple[ProcessRecord, ...] = ()
    cni_bin: str = ""

    def save(self, state_dir: Path) -> None:
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "created": self.created,
            "nodes": self.nodes,
            "topology": self.topology,
            "control_plane": self.control_plane.to_json() if self.control_plane else None,
            "node_names": list(self.node_names),
            "stack": self.stack.to_json() if self.stack else None,
            "topology_run_id": self.topology_run_id,
            "proxy_mode": self.proxy_mode,
            "proxies": [p.to_json() for p in self.proxies],
            "kubelets": [k.to_json() for k in self.kubelets],
            "cni_bin": self.cni_bin,
        }
        tmp = state_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.rename(state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> SandboxState | None:
        path = state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SandboxError(f"{path}: unreadable sandbox state ({exc}); remove it") from exc
        cp = data.get("control_plane")
        recorded_stack = data.get("stack")
        return cls(
            run_id=str(data["run_id"]),
            created=str(data["created"]),
            nodes=int(data["nodes"]),
            topology=str(data["topology"]),
            control_plane=ControlPlaneRecord.from_json(cp) if cp else None,
            node_names=tuple(data.get("node_names", ())),
            stack=StackRecord.from_json(recorded_stack) if recorded_stack else None,
            topology_run_id=str(data.get("topology_run_id", "")),
            proxy_mode=str(data.get("proxy_mode", "")),
            proxies=tuple(ProcessRecord.from_json(p) for p in data.get("proxies", ())),
            kubelets=tuple(ProcessRecord.from_json(k) for k in data.get("kubelets", ())),
            cni_bin=str(data.get("cni_bin", "")),
        )


def kubeconfig_path(state_dir: Path) -> Path:
    return state_dir / CONTROL_PLANE_DIR / "kubeconfig"


# -- up ---------------------------------------------------------------------------------------


def up(
    state_dir: Path,
    nodes: int,
    mode: Mode,
    progress: Progress,
    *,
    replicas: int = 1,
    proxy_mode: ProxyMode = DEFAULT_MODE,
    detach: bool = True,
    kubelets: bool = True,
    cni_bin: Path | None = None,
) -> Path:
    """Start a sandbox with stockade running in it (or find the one already running) and return
    its kubeconfig path.

    detach=False ties every process to this one (they die with it) and leaves the namespaces to
    this process's exit cleanup: what a test engine wants for a sandbox of its own.
    kubelets=True starts a kubelet stand-in per node (`stockade.sandbox.node`) that runs the
    Pods bound to its node, wired by the CNI plugins in `cni_bin` (default: `plugin_dir()`)."""
    if nodes < 1:
        raise SandboxError(f"--nodes must be at least 1, got {nodes}")
    if replicas not in (1, 2):
        raise SandboxError(f"--replicas must be 1 or 2, got {replicas}")
    try:
        check_mode(proxy_mode)
    except ValueError as exc:
        raise SandboxError(f"--proxy-mode: {exc}") from exc
    plugins: Path | None = None
    if kubelets:
        try:
            plugins = plugin_dir(cni_bin)
        except CniError as exc:
            raise SandboxError(f"{exc} (or start without kubelets: --no-kubelets)") from exc
    previous = SandboxState.load(state_dir)
    if previous is not None:
        running = (previous.nodes, previous.topology, _replicas(previous), previous.proxy_mode)
        if running == (nodes, mode, replicas, proxy_mode) and _healthy(state_dir, previous):
            progress(f"sandbox {previous.run_id} is already running")
            return kubeconfig_path(state_dir)
        if _healthy(state_dir, previous):
            raise SandboxError(
                f"a sandbox with {previous.nodes} {previous.topology} nodes, kube-proxy in "
                f"{previous.proxy_mode or 'no'} mode and {_replicas(previous)} operator "
                "replica(s) is running; "
                "run `stockade sandbox down` first"
            )
    if previous is not None or any((state_dir / name).exists() for name in OWNED):
        progress("cleaning up what an earlier run left behind")
        down(state_dir, progress)
    cleanup_leftovers()
    stack.remove_orphaned_pins(_run_exists, progress)

    state = SandboxState(
        run_id=secrets.token_hex(4),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        nodes=nodes,
        topology=mode,
        proxy_mode=proxy_mode,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    state.save(state_dir)
    try:
        plane = ControlPlane(state_dir / CONTROL_PLANE_DIR, detach=detach, progress=progress)
        plane.start()
        state = dataclasses.replace(state, control_plane=plane.record)
        state.save(state_dir)

        progress(f"creating {nodes} {mode} node(s)")
        topo = Topology.create(nodes=nodes, mode=mode)
        topo.save(state_dir / TOPOLOGY_FILE)
        if detach:
            topo.detach()  # kept after this process exits, until `stockade sandbox down`
            topo.save(state_dir / TOPOLOGY_FILE)
        state = dataclasses.replace(state, topology_run_id=topo.run_id)
        state.save(state_dir)
        with plane.api_client() as client:
            for node in topo.nodes:
                register_node(client, node)
            names = _wait_nodes_ready(client, len(topo.nodes))
            progress("installing the CRDs (stockade's and the upstream ClusterNetworkPolicy)")
            install_crds(client)
        warming = threading.Thread(
            target=_warm_watch_caches, args=(plane,), name="warm-watch-caches", daemon=True
        )
        warming.start()
        state = dataclasses.replace(state, node_names=names)
        state.save(state_dir)
        progress(f"nodes ready: {', '.join(names)}")
        proxies = NodeProxies(
            state_dir / PROXY_DIR,
            plane.server,
            plane.pki,
            topo.nodes,
            proxy_mode,
            detach=detach,
            progress=progress,
        )
        proxies.start()
        state = dataclasses.replace(state, proxies=proxies.records)
        state.save(state_dir)
        if plugins is not None:
            state = dataclasses.replace(state, cni_bin=str(plugins))
            state.save(state_dir)
            children = supervise.start_kubelets(
                state_dir,
                kubeconfig_path(state_dir),
                state_dir / TOPOLOGY_FILE,
                [n.name for n in topo.nodes],
                plugins,
                progress,
                detach=detach,
            )
            state = dataclasses.replace(state, kubelets=tuple(c.record for c in children))
            state.save(state_dir)
            progress(f"starting the cluster DNS ({dns.SERVICE_NAME} at {dns.CLUSTER_IP})")
            with plane.api_client() as client:
                dns.install(client)
                dns.wait_available(client)
        warming.join()
        record = stack.start_stack(
            state_dir,
            kubeconfig_path(state_dir),
            topo.nodes,
            topo.run_id,
            replicas,
            progress,
            detach=detach,
        )
        state = dataclasses.replace(state, stack=record)
        state.save(state_dir)
        if plugins is not None:
            progress("chaining stockade-cni into every node's CNI network")
            chain_stockade(state_dir, topo, plugins)
    except BaseException:
        progress("start-up failed: removing what was started")
        down(state_dir, progress)
        raise
    return kubeconfig_path(state_dir)


def _warm_watch_caches(plane: ControlPlane) -> None:
    """`warm_watch_caches` with a client of its own (it runs beside `up`'s next steps)."""
    with plane.api_client() as client:
        warm_watch_caches(client)


def chain_stockade(state_dir: Path, topo: Topology, plugins: Path) -> None:
    """What the chart's installer does on each node once its agent runs: stockade-cni into the
    node's CNI binary directory, `00-stockade.conflist` chaining it into the node's network.
    From then on every pod's CNI ADD attaches it pending until its tables are applied."""
    toolchain.ensure((toolchain.STOCKADE_CNI,))
    for node in topo.nodes:
        cni = NodeCni(node_state_dir(state_dir, node.name), node, plugins)
        cni.chain_stockade(toolchain.STOCKADE_CNI.path("stockade-cni"))


def _replicas(state: SandboxState) -> int:
    return state.stack.replicas if state.stack is not None else 0


def _run_exists(run_id: str) -> bool:
    """Whether topology run `run_id` still has namespaces (its pins are then still in use)."""
    return bool(netns.list_names(f"stk-{run_id}-")) or netns.read_record(run_id) is not None


def _name(obj: Any) -> str:
    return str(obj.metadata.name)


def _node_ready(node: Any) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _wait_nodes_ready(client: Any, expected: int) -> tuple[str, ...]:
    core = kubernetes.client.CoreV1Api(client)
    deadline = time.monotonic() + NODES_READY_TIMEOUT
    while True:
        ready = sorted(_name(n) for n in core.list_node().items if _node_ready(n))
        if len(ready) >= expected:
            return tuple(ready)
        if time.monotonic() > deadline:
            raise SandboxError(
                f"only {len(ready)} of {expected} Nodes became Ready within "
                f"{NODES_READY_TIMEOUT:.0f}s: {', '.join(ready) or 'none'}"
            )
        time.sleep(0.2)


# -- status -----------------------------------------------------------------------------------


def running(state_dir: Path) -> bool:
    """Whether a healthy sandbox, stockade included, runs in `state_dir`."""
    state = SandboxState.load(state_dir)
    return state is not None and _healthy(state_dir, state)


def _healthy(state_dir: Path, state: SandboxState) -> bool:
    return all(ok for _, ok, _ in _checks(state_dir, state))


def _checks(state_dir: Path, state: SandboxState) -> list[tuple[str, bool, str]]:
    """(what, ok, detail) for every part of the sandbox."""
    if state.control_plane is None:
        return [("control plane", False, "never finished starting")]
    plane = ControlPlane.adopt(state.control_plane)
    checks = [
        (p.name, is_alive(p), f"pid {p.pid}, log {p.log}") for p in state.control_plane.processes
    ]
    health = plane.health()
    checks.append(("etcd /health", health["etcd /health"], state.control_plane.etcd_url))
    api_ok = health["kube-apiserver /readyz"]
    checks.append(("kube-apiserver /readyz", api_ok, plane.server))
    if api_ok:
        with plane.api_client() as client:
            nodes = {_name(n): n for n in kubernetes.client.CoreV1Api(client).list_node().items}
        for name in state.node_names:
            node = nodes.get(name)
            ready = node is not None and _node_ready(node)
            checks.append((f"node {name}", ready, "Ready" if ready else "not Ready or missing"))
    for p in state.proxies:
        checks.append((p.name, is_alive(p), f"pid {p.pid}, log {p.log}"))
    if state.proxy_mode and len(state.proxies) < 2 * state.nodes:
        checks.append(("kube-proxy", False, f"{len(state.proxies) // 2} of {state.nodes} started"))
    if len(state.node_names) < state.nodes:
        checks.append(("nodes", False, f"{len(state.node_names)} of {state.nodes} registered"))
    topology_file = state_dir / TOPOLOGY_FILE
    if topology_file.exists():
        for name in Topology.load(topology_file).namespaces():
            checks.append((f"netns {name}", netns.exists(name), f"/var/run/netns/{name}"))
    checks += [(k.name, is_alive(k), f"pid {k.pid}, log {k.log}") for k in state.kubelets]
    if state.stack is None:
        checks.append(("operator and agents", False, "never started"))
    else:
        kubeconfig = kubeconfig_path(state_dir)
        checks += stack.checks(kubeconfig, state.stack, state.node_names, api_ok)
    return checks


def status(state_dir: Path) -> int:
    """Print what runs and whether it is healthy. Exit status: 0 healthy, 1 unhealthy, 3 none."""
    state = SandboxState.load(state_dir)
    if state is None:
        print(f"no sandbox is running (no {STATE_FILE} in {state_dir})")
        return 3
    proxy = f", kube-proxy {state.proxy_mode}" if state.proxy_mode else ""
    print(
        f"sandbox {state.run_id}: {state.nodes} {state.topology} node(s){proxy}, "
        f"started {state.created}"
    )
    print(f"kubeconfig: {kubeconfig_path(state_dir)}")
    if state.stack is not None and state.stack.agent_ports:
        print(f"agents (for stockade explain, observe, usage, status): {AGENTS_ENV}=", end="")
        print(state.stack.agents_setting())
    checks = _checks(state_dir, state)
    for what, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {what:<28} {detail}")
    healthy = all(ok for _, ok, _ in checks)
    print("healthy" if healthy else "unhealthy: `stockade sandbox up` replaces it")
    return 0 if healthy else 1


# -- down -------------------------------------------------------------------------------------


def _stray_processes(state_dir: Path) -> list[ProcessRecord]:
    """Our control plane, kube-proxy and forwarder processes working in `state_dir`, also those
    of a run that crashed before it could record them."""
    binaries = {ETCD.path("etcd"), Path(sys.executable)}
    binaries |= {KUBERNETES.path(b) for b in KUBERNETES.binaries if b != "kubectl"}
    # Clients before their servers: etcd last, so that nothing waits out its grace period.
    order = ("kube-proxy", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
    found = find_processes(binaries, state_dir)
    return sorted(found, key=lambda r: order.index(r.name) if r.name in order else -1)


def down(state_dir: Path, progress: Progress) -> None:
    """Stop every process, remove every namespace and file of the sandbox. Idempotent."""
    try:
        state = SandboxState.load(state_dir)
    except SandboxError as exc:
        progress(f"ignoring unreadable state: {exc}")
        state = None
    # The kubelets first: each unwires its pods (CNI DEL) while the node namespaces exist.
    supervise.stop_kubelets(state.kubelets if state is not None else (), progress)
    supervise.stop_stray_kubelets(state_dir, progress)
    # kube-proxy and the forwarders next (before stack.stop_stack, whose search for leftover
    # Python processes in `state_dir` would take a forwarder for a leftover), then stockade,
    # while the API server still answers their last requests.
    for record in reversed(state.proxies if state is not None else ()):
        if is_alive(record):
            progress(f"stopping {record.name} (pid {record.pid})")
        stop_record(record)
    stack.stop_stack(state.stack if state is not None else None, state_dir, progress)
    if state is not None and state.control_plane is not None:
        for record in reversed(state.control_plane.processes):
            if is_alive(record):
                progress(f"stopping {record.name} (pid {record.pid})")
            stop_record(record)
    for record in _stray_processes(state_dir):
        progress(f"stopping leftover {record.name} (pid {record.pid})")
        stop_record(record)
    topology_file = state_dir / TOPOLOGY_FILE
    topology_run_id = state.topology_run_id if state is not None else ""
    if topology_file.exists():
        progress("removing the node and pod namespaces")
        topology = Topology.load(topology_file)
        topology_run_id = topology.run_id
        plugins = Path(state.cni_bin) if state is not None and state.cni_bin else None
        supervise.sweep(state_dir, topology, plugins, progress)
        topology.destroy()
    # The links went with the namespaces' interfaces; now the pins.
    if state is not None and state.stack is not None:
        stack.remove_pins(state.stack.pin_root, progress)
    if topology_run_id:
        stack.remove_pins(stack.pin_root(topology_run_id), progress)
    removed = [name for name in OWNED if (state_dir / name).exists()]
    for name in removed:
        path = state_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if nothing else lives there
    progress(f"removed the sandbox in {state_dir}" if removed else f"no sandbox in {state_dir}")


# -- command line -----------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace, progress: Progress) -> int:
    started = time.monotonic()
    path = up(
        args.state_dir,
        args.nodes,
        args.topology,
        progress,
        replicas=args.replicas,
        proxy_mode=args.proxy_mode,
        kubelets=args.kubelets,
        cni_bin=args.cni_bin,
    )
    state = SandboxState.load(args.state_dir)
    if state is not None and state.stack is not None and state.stack.agent_ports:
        progress(f"agents: export {AGENTS_ENV}={state.stack.agents_setting()}")
    progress(f"sandbox up in {time.monotonic() - started:.1f}s; kubeconfig:")
    print(path)
    return 0


def _cmd_status(args: argparse.Namespace, progress: Progress) -> int:
    return status(args.state_dir)


def _cmd_down(args: argparse.Namespace, progress: Progress) -> int:
    down(args.state_dir, progress)
    return 0


def add_parser(subparsers: Any) -> None:
    """Add `sandbox up|status|down|exec|probe` to the `stockade` command line."""
    sandbox = subparsers.add_parser(
        "sandbox",
        help="a local control plane and network-namespace nodes",
        description="A real kube-apiserver and etcd plus network-namespace nodes, left running.",
    )
    sandbox.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="where the sandbox keeps its state, certificates and logs "
        "(default: $STOCKADE_SANDBOX_DIR or /run/stockade/sandbox)",
    )
    commands = sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="COMMAND")
    cmd_up = commands.add_parser("up", help="start the sandbox and print its kubeconfig path")
    cmd_up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    cmd_up.add_argument(
        "--topology",
        choices=("routed", "bridge"),
        default="routed",
        help="how pods attach to their node (default routed)",
    )
    cmd_up.add_argument(
        "--replicas",
        type=int,
        choices=(1, 2),
        default=1,
        help="operator replicas; 2 run with leader election (default 1)",
    )
    cmd_up.add_argument(
        "--proxy-mode",
        choices=PROXY_MODES,
        default=DEFAULT_MODE,
        help=f"kube-proxy's mode in every node (default {DEFAULT_MODE})",
    )
    cmd_up.add_argument(
        "--kubelets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a kubelet stand-in per node that runs the Pods bound to it (default on)",
    )
    cmd_up.add_argument(
        "--cni-bin",
        type=Path,
        default=None,
        help="directory of the CNI plugins the kubelets use "
        "(default: $STOCKADE_CNI_BIN, else the toolchain's)",
    )
    cmd_up.set_defaults(run=_cmd_up)
    commands.add_parser("status", help="say what runs and whether it is healthy").set_defaults(
        run=_cmd_status
    )
    commands.add_parser("down", help="remove the sandbox (idempotent)").set_defaults(run=_cmd_down)
    podcmd.add_parsers(commands, _locate)


def _locate(state_dir: Path) -> tuple[Path, Path]:
    """(kubeconfig, topology file) of the sandbox in `state_dir`, for `exec` and `probe`."""
    return kubeconfig_path(state_dir), state_dir / TOPOLOGY_FILE
