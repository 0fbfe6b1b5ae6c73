"""The convergence benchmark runs end to end (`bench/convergence.py --quick`) on a sandbox of its
own and writes every figure DESIGN.md §7 asks of it. Smoke only: the quick run's numbers are not
judged, except that a label change must not reach the compiler."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_convergence_benchmark_writes_every_figure_and_each_is_positive(
    tmp_path: Path,
) -> None:
    out = tmp_path / "convergence.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "convergence.py"), "--quick", "--output", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())
    values = [
        figures["apply_to_enforced_ms"]["p50"],
        figures["apply_to_enforced_ms"]["p99"],
        figures["label_change_ms"]["p50"],
        figures["label_change_ms"]["p99"],
        figures["label_change_to_probe_ms"]["p50"],
        figures["policies_250_pods_100_s"],
    ]
    (scale,) = figures["scale"].values()
    values += [
        scale["initial_converged_s"],
        scale["statuses_settled_s"],
        scale["one_label_change_ms"]["p99"],
        scale["one_policy_change_ms"]["p99"],
        scale["pod_events_per_s"],
        scale["pod_events_sent_without_operator_per_s"],
        scale["operator_rss_mb"],
        scale["reconcile_pass_s"],
    ]
    assert all(isinstance(v, int | float) and v > 0 for v in values), values
    trials = [figures[k] for k in ("apply_to_enforced_ms", "label_change_ms")]
    trials += [scale[k] for k in ("one_label_change_ms", "one_policy_change_ms")]
    for figure in trials:  # every trial, in order
        assert len(figure["each"]) == figure["trials"]
        assert max(figure["each"]) == figure["max"]
    # the operator's passes from the last policy create on: at least the one that published it
    passes = scale["initial_passes"]
    assert passes and all(p["passes"] >= 1 and p["pass_s"] >= 0 for p in passes), passes
    assert passes[-1]["t"] > 0, passes
    # what the initial convergence wrote, and its time from the first create on
    assert scale["initial_from_first_create_s"] >= scale["initial_converged_s"]
    assert scale["initial_tables_written"] > 0 and scale["initial_reconcile_passes"] >= 1
    # what bounds it: the CPU the operator and its worker used in that time, within what the
    # machine used and could give, and the same cluster's first lowering alone
    cpu = scale["initial_cpu_s"]
    assert cpu["operator"] > 0 and cpu["worker"] > 0, cpu
    assert cpu["operator"] + cpu["worker"] <= cpu["machine"] <= cpu["capacity"] * 1.05, cpu
    assert scale["cold_lowering_s"] > 0
    # the pods' intake, likewise: the operator took them in within what the machine used
    intake = scale["intake_cpu_s"]
    assert intake["operator"] > 0, intake
    assert intake["operator"] + intake["worker"] <= intake["machine"], intake
    assert intake["machine"] <= intake["capacity"] * 1.05, intake
    # every small-cluster trial split at the stamps: the store takes the change in first
    for key in ("apply_to_enforced_by_stage_ms", "label_change_by_stage_ms"):
        stages = figures[key]
        assert set(stages) == {"taken", "started", "published", "mapped", "enforced"}, stages
        count = figures["apply_to_enforced_ms"]["trials"]
        assert all(s["trials"] == count for s in stages.values())
        assert stages["taken"]["min"] > 0 and stages["taken"]["p50"] <= stages["mapped"]["p50"]
        # the pass that published a change began before it ended
        began, ended = stages["started"]["each"], stages["published"]["each"]
        assert all(b <= e for b, e in zip(began, ended, strict=True)), (began, ended)
    assert scale["first_label_change_passes"], scale
    assert figures["recompiles_on_label_change"] == 0
    assert figures["program_loads_on_label_change"] == 0
    assert figures["stack_alive_at_end"] is True
    assert not list(Path(tempfile.gettempdir()).glob("stockade-convergence-*"))
