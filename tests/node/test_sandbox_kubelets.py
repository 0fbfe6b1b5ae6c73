"""`stockade sandbox up` with its kubelet stand-ins, in a private state directory: Pods bound to
the nodes run with CNI-made addresses; `down` (even after a kubelet was killed and left its pod
wired) leaves no process, namespace, CNI cache or IPAM data behind."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes.client

from stockade.sandbox import netns, session, stack
from stockade.sandbox.node.kubelet import pod_netns_name
from stockade.sandbox.node.registration import create_pod
from stockade.sandbox.processes import is_alive
from tests.fixtures.controlplane import wait_for


def _stockade(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`stockade sandbox --state-dir STATE_DIR ARGS...` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "sandbox", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _pod(api: Any, name: str, node: str) -> str:
    body = {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}],
        },
    }
    pod = create_pod(api, "default", body)
    return str(pod.metadata.uid)


def _ip(core: Any, name: str) -> str | None:
    pod = core.read_namespaced_pod(name, "default")
    return pod.status.pod_ip if pod.status and pod.status.phase == "Running" else None


def _processes_of(state_dir: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if entry.isdigit() and str(state_dir).encode() in cmdline:
            found.append(int(entry))
    return found


def test_sandbox_up_runs_pods_on_its_kubelets_and_down_leaves_nothing(
    tmp_path: Path, cni_bin: Path
) -> None:
    state_dir = tmp_path / "sandbox"
    run_id = ""
    try:
        up = _stockade(state_dir, "up", "--nodes", "2", "--cni-bin", str(cni_bin))
        assert up.returncode == 0, up.stderr
        kubeconfig = session.kubeconfig_path(state_dir)
        state = session.SandboxState.load(state_dir)
        assert state is not None
        run_id = state.topology_run_id
        assert [k.name for k in state.kubelets] == ["kubelet-node-1", "kubelet-node-2"]
        with stack.api_client(kubeconfig) as api:
            core = kubernetes.client.CoreV1Api(api)
            uids = {
                name: _pod(api, name, node) for name, node in (("a", "node-1"), ("b", "node-2"))
            }
            # From host-local's range on each node (the upper half of the node's /24: the lower
            # is the direct path's); the cluster DNS pod may hold the first address of one.
            for name, kubelet_range in (("a", "10.244.1.128/25"), ("b", "10.244.2.128/25")):
                ip = wait_for(f"pod {name} Running", lambda n=name: _ip(core, n))  # type: ignore[misc]
                assert ipaddress.ip_address(ip) in ipaddress.ip_network(kubelet_range)
        pod_namespaces = {pod_netns_name(run_id, uid) for uid in uids.values()}
        assert pod_namespaces <= set(netns.list_names(f"stk-{run_id}-pod-"))
        # A crashed kubelet leaves its pod wired: down must sweep it.
        os.kill(state.kubelets[0].pid, signal.SIGKILL)
        wait_for("kubelet-node-1 gone", lambda: not is_alive(state.kubelets[0]))
    finally:
        down = _stockade(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert not state_dir.exists()
    assert netns.list_names(f"stk-{run_id}-") == []
    assert _processes_of(state_dir) == []
    assert not stack.pin_root(run_id).exists()
