"""The conformance case files on the datapath engine: the compiled programs, probed with
BPF_PROG_TEST_RUN, give every case the result the upstream suites expect, in both families."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import CONFORMANCE, ROOT

DATA = Path(__file__).parent / "data"
BPFFS = Path("/sys/fs/bpf")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "conformance", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )


def _pins() -> set[str]:
    return {p.name for p in BPFFS.glob("stockade-conformance-*")}


@pytest.mark.parametrize(
    ("case_file", "closing"),
    [("netpol-upstream.yaml", "24 passed, 0 failed"), ("cnp-upstream.yaml", "49 passed, 0 failed")],
    ids=["network-policy", "cluster-network-policy"],
)
@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_every_upstream_case_passes_on_the_compiled_programs(
    case_file: str, closing: str, family: str
) -> None:
    before = _pins()
    result = run(str(CONFORMANCE / case_file), "--engine", "datapath", "--ip-family", family)
    assert result.stdout.splitlines()[-1] == closing, result.stdout + result.stderr
    assert result.returncode == 0
    assert _pins() == before, "the engine left pinned maps behind"


def test_a_wrong_expectation_fails_on_the_datapath_engine_too() -> None:
    result = run(str(DATA / "wrong-expectation.yaml"), "--engine", "datapath")
    assert result.returncode == 1
    assert "FAIL wrong" in result.stdout
    assert result.stdout.splitlines()[-1] == "1 passed, 1 failed"


def test_stockade_extensions_pass_on_the_datapath_engine() -> None:
    result = run(str(DATA / "stockade-extensions.yaml"), "--engine", "datapath")
    assert result.stdout.splitlines()[-1] == "4 passed, 0 failed, 1 unsupported", result.stdout
