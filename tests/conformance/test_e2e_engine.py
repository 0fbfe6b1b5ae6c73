"""The conformance case files on the e2e engine: the whole stack (API server, operator, agents,
pods in network namespaces, real connections) gives every upstream case the expected result.

The two upstream files run on the sandbox this tier's e2e and explain engine tests share
(`e2e_sandbox`, tests/conformance/conftest.py, as `$STOCKADE_E2E_SANDBOX`), the
ClusterNetworkPolicy file with its standard profile only (its experimental cases need named ports
and node peers on host-network pods). A file with a wrong expectation runs on a sandbox the engine
starts itself, and must fail and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import conformance_services
from stockade.sandbox import netns, stack
from tests.conformance.generated import SEED, generate
from tests.paths import CONFORMANCE, ROOT

DATA = Path(__file__).parent / "data"
TIMEOUT = 900


def run(*args: str, sandbox: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STOCKADE_E2E_SANDBOX"}
    if sandbox is not None:
        env["STOCKADE_E2E_SANDBOX"] = str(sandbox)
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "conformance", "run", *args, "--engine", "e2e"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize(
    ("case_file", "options", "closing"),
    [
        ("netpol-upstream.yaml", [], "24 passed, 0 failed"),
        ("cnp-upstream.yaml", ["--profile", "standard"], "42 passed, 0 failed"),
    ],
    ids=["network-policy", "cluster-network-policy-standard"],
)
def test_every_upstream_case_passes_on_the_whole_stack(
    e2e_sandbox: Path, case_file: str, options: list[str], closing: str
) -> None:
    result = run(str(CONFORMANCE / case_file), *options, sandbox=e2e_sandbox)
    assert result.stdout.splitlines()[-1] == closing, result.stdout + result.stderr
    assert result.returncode == 0


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_a_named_port_on_a_rule_with_a_pod_ipblock_is_decided_on_the_pod(
    e2e_sandbox: Path, family: str
) -> None:
    result = run(str(DATA / "named-port-ipblock.yaml"), "--ip-family", family, sandbox=e2e_sandbox)
    assert result.stdout.splitlines()[-1] == "2 passed, 0 failed", result.stdout + result.stderr


def test_generated_cases_pass_on_the_whole_stack(e2e_sandbox: Path, tmp_path: Path) -> None:
    """50 cases of `hack/gen_conformance.py` (12 checks per probed port) on real pods."""
    path = generate(tmp_path / "generated.yaml", 50, 4, checks_per_probe=12)
    result = run(str(path), sandbox=e2e_sandbox)
    assert result.stdout.splitlines()[-1] == "50 passed, 0 failed", (
        f"seed {SEED}\n" + result.stdout + result.stderr
    )
    assert result.returncode == 0


VIA_SERVICE_CASES = ("tcp-01", "tcp-19", "tcp-25", "tcp-29", "udp-01")


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_upstream_cases_pass_through_cluster_ips(family: str) -> None:
    """--via service: every TCP and UDP probe goes to a ClusterIP Service of its destination pod
    (a sandbox of the engine's own, its operator handing out the Service space), with the same
    expectations: default-deny ingress and egress, egress on a named port, egress to a pod and
    namespace selector, UDP (docs/services.md)."""
    cases = [arg for case in VIA_SERVICE_CASES for arg in ("--case", case)]
    result = run(
        str(CONFORMANCE / "netpol-upstream.yaml"), "--via", "service", "--ip-family", family, *cases
    )
    assert result.stdout.splitlines()[-1] == "5 passed, 0 failed", result.stdout + result.stderr


def _engine_dirs() -> set[Path]:
    return set(Path("/run").glob("stockade-e2e-*"))


def test_a_wrong_expectation_fails_on_the_whole_stack_and_its_sandbox_is_removed() -> None:
    dirs_before = _engine_dirs()
    result = run(str(DATA / "wrong-expectation.yaml"))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "PASS right"
    assert lines[1].startswith("FAIL wrong")
    assert "x/b -> x/a TCP/80 unexpectedly denied" in lines[1]
    assert "x/a -> x/c TCP/80 unexpectedly allowed" in lines[1]
    assert lines[-1] == "1 passed, 1 failed"
    started = re.search(r"sandbox run ([a-z0-9]+) with operator and agents up", result.stderr)
    assert started is not None, result.stderr
    run_id = started.group(1)
    assert netns.list_names(f"stk-{run_id}-") == []
    assert not stack.pin_root(run_id).exists()
    assert _engine_dirs() == dirs_before


@pytest.mark.parametrize("mode", ["iptables-netfilter", "nftables-fallback"])
def test_a_fixed_seed_sample_of_upstream_cases_passes_through_cluster_ips(
    mode: str, tmp_path: Path
) -> None:
    """The outside-CI run of the suites through Services (`bench/conformance_services.py`) on a
    sample drawn with a fixed seed, in kube-proxy's iptables mode and in the agents' fallback
    mode (nftables with netfilter is the test above)."""
    output = tmp_path / "conformance_services.json"
    args = ["--mode", mode, "--file", "netpol-upstream.yaml", "--sample", "3", "--seed", "13"]
    status = conformance_services.main([*args, "--output", str(output)])
    result = json.loads(output.read_text())["modes"][mode]["files"]["netpol-upstream.yaml"]
    assert (result["passed"], result["failed"]) == (3, 0), result
    assert status == 0
