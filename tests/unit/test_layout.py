"""The repository layout keeps its promises: operator/ is only a source root, so the standard
library's `operator` module is never shadowed by it."""

from __future__ import annotations

import importlib
import subprocess
import sys

from tests.paths import ROOT


def test_operator_folder_has_no_init_file() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_operator_folder_holds_no_loose_modules() -> None:
    assert sorted(p.name for p in (ROOT / "operator").glob("*.py")) == []


def test_import_operator_is_still_the_standard_library() -> None:
    module = importlib.import_module("operator")
    assert hasattr(module, "itemgetter"), module
    assert "site-packages" not in str(getattr(module, "__file__", ""))


def test_import_operator_from_the_repository_root_is_still_the_standard_library() -> None:
    # Run from the root, where a stray operator/__init__.py would win over the standard library.
    probe = "import operator, sys; print(hasattr(operator, 'itemgetter'))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True"
