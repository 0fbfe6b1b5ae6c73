"""The sandbox the e2e and explain engines' runs share (`$STOCKADE_E2E_SANDBOX`): started once
for both files with `stockade sandbox up --nodes 2` and removed after the last of their tests.
Each run builds the conformance model on it, resets it between cases and removes its pods and
Services when it ends, so a run finds the sandbox as the previous one left it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack_fixtures import stockade
from tests.fixtures.shared import shared

TIMEOUT = 900


@contextlib.contextmanager
def _cli_sandbox(state_dir: Path) -> Iterator[Path]:
    try:
        started = stockade(state_dir, "up", "--nodes", "2", timeout=TIMEOUT)
        assert started.returncode == 0, started.stderr
        yield state_dir
    finally:
        stockade(state_dir, "down", timeout=TIMEOUT)


@pytest.fixture(scope="session")
def e2e_sandbox(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared(request, _cli_sandbox(tmp_path_factory.mktemp("e2e") / "sandbox"))
