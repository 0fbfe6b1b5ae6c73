"""How the toolchain runs go: progress lines while a command runs, a clear error when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.sandbox import toolchain


def test_a_command_that_closes_its_output_before_exiting_logs_no_progress_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # go can close its output a moment before it exits; that must not make the wait loop spin.
    out = toolchain._run(["sh", "-c", "echo done; exec >&- 2>&-; sleep 0.5"], tmp_path, "toy")
    assert out == "done\n"
    assert "[toolchain]" not in capsys.readouterr().err


def test_a_failing_command_names_its_step_and_shows_its_output(tmp_path: Path) -> None:
    with pytest.raises(toolchain.ToolchainError, match=r"toy: compiling failed \(exit 3\)"):
        toolchain._run(["sh", "-c", "echo boom; exit 3"], tmp_path, "toy: compiling")
