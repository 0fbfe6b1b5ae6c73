"""`stockade sandbox up` runs stockade itself: the operator (two replicas with leader election)
and one agent per node, each agent with its own pins; `status` lists them with what each agent
applied; `down` stops them first and leaves no process, namespace or pin behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.sandbox import netns, stack
from stockade.sandbox.processes import is_alive
from stockade.sandbox.session import TOPOLOGY_FILE, SandboxState
from stockade.sandbox.topology import Topology
from tests.e2e.stack_fixtures import sandbox_state_dir, stockade


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    with sandbox_state_dir(tmp_path) as path:
        yield path


def test_sandbox_up_runs_the_operator_and_an_agent_per_node_and_down_removes_them(
    state_dir: Path,
) -> None:
    started = stockade(state_dir, "up", "--nodes", "2", "--replicas", "2")
    assert started.returncode == 0, started.stderr
    state = SandboxState.load(state_dir)
    assert state is not None and state.stack is not None
    record = state.stack
    names = sorted(p.name for p in record.processes)
    assert names == ["agent-node-1", "agent-node-2", "operator-0", "operator-1"]
    assert all(is_alive(p) for p in record.processes)
    assert all(p.log.is_file() for p in record.processes)
    assert sorted(p.name for p in record.pin_root.iterdir()) == ["node-1", "node-2"]
    topology = Topology.load(state_dir / TOPOLOGY_FILE)

    status = stockade(state_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    for name in names:
        assert any(line.split()[:2] == ["ok", name] for line in lines), status.stdout
    for node in ("node-1", "node-2"):
        line = next(x for x in lines if f"datapath {node}" in x)
        assert line.split()[0] == "ok" and "applied" in line, line

    stopped = stockade(state_dir, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr.index("stopping agent-node-1") < stopped.stderr.index(
        "stopping kube-apiserver"
    )
    assert not any(is_alive(p) for p in record.processes)
    assert stack.stray_processes(state_dir) == []
    assert not any(netns.exists(name) for name in topology.namespaces())
    assert not record.pin_root.exists()
    base = record.pin_root.parent
    assert not base.exists() or any(base.iterdir()), "an empty pin base is left behind"


def test_sandbox_status_reports_an_agent_that_died(state_dir: Path) -> None:
    started = stockade(state_dir, "up", "--nodes", "1")
    assert started.returncode == 0, started.stderr
    state = SandboxState.load(state_dir)
    assert state is not None and state.stack is not None
    agent = next(p for p in state.stack.processes if p.name == "agent-node-1")
    subprocess.run(["kill", "-KILL", str(agent.pid)], check=True)

    status = stockade(state_dir, "status")
    assert status.returncode == 1
    assert any(line.split()[:2] == ["FAIL", "agent-node-1"] for line in status.stdout.splitlines())
