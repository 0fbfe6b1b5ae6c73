"""Test tiers by folder: each test is marked with its tier, and a tier's requirements are checked
up front so that a missing requirement fails loudly instead of skipping quietly.

Shared fixtures live in `tests/fixtures/` and are registered here as plugins.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.controlplane",
    "tests.fixtures.netns",
    "tests.fixtures.shared",
]

TIERS = ("unit", "compile", "bpf", "attacks", "apiserver", "node", "e2e", "conformance", "chart")
ROOT = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).relative_to(ROOT)
        tier = rel.parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
