"""`stockade explain` on the conformance model: the shared case files run on the `explain`
engine (the e2e engine's sandbox, the one test_e2e_engine.py uses: tests/conformance/conftest.py;
its pods and policies; every check answered by explain, the reference evaluator on the live
cluster beside the agents' test runs of their loaded programs).
A case passes only when explain gives the expected verdict on every check and the datapath
agrees with it on every hop. CI runs a fixed-seed sample of each file's cases
(`STOCKADE_EXPLAIN_SAMPLE=all` runs them all); a wrong expectation fails."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.conformance.casefile import load_case_file
from tests.conformance.generated import SEED
from tests.paths import CONFORMANCE, ROOT

DATA = Path(__file__).parent / "data"
TIMEOUT = 1200
SAMPLE = os.environ.get("STOCKADE_EXPLAIN_SAMPLE", "8")


def run(*args: str, sandbox: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STOCKADE_E2E_SANDBOX=str(sandbox))
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "conformance", "run", *args, "--engine", "explain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )


def sample(case_file: Path, profile: str | None) -> list[str]:
    ids = [c.id for c in load_case_file(case_file).cases if profile is None or c.profile == profile]
    if SAMPLE == "all":
        return ids
    return sorted(random.Random(SEED).sample(ids, min(int(SAMPLE), len(ids))))


@pytest.mark.parametrize(
    ("case_file", "profile"),
    [("netpol-upstream.yaml", None), ("cnp-upstream.yaml", "standard")],
    ids=["network-policy", "cluster-network-policy-standard"],
)
def test_explain_agrees_with_the_datapath_and_the_expectation_on_every_check(
    e2e_sandbox: Path, case_file: str, profile: str | None
) -> None:
    ids = sample(CONFORMANCE / case_file, profile)
    options = [arg for case in ids for arg in ("--case", case)]
    result = run(str(CONFORMANCE / case_file), *options, sandbox=e2e_sandbox)
    assert result.stdout.splitlines()[-1] == f"{len(ids)} passed, 0 failed", (
        f"seed {SEED}\n" + result.stdout + result.stderr
    )
    assert result.returncode == 0


def test_a_wrong_expectation_fails_on_explain(e2e_sandbox: Path) -> None:
    result = run(str(DATA / "wrong-expectation.yaml"), sandbox=e2e_sandbox)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "PASS right"
    assert "x/b -> x/a TCP/80 unexpectedly denied" in lines[1]
    assert lines[-1] == "1 passed, 1 failed"
