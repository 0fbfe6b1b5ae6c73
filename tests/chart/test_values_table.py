"""docs/install.md's configuration table is generated from values.yaml's comments, every key is
documented, and the table in the doc is the generated one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.paths import ROOT


def values_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("values_table", ROOT / "hack" / "values-table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_install_doc_table_is_the_generated_one() -> None:
    vt = values_table()
    doc = (ROOT / "docs" / "install.md").read_text()
    assert vt.with_table(doc, vt.table()) == doc, "run hack/values-table.py --write"


def test_every_leaf_of_both_components_has_a_row() -> None:
    vt = values_table()
    keys = [line.split("`")[1] for line in vt.table().splitlines()[2:]]
    for component in ("operator", "agent"):
        for key in (
            "enabled",
            "image.repository",
            "capabilities",
            "metrics.port",
            "healthPort",
            "serviceAccount.name",
            "updateStrategy",
            "resources",
        ):
            assert f"{component}.{key}" in keys


def test_an_undocumented_key_is_named(tmp_path: Path) -> None:
    vt = values_table()
    path = tmp_path / "values.yaml"
    path.write_text("# -- documented\na: 1\nb:\n  c: 2\n")
    with pytest.raises(vt.ValuesDocError, match=r"'b\.c'"):
        vt.table(path)
