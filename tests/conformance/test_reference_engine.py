"""The conformance case files on the reference engine, through the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import CONFORMANCE as SHARED
from tests.paths import ROOT

DATA = Path(__file__).parent / "data"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "conformance", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_the_upstream_network_policy_cases_all_pass(family: str) -> None:
    result = run(
        str(SHARED / "netpol-upstream.yaml"), "--engine", "reference", "--ip-family", family
    )
    lines = result.stdout.splitlines()
    assert lines[-1] == "24 passed, 0 failed", result.stdout + result.stderr
    assert sum(line.startswith("PASS ") for line in lines) == 24
    assert result.returncode == 0


def test_every_standard_profile_cluster_network_policy_case_passes() -> None:
    result = run(
        str(SHARED / "cnp-upstream.yaml"), "--engine", "reference", "--profile", "standard"
    )
    assert result.stdout.splitlines()[-1] == "42 passed, 0 failed", result.stdout + result.stderr
    assert result.returncode == 0


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_the_experimental_cluster_network_policy_cases_pass_too(family: str) -> None:
    result = run(str(SHARED / "cnp-upstream.yaml"), "--ip-family", family)
    assert result.stdout.splitlines()[-1] == "49 passed, 0 failed", result.stdout + result.stderr
    assert result.returncode == 0


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_a_made_up_case_file_with_stockade_extensions_runs_and_counts_unsupported_apart(
    family: str,
) -> None:
    result = run(str(DATA / "stockade-extensions.yaml"), "--ip-family", family)
    lines = result.stdout.splitlines()
    assert lines[-1] == "4 passed, 0 failed, 1 unsupported", result.stdout + result.stderr
    assert lines[-2].startswith("UNSUPPORTED domain-names-unsupported: ")
    assert result.returncode == 0


def test_a_wrong_expectation_fails_its_case_names_the_pairs_and_exits_1() -> None:
    result = run(str(DATA / "wrong-expectation.yaml"))
    assert result.stdout.splitlines() == [
        "PASS right",
        "FAIL wrong: step 1: x/a -> x/c TCP/80 unexpectedly allowed; "
        "step 1: x/b -> x/a TCP/80 unexpectedly denied",
        "1 passed, 1 failed",
    ]
    assert result.returncode == 1


def test_one_case_can_be_selected_by_id() -> None:
    result = run(str(SHARED / "netpol-upstream.yaml"), "--case", "tcp-35")
    assert result.stdout.splitlines() == ["PASS tcp-35", "1 passed, 0 failed"]


def test_a_file_that_is_not_a_case_file_exits_2_with_the_field_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {namespaces: {x: {}}, pods: {}}\ncases: [{name: no-id, steps: []}]\n")
    result = run(str(bad))
    assert result.returncode == 2
    assert "cases[0].id: must be a non-empty string" in result.stderr
