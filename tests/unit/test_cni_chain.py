"""Chaining stockade-cni into a node's primary CNI network (`stockade.runtime.cnichain`): a new
list that copies the primary's plugins and appends stockade-cni, sorting first; the primary is
never touched; a change to it is followed, its removal removes ours; a single-plugin .conf is
chained as a list of one; an earlier stockade-cni is not chained twice; bad files are refused
with the field named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stockade.runtime import cnichain
from stockade.runtime.cnichain import CHAINED_FILE, ChainError, PluginSettings

PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "kindnet",
    "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}, {"type": "portmap"}],
}
SETTINGS = PluginSettings(socket="/run/stockade/cni.sock", fail_open=False)


def write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


def chained(conf_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((conf_dir / CHAINED_FILE).read_text())
    return data


def test_the_chained_list_copies_the_primary_and_appends_stockade_cni(tmp_path: Path) -> None:
    write(tmp_path / "10-kindnet.conflist", PRIMARY)
    before = (tmp_path / "10-kindnet.conflist").read_bytes()
    assert cnichain.install(tmp_path, SETTINGS) == tmp_path / CHAINED_FILE
    got = chained(tmp_path)
    assert got["name"] == "kindnet" and got["cniVersion"] == "1.0.0"
    assert got["plugins"] == [
        *PRIMARY["plugins"],  # type: ignore[misc]
        {"type": "stockade-cni", "socket": "/run/stockade/cni.sock", "failOpen": False},
    ]
    assert sorted(p.name for p in tmp_path.iterdir())[0] == CHAINED_FILE  # the runtime's pick
    assert (tmp_path / "10-kindnet.conflist").read_bytes() == before
    assert cnichain.sync(tmp_path, SETTINGS) == "unchanged"


def test_a_change_of_the_primary_is_followed_and_its_removal_removes_the_chain(
    tmp_path: Path,
) -> None:
    write(tmp_path / "10-kindnet.conflist", PRIMARY)
    cnichain.install(tmp_path, SETTINGS)
    write(tmp_path / "10-kindnet.conflist", {**PRIMARY, "plugins": [{"type": "bridge"}]})
    assert cnichain.sync(tmp_path, SETTINGS) == "written"
    assert [p["type"] for p in chained(tmp_path)["plugins"]] == ["bridge", "stockade-cni"]  # type: ignore[attr-defined]
    (tmp_path / "10-kindnet.conflist").unlink()
    assert cnichain.sync(tmp_path, SETTINGS) == "removed"
    assert not (tmp_path / CHAINED_FILE).exists()


def test_a_single_plugin_conf_is_chained_as_a_list_and_stockade_is_never_chained_twice(
    tmp_path: Path,
) -> None:
    write(tmp_path / "10-flannel.conf", {"cniVersion": "0.4.0", "name": "cbr0", "type": "flannel"})
    cnichain.install(tmp_path, PluginSettings(fail_open=True))
    assert chained(tmp_path)["plugins"] == [
        {"type": "flannel"},
        {"type": "stockade-cni", "socket": "/run/stockade/cni.sock", "failOpen": True},
    ]
    (tmp_path / "10-flannel.conf").unlink()
    write(tmp_path / "10-x.conflist", chained(tmp_path))  # a copy that already chains it
    cnichain.sync(tmp_path, SETTINGS)
    assert [p["type"] for p in chained(tmp_path)["plugins"]] == ["flannel", "stockade-cni"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "'plugins'"),
        ({"cniVersion": "1.0.0", "plugins": [{"type": "ptp"}]}, "'name'"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": [{}]}, "'plugins[0].type'"),
        ({"cniVersion": "1.0.0", "name": "n"}, "'type'"),
    ],
    ids=["empty-plugins", "no-name", "plugin-without-type", "conf-without-type"],
)
def test_a_bad_primary_is_refused_naming_the_field(
    tmp_path: Path, data: object, field: str
) -> None:
    write(tmp_path / "10-bad.conflist", data)
    with pytest.raises(ChainError, match=re.escape(field)):
        cnichain.install(tmp_path, SETTINGS)
    assert not (tmp_path / CHAINED_FILE).exists()


def test_install_without_a_primary_fails_and_uninstall_is_idempotent(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="no CNI network configuration"):
        cnichain.install(tmp_path, SETTINGS)
    write(tmp_path / "10-kindnet.conflist", PRIMARY)
    cnichain.install(tmp_path, SETTINGS)
    assert cnichain.uninstall(tmp_path) is True
    assert cnichain.uninstall(tmp_path) is False
