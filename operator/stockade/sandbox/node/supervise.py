"""The kubelet stand-ins of a sandbox as child processes: start one per node, stop them (each
tears its pods down with CNI DEL on SIGTERM), and sweep what a crashed one left.

`stockade.sandbox.session` calls `start_kubelets` in `up` (after the Nodes are registered) and
records the returned processes in the sandbox state; `down` calls `stop_kubelets` first, then
`sweep` before the node namespaces go. The node tests use the same calls. Every kubelet is started
with `--kubeconfig=<state dir>/...`, so `stack.stray_processes` finds it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stockade.sandbox import netns
from stockade.sandbox.node.cni import CniError
from stockade.sandbox.node.kubelet import NODES_DIR, node_state_dir
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.processes import (
    Child,
    ProcessError,
    ProcessRecord,
    is_alive,
    stop_record,
    stop_records,
)
from stockade.sandbox.topology import PREFIX, Topology

Progress = Callable[[str], None]
LOG_DIR = "kubelet"  # below the state directory
KUBELET_MODULE = "stockade.sandbox.node.kubelet"


def kubelet_argv(
    kubeconfig: Path, node: str, state_dir: Path, topology_file: Path, plugins: Path
) -> list[str]:
    return [
        sys.executable,
        "-u",
        "-m",
        KUBELET_MODULE,
        f"--kubeconfig={kubeconfig}",
        f"--node={node}",
        f"--state-dir={state_dir}",
        f"--topology={topology_file}",
        f"--cni-bin={plugins}",
    ]


def start_kubelets(
    state_dir: Path,
    kubeconfig: Path,
    topology_file: Path,
    nodes: Sequence[str],
    plugins: Path,
    progress: Progress,
    *,
    detach: bool = True,
) -> list[Child]:
    """One kubelet stand-in per node (record each `.record` in the sandbox state); on failure
    stop those started and raise."""
    children: list[Child] = []
    try:
        for node in nodes:
            name = f"kubelet-{node}"
            progress(f"starting {name}")
            argv = kubelet_argv(kubeconfig, node, state_dir, topology_file, plugins)
            log = state_dir / LOG_DIR / f"{name}.log"
            children.append(Child.spawn(name, argv, log, detach=detach))
    except BaseException:
        for child in children:
            with contextlib.suppress(ProcessError):
                child.stop()
        raise
    return children


def stop_kubelets(records: Sequence[ProcessRecord], progress: Progress) -> None:
    """SIGTERM every kubelet at once (each runs CNI DEL for its pods), SIGKILL those still
    running after the grace period."""
    running = [r for r in records if is_alive(r)]
    for record in running:
        progress(f"stopping {record.name} (pid {record.pid}): its pods are unwired")
    stop_records(running, grace=30.0)


def stray_kubelets(state_dir: Path) -> list[ProcessRecord]:
    """Kubelet stand-ins working for `state_dir`, also those no state recorded."""
    marker = f"--state-dir={state_dir}"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if KUBELET_MODULE in args and marker in args:
            ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
            found.append(ProcessRecord("kubelet", int(entry), ticks, Path(os.devnull)))
    return found


def stop_stray_kubelets(state_dir: Path, progress: Progress) -> None:
    for record in stray_kubelets(state_dir):
        if is_alive(record):
            progress(f"stopping leftover kubelet (pid {record.pid})")
            stop_record(record, grace=30.0)


def sweep(state_dir: Path, topology: Topology, plugins: Path | None, progress: Progress) -> None:
    """After the kubelets stopped: CNI DEL what their caches still hold (a kubelet that died),
    remove the pod namespaces of the run and the nodes' CNI state (conflists, cache, IPAM).
    The kubelets' logs (`LOG_DIR`) stay for the caller to remove."""
    for node in topology.nodes:
        root = node_state_dir(state_dir, node.name)
        if plugins is not None and root.is_dir() and netns.exists(node.netns):
            cni = NodeCni(root, node, plugins)
            with contextlib.suppress(CniError):
                network = cni.network().name
                for entry in cni.runtime.cached_entries():
                    rt = entry.runtime_conf()
                    with contextlib.suppress(CniError):
                        if entry.network == network:
                            cni.delete(rt)
    for name in netns.list_names(f"{PREFIX}-{topology.run_id}-pod-"):
        progress(f"removing pod namespace {name}")
        netns.remove(name)
    nodes_dir = state_dir / NODES_DIR
    if nodes_dir.exists():
        shutil.rmtree(nodes_dir)
