"""`stockade demo` end to end: it starts a sandbox with stockade, builds the 9-pod model, applies
the example policies of examples/demo/ one by one, and its TCP/80 matrices from real probes show
what each policy intends (default deny in x first); without --keep and without a terminal it
removes the sandbox it started. After the Audit-mode trial it shows, from `stockade observe`, the
connections the trial would have dropped, naming its rule."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from stockade.sandbox import netns, stack
from stockade.sandbox.demo import PODS, load_steps
from stockade.sandbox.session import STATE_FILE

TIMEOUT = 900


def matrix_after(stdout: str, title_start: str) -> dict[tuple[str, str], str]:
    """The matrix printed under the section whose title starts with `title_start`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title_start}"))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("from\\to"))
    cells: dict[tuple[str, str], str] = {}
    for row in lines[header + 1 : header + 1 + len(PODS)]:
        src, *marks = row.split()
        cells.update({(src, dst): mark for dst, mark in zip(PODS, marks, strict=True)})
    return cells


def test_the_demo_shows_each_policy_enforced_and_cleans_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "sandbox"
    result = subprocess.run(
        [sys.executable, "-m", "stockade.cli", "demo", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("as intended:") == 1 + len(load_steps())
    assert "NOT as intended" not in out
    # the Audit-mode trial: what it would have dropped, from `stockade observe`
    audited = [line.strip() for line in out.splitlines() if line.strip().startswith("AUDIT ")]
    assert audited, out
    for line in audited:
        assert line.startswith("AUDIT z/a -> "), line
        assert "egress on node-" in line, line
        assert line.split(": ", 1)[1].startswith(
            "NetworkPolicy.stockade.io z/trial-deny-web Egress rule 0 x"
        ), line

    before = matrix_after(out, "no policy")
    assert set(before.values()) == {".", "-"}
    deny = matrix_after(out, "01-default-deny.yaml")
    for (src, dst), mark in deny.items():
        if src == dst:
            assert mark == "-"
        elif src.startswith("x/") or dst.startswith("x/"):
            assert mark == "X", (src, dst)
        else:
            assert mark == ".", (src, dst)
    opened = matrix_after(out, "02-allow-from-labelled-namespace.yaml")
    assert [opened[(f"y/{p}", "x/a")] for p in "abc"] == [".", ".", "."]
    assert opened[("z/a", "x/a")] == "X"

    assert not (state_dir / STATE_FILE).exists()
    assert stack.stray_processes(state_dir) == []
    run = re.search(r"netns stk-([a-z0-9]+)-node1", result.stderr)
    assert run is not None, result.stderr
    assert netns.list_names(f"stk-{run.group(1)}-") == []
    assert not stack.pin_root(run.group(1)).exists()
