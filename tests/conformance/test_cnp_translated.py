"""The upstream ClusterNetworkPolicy suite holds stockade's own ClusterNetworkPolicy to the same
semantics: every case of cnp-upstream.yaml, with its upstream objects translated to
`stockade.io/v1alpha1` (`stockade.conformance.translate`), gives the same result line by line as
the untranslated file on the reference engine, through the real command line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from stockade.conformance.translate import is_upstream_cnp, policy_objects, translate_case_file
from tests.paths import CONFORMANCE

CNP_FILE = CONFORMANCE / "cnp-upstream.yaml"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
ENGINE = ("--engine", "reference")


def run_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", "conformance", "run", str(path), *ENGINE],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_translated_cases_pass_on_the_reference_engine_exactly_like_upstream(
    tmp_path: Path,
) -> None:
    raw = yaml.load(CNP_FILE.read_text(encoding="utf-8"), Loader=LOADER)
    translated = translate_case_file(raw)
    objects = [obj for _, obj in policy_objects(translated)]
    assert translated["translation"]["objects"] > 0
    assert not any(is_upstream_cnp(obj) for obj in objects)
    target = tmp_path / "cnp-stockade.yaml"
    target.write_text(yaml.dump(translated, Dumper=DUMPER, sort_keys=False), encoding="utf-8")

    upstream, stockade = run_cli(CNP_FILE), run_cli(target)

    total = len(raw["cases"])
    assert upstream.returncode == 0, upstream.stdout + upstream.stderr
    assert stockade.returncode == 0, stockade.stdout + stockade.stderr
    assert stockade.stdout.splitlines() == upstream.stdout.splitlines()
    assert stockade.stdout.splitlines()[-1] == f"{total} passed, 0 failed"
    assert sum(line.startswith("PASS ") for line in stockade.stdout.splitlines()) == total
