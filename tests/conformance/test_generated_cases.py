"""Generated cases (`hack/gen_conformance.py`) on the reference and datapath engines: random
standard and stockade NetworkPolicies over the 9-pod model, mixing ipBlocks that hold pod
addresses with selectors and named ports whose number differs between pods, with the reference
evaluator's expectations. The datapath must agree with the evaluator on every check. The e2e
engine runs its own sample in test_e2e_engine.py. Seed: `tests.conformance.generated.SEED`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.generated import SEED, generate
from tests.conformance.test_datapath_engine import run

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("engine", "family", "cases"),
    [("reference", 4, 200), ("datapath", 4, 200), ("datapath", 6, 200)],
    ids=["reference-ipv4", "datapath-ipv4", "datapath-ipv6"],
)
def test_generated_cases_pass_on_the_engine(
    tmp_path: Path, engine: str, family: int, cases: int
) -> None:
    path = generate(tmp_path / "generated.yaml", cases, family)
    result = run(str(path), "--engine", engine, "--ip-family", str(family))
    assert result.stdout.splitlines()[-1] == f"{cases} passed, 0 failed", (
        f"seed {SEED}\n" + result.stdout + result.stderr
    )
    assert result.returncode == 0


@pytest.mark.parametrize("engine", ["reference", "datapath"])
@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
def test_a_named_port_on_a_rule_with_a_pod_ipblock_is_decided_on_the_pod(
    engine: str, family: str
) -> None:
    result = run(str(DATA / "named-port-ipblock.yaml"), "--engine", engine, "--ip-family", family)
    assert result.stdout.splitlines()[-1] == "2 passed, 0 failed", result.stdout + result.stderr
