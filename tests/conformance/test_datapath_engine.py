"""The conformance case files on the datapath engine: the compiled programs, probed with
BPF_PROG_TEST_RUN, give every case the result the upstream suites expect, in both families."""

from __future__ import annotations

import io
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


def test_cases_of_one_run_do_not_see_each_others_maps() -> None:
    """One load serves the whole run: a case after one that let x/b reach x/a (a conntrack
    entry for the very flow it probes) sees the deny policy, and the case after it sees none."""
    before = _pins()
    result = run(str(DATA / "isolation.yaml"), "--engine", "datapath")
    assert result.stdout.splitlines()[-1] == "3 passed, 0 failed", result.stdout + result.stderr
    assert _pins() == before, "the engine left pinned maps behind"


def test_the_isolation_cases_catch_a_conntrack_entry_left_from_the_previous_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check above has teeth: without the conntrack flush between cases the flow the first
    case allowed is still allowed in the second, and the pin root still goes at close()."""
    from stockade.conformance.casefile import load_case_file
    from stockade.conformance.engines.datapath import DatapathEngine
    from stockade.conformance.runner import run_file
    from stockade.harness import loader

    monkeypatch.setattr(loader.maps, "flush_conntrack", lambda maps: 0)
    before = _pins()
    engine = DatapathEngine()
    try:
        summary = run_file(engine, load_case_file(DATA / "isolation.yaml"), io.StringIO())
        assert engine.root is not None and engine.root.exists()
    finally:
        engine.close()
    assert [r.status.value for r in summary.results] == ["PASS", "FAIL", "PASS"], summary.results
    assert _pins() == before, "close() left pinned maps behind"


def test_a_case_that_raises_leaves_no_pins_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command closes the engine when the run ends, also when a case raises."""
    from stockade.conformance import command
    from stockade.conformance.engines.datapath import DatapathEngine

    def broken(self: DatapathEngine, checks: object) -> list[object]:
        assert self.root is not None and self.root.exists()
        raise RuntimeError("probe broke")

    monkeypatch.setattr(DatapathEngine, "probe", broken)
    before = _pins()
    with pytest.raises(RuntimeError, match="probe broke"):
        command.main(["run", str(DATA / "isolation.yaml"), "--engine", "datapath"])
    assert _pins() == before, "the engine left pinned maps behind"
