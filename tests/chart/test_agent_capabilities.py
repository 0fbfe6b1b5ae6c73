"""The agent's capabilities, shown on the real kernel: with exactly the chart's set, every
kernel operation the agent performs succeeds; with any one of them removed, one fails.

tests/chart/agent_kernel_probe.py runs the agent's own datapath code (compile, load programs
and BTF, create and pin maps, write tables, read events, create/update/query tcx links, legacy
clsact filters) in a network namespace of its own, under `setpriv` with the bounding set the
chart's DaemonSet adds to an otherwise capability-less root process, as a container runtime
does. Measured on kernel 6.18: BPF, NET_ADMIN and PERFMON are each required (without PERFMON
the verifier rejects the programs' pointer arithmetic "for !root"); SYS_ADMIN is not.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chart.chart import find, render
from tests.paths import ROOT

PROBE = ROOT / "tests" / "chart" / "agent_kernel_probe.py"
BPFFS = Path("/sys/fs/bpf")


def chart_capabilities() -> list[str]:
    ds = find(render(), "DaemonSet", "stockade-agent")
    added: list[str] = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "capabilities"
    ]["add"]
    return added


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with a veth pair (both ends inside), removed afterwards."""
    name = f"stockade-caps-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "capveth0", "type", "veth", "peer", "name", "capveth1")
        _ip("-n", name, "link", "set", "capveth0", "up")
        _ip("-n", name, "link", "set", "capveth1", "up")
        yield name
    finally:
        _ip("netns", "del", name)


def run_probe(netns: str, capabilities: list[str], tmp_path: Path) -> dict[str, str]:
    """Each step of the probe -> "" when it succeeded, else its error."""
    pin_root = BPFFS / f"stockade-caps-{secrets.token_hex(4)}"
    pin_root.mkdir()
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
    try:
        proc = subprocess.run(
            [
                "nsenter",
                f"--net=/run/netns/{netns}",
                "setpriv",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                f"--bounding-set={bounding}",
                "--",
                sys.executable,
                str(PROBE),
                str(pin_root),
                str(tmp_path / "cache"),
                "capveth0",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout)["steps"]
    return {s["step"]: s["error"] for s in steps}


def test_the_chart_adds_bpf_net_admin_and_perfmon_and_no_sys_admin() -> None:
    assert sorted(chart_capabilities()) == ["BPF", "NET_ADMIN", "PERFMON"]


def test_every_agent_kernel_operation_succeeds_with_the_chart_capabilities(
    netns: str, tmp_path: Path
) -> None:
    steps = run_probe(netns, chart_capabilities(), tmp_path)
    assert len(steps) == 8, steps
    failed = {step: error for step, error in steps.items() if error}
    assert not failed


@pytest.mark.parametrize("missing", ["BPF", "NET_ADMIN", "PERFMON"])
def test_each_chart_capability_is_needed(netns: str, tmp_path: Path, missing: str) -> None:
    fewer = [c for c in chart_capabilities() if c != missing]
    steps = run_probe(netns, fewer, tmp_path)
    failed = {step: error for step, error in steps.items() if error}
    assert failed, f"every agent operation succeeded without {missing}"
