"""docs/metrics.md names every metric series the operator and the agent serve, and no other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERIES = re.compile(r"\b(stockade_(?:agent|operator|rule|datapath)_[a-z_]+)\b")


def served() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "operator" / "stockade").rglob("*.py"):
        names |= set(SERIES.findall(path.read_text()))
    return names


def documented() -> set[str]:
    lines = (ROOT / "docs" / "metrics.md").read_text().splitlines()
    rows = (line for line in lines if line.startswith("| `"))
    return {m.group(1) for line in rows if (m := SERIES.search(line))}


def test_every_served_series_is_documented_and_every_documented_one_is_served() -> None:
    assert served(), "found no metric names in the package"
    assert served() - documented() == set(), "served but not in docs/metrics.md"
    assert documented() - served() == set(), "in docs/metrics.md but not served"
