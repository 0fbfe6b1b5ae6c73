"""Chain stockade-cni into a node's primary CNI network, as a new configuration list.

A container runtime uses the first network configuration in its directory by file name
(`*.conflist`, `*.conf`, `*.json`: libcni `ConfFiles` and `LoadConfList`, as containerd and
CRI-O do). stockade never edits the primary CNI's file: `install()` writes
`00-stockade.conflist`, a copy of the primary list (the first other file by name) with
stockade-cni appended as the last plugin, so it sorts first and the runtime uses it; it records
which file and which content it was made from. `sync()` rewrites it when the primary changed
(the agent DaemonSet's installer calls it on a timer: CNIs rewrite their files on upgrade) and
removes it when the primary is gone; `uninstall()` removes it. A primary that already chains
stockade-cni (an older copy) is chained once, not twice.

The same code writes the sandbox nodes' chained list (`stockade.sandbox.node.network`) and the
chart's installer (`stockade cni-install`), so what the tests run is what a cluster runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAINED_FILE = "00-stockade.conflist"
PLUGIN_TYPE = "stockade-cni"  # also the binary's name in the CNI binary directory
SOURCE_KEY = "stockade.io/chained-from"  # top-level key: "<file> sha256:<digest>"
CONF_SUFFIXES = (".conflist", ".conf", ".json")


class ChainError(ValueError):
    """The primary configuration cannot be chained; the message names the file and field."""


@dataclass(frozen=True)
class PluginSettings:
    """stockade-cni's own configuration in the chained list (cni/main.go reads it)."""

    socket: str = "/run/stockade/cni.sock"
    fail_open: bool = False

    def conf(self) -> dict[str, Any]:
        return {"type": PLUGIN_TYPE, "socket": self.socket, "failOpen": self.fail_open}


def primary_file(conf_dir: Path) -> Path | None:
    """The file a runtime would use if stockade's were not there."""
    found = (
        sorted(
            p
            for p in conf_dir.iterdir()
            if p.suffix in CONF_SUFFIXES and p.name != CHAINED_FILE and not p.name.startswith(".")
        )
        if conf_dir.is_dir()
        else []
    )
    return found[0] if found else None


def _as_list(raw: bytes, source: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ChainError(f"{source}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ChainError(f"{source}: must be a JSON object")
    if "plugins" not in data:  # a single-plugin .conf: a list of one
        if not isinstance(data.get("type"), str):
            raise ChainError(f"{source}: field 'type' must name a plugin")
        plugin = {k: v for k, v in data.items() if k not in ("name", "cniVersion")}
        data = {"cniVersion": data.get("cniVersion"), "name": data.get("name"), "plugins": [plugin]}
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise ChainError(f"{source}: field 'name' must be a network name")
    if not isinstance(data.get("cniVersion"), str):
        raise ChainError(f"{source}: field 'cniVersion' must be a version string")
    plugins = data.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ChainError(f"{source}: field 'plugins' must be a non-empty list")
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
            raise ChainError(f"{source}: field 'plugins[{i}].type' must name a plugin")
    return data


def chained(primary: Mapping[str, Any], settings: PluginSettings, source: str) -> dict[str, Any]:
    """The primary list with stockade-cni as its last plugin (any earlier copy dropped)."""
    out = dict(primary)
    plugins = [p for p in primary["plugins"] if p.get("type") != PLUGIN_TYPE]
    out["plugins"] = [*plugins, settings.conf()]
    out[SOURCE_KEY] = source
    return out


def _source_tag(path: Path, raw: bytes) -> str:
    return f"{path.name} sha256:{hashlib.sha256(raw).hexdigest()}"


def _write(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)


def sync(conf_dir: Path, settings: PluginSettings) -> str:
    """Bring `00-stockade.conflist` in line with the primary; what was done: "written",
    "unchanged", "removed" (no primary any more) or "none" (no primary, nothing to remove)."""
    ours = conf_dir / CHAINED_FILE
    primary = primary_file(conf_dir)
    if primary is None:
        if ours.exists():
            ours.unlink()
            return "removed"
        return "none"
    raw = primary.read_bytes()
    want = chained(_as_list(raw, str(primary)), settings, _source_tag(primary, raw))
    try:
        have = json.loads(ours.read_bytes())
    except (OSError, ValueError):
        have = None
    if have == want:
        return "unchanged"
    _write(ours, want)
    return "written"


def install(conf_dir: Path, settings: PluginSettings) -> Path:
    """Write the chained list; ChainError when there is no primary to chain into."""
    if sync(conf_dir, settings) == "none":
        raise ChainError(f"{conf_dir}: no CNI network configuration to chain stockade-cni into")
    return conf_dir / CHAINED_FILE


def uninstall(conf_dir: Path) -> bool:
    """Remove the chained list; False when it was not there."""
    try:
        (conf_dir / CHAINED_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def install_binary(source: Path, bin_dir: Path) -> Path:
    """Copy the stockade-cni binary into a CNI binary directory, atomically (a runtime never
    executes a half-written file)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / PLUGIN_TYPE
    tmp = bin_dir / f".{PLUGIN_TYPE}.tmp"
    shutil.copyfile(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def remove_binary(bin_dir: Path) -> None:
    (bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)
