"""Generated conformance files for the engine tests: `hack/gen_conformance.py` run with a fixed
seed (or `STOCKADE_GEN_SEED`, to try a fresh one), so that what CI runs is reproducible and a
person can widen it without editing a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.paths import ROOT

SEED = int(os.environ.get("STOCKADE_GEN_SEED", "20261202"))


def generate(out: Path, cases: int, family: int, checks_per_probe: int = 0) -> Path:
    """Write `cases` generated cases for `family` to `out` and return it."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "hack" / "gen_conformance.py"),
            "--seed",
            str(SEED),
            "--cases",
            str(cases),
            "--ip-family",
            str(family),
            "--checks-per-probe",
            str(checks_per_probe),
            "-o",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    return out
