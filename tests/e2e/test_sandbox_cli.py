"""`stockade sandbox up / status / down` as a user runs them: a separate process that leaves the
sandbox running, Nodes Ready for kubectl, and a `down` that leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.sandbox import netns
from stockade.sandbox.controlplane.server import kubectl
from stockade.sandbox.processes import find_processes, is_alive
from stockade.sandbox.session import STATE_FILE, TOPOLOGY_FILE, SandboxState
from stockade.sandbox.toolchain import ETCD, KUBERNETES
from stockade.sandbox.topology import Topology
from tests.e2e.stack_fixtures import sandbox_state_dir, stockade


def ready_nodes(kubeconfig: Path) -> list[str]:
    out = kubectl(kubeconfig, "get", "nodes", "-o", "json").stdout
    return sorted(
        node["metadata"]["name"]
        for node in json.loads(out)["items"]
        if any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    with sandbox_state_dir(tmp_path) as path:
        yield path


def test_sandbox_up_gives_ready_nodes_and_down_leaves_nothing_behind(state_dir: Path) -> None:
    started = stockade(state_dir, "up", "--nodes", "2")
    assert started.returncode == 0, started.stderr
    kubeconfig = Path(started.stdout.strip().splitlines()[-1])
    state = SandboxState.load(state_dir)
    assert state is not None and state.control_plane is not None

    assert len(ready_nodes(kubeconfig)) == 2
    assert all(is_alive(p) for p in state.control_plane.processes)
    topology = Topology.load(state_dir / TOPOLOGY_FILE)
    assert len(topology.nodes) == 2
    assert all(netns.exists(name) for name in topology.namespaces())

    status = stockade(state_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.strip().endswith("healthy")

    stopped = stockade(state_dir, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(is_alive(p) for p in state.control_plane.processes)
    assert find_processes({ETCD.path("etcd"), KUBERNETES.path("kube-apiserver")}, state_dir) == []
    assert not any(netns.exists(name) for name in topology.namespaces())
    assert netns.read_record(topology.run_id) is None
    assert not (state_dir / STATE_FILE).exists()
    assert not kubeconfig.exists()

    again = stockade(state_dir, "down")
    assert again.returncode == 0, again.stderr
    assert stockade(state_dir, "status").returncode == 3


def test_sandbox_up_replaces_a_crashed_run(state_dir: Path) -> None:
    first = stockade(state_dir, "up", "--nodes", "1")
    assert first.returncode == 0, first.stderr
    crashed = SandboxState.load(state_dir)
    assert crashed is not None and crashed.control_plane is not None
    apiserver = next(p for p in crashed.control_plane.processes if p.name == "kube-apiserver")
    subprocess.run(["kill", "-KILL", str(apiserver.pid)], check=True)

    unhealthy = stockade(state_dir, "status")
    assert unhealthy.returncode == 1
    assert "FAIL  kube-apiserver" in unhealthy.stdout

    second = stockade(state_dir, "up", "--nodes", "1")
    assert second.returncode == 0, second.stderr
    replaced = SandboxState.load(state_dir)
    assert replaced is not None and replaced.run_id != crashed.run_id
    assert not any(is_alive(p) for p in crashed.control_plane.processes)
    assert len(ready_nodes(Path(second.stdout.strip().splitlines()[-1]))) == 1
