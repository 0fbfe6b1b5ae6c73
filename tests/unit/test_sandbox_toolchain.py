"""The toolchain's definitions and its cache logic: a tool counts as present only when every
binary is there and the stamp beside bin/ matches the tool's current definition, so a changed
definition (ldflags, binaries, packages) rebuilds it. Building is faked: no Go, no network."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.sandbox import toolchain
from stockade.sandbox.toolchain import (
    CNI_PLUGINS,
    CNI_PLUGINS_VERSION,
    HELM,
    HELM_VERSION,
    KUBERNETES,
    KUBERNETES_VERSION,
    TOOLS,
    GoTool,
    build,
    cni_bin_dir,
    ensure,
)

TOY = GoTool(
    name="toy",
    module="example.com/toy",
    version="v1.2.3",
    binaries=("toy-a", "toy-b"),
    go_mod=lambda: "module stockade.local/toolchain/toy\n\ngo 1.24\n",
    packages=("example.com/toy/cmd/toy-a", "example.com/toy/cmd/toy-b"),
    ldflags=("-X example.com/toy/version.v=v1.2.3",),
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STOCKADE_CACHE", str(tmp_path))
    return tmp_path / "toolchain"


def install(tool: GoTool, *, stamp: str | None) -> None:
    """Lay out `tool`'s cache directory as a build would, with the given stamp (None: none)."""
    tool.bin_dir.mkdir(parents=True, exist_ok=True)
    for b in tool.binaries:
        tool.path(b).write_text("#!/bin/sh\n")
        tool.path(b).chmod(0o755)
    if stamp is not None:
        tool.stamp_path.write_text(stamp + "\n")


@dataclasses.dataclass
class FakeGo:
    """Records the go commands a build runs; `go build` writes one file per binary into -o."""

    calls: list[list[str]] = dataclasses.field(default_factory=list)

    def __call__(self, cmd: list[str], cwd: Path, what: str) -> str:
        self.calls.append(cmd)
        if cmd[:2] == ["go", "build"]:
            out = Path(cmd[cmd.index("-o") + 1])
            for pkg in cmd[cmd.index("-o") + 2 :]:
                binary = out / pkg.rsplit("/", 1)[-1]
                binary.write_text("built\n")
                binary.chmod(0o755)
        return ""


@pytest.fixture
def fake_go(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGo]:
    fake = FakeGo()
    monkeypatch.setattr(toolchain, "_run", fake)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    yield fake


def test_a_tool_with_its_binaries_and_a_matching_stamp_is_present(cache: Path) -> None:
    install(TOY, stamp=TOY.digest)
    assert TOY.stamp_path == cache / "toy-v1.2.3" / "stamp"
    assert TOY.present()


def test_a_tool_without_a_stamp_is_not_present(cache: Path) -> None:
    install(TOY, stamp=None)  # what a build from before stamps existed left behind
    assert not TOY.present()


def test_a_tool_built_with_other_ldflags_is_not_present(cache: Path) -> None:
    install(TOY, stamp=TOY.digest)
    changed = dataclasses.replace(TOY, ldflags=(*TOY.ldflags, "-X example.com/toy/version.c=x"))
    assert changed.bin_dir == TOY.bin_dir  # same cache key ...
    assert not changed.present()  # ... but a different build


def test_a_tool_that_gained_a_binary_is_not_present(cache: Path) -> None:
    install(TOY, stamp=TOY.digest)
    grown = dataclasses.replace(
        TOY, binaries=(*TOY.binaries, "toy-c"), packages=(*TOY.packages, "example.com/toy/c")
    )
    assert not grown.present()


def test_a_tool_missing_a_binary_is_not_present_even_with_its_stamp(cache: Path) -> None:
    install(TOY, stamp=TOY.digest)
    TOY.path("toy-b").unlink()
    assert not TOY.present()


def test_a_non_executable_binary_is_not_present(cache: Path) -> None:
    install(TOY, stamp=TOY.digest)
    TOY.path("toy-a").chmod(0o644)
    assert not TOY.present()


def test_the_digest_depends_on_each_part_of_the_definition() -> None:
    changes: dict[str, Any] = {
        "version": "v1.2.4",
        "module": "example.com/other",
        "binaries": ("toy-a",),
        "packages": ("example.com/toy/cmd/toy-a",),
        "ldflags": (),
        "extra_files": {"main.go": "package main\n"},
    }
    digests = {TOY.digest} | {dataclasses.replace(TOY, **{k: v}).digest for k, v in changes.items()}
    assert len(digests) == 1 + len(changes)
    assert dataclasses.replace(TOY).digest == TOY.digest  # stable for an equal definition


def test_a_build_writes_the_binaries_and_the_stamp(cache: Path, fake_go: FakeGo) -> None:
    build(TOY)
    assert TOY.present()
    assert TOY.stamp_path.read_text().strip() == TOY.digest
    assert not list(cache.glob(".*partial"))
    (go_build,) = [c for c in fake_go.calls if c[:2] == ["go", "build"]]
    ldflags = go_build[go_build.index("-ldflags") + 1]
    assert ldflags == "-s -w -X example.com/toy/version.v=v1.2.3"
    assert go_build[-2:] == list(TOY.packages)  # one go build for every binary


def test_ensure_rebuilds_a_stale_tool_and_keeps_a_current_one(cache: Path, fake_go: FakeGo) -> None:
    other = dataclasses.replace(TOY, name="other", binaries=("other",), packages=("x/other",))
    install(TOY, stamp="0" * 64)  # built from an older definition
    install(other, stamp=other.digest)
    ensure((TOY, other))
    builds = [c for c in fake_go.calls if c[:2] == ["go", "build"]]
    assert [c[-2:] for c in builds] == [list(TOY.packages)]
    assert TOY.present() and other.present()
    assert TOY.path("toy-a").read_text() == "built\n"


def test_a_failed_build_keeps_the_previous_tool(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(TOY, stamp="old")

    def failing(cmd: list[str], cwd: Path, what: str) -> str:
        if cmd[:2] == ["go", "build"]:
            raise toolchain.ToolchainError(f"{what} failed")
        return ""

    monkeypatch.setattr(toolchain, "_run", failing)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(toolchain.ToolchainError, match="toy: compiling"):
        build(TOY)
    assert TOY.stamp_path.read_text().strip() == "old"
    assert stat.S_IMODE(TOY.path("toy-a").stat().st_mode) & os.X_OK


def test_the_kubernetes_tool_builds_all_five_binaries_from_their_cmd_packages() -> None:
    names = (
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
        "kubectl",
    )
    assert sorted(KUBERNETES.binaries) == sorted(names)
    assert sorted(KUBERNETES.packages) == sorted(f"k8s.io/kubernetes/cmd/{n}" for n in names)
    assert KUBERNETES.bin_dir.parent.name == f"kubernetes-{KUBERNETES_VERSION}"
    assert f"-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}" in (
        KUBERNETES.ldflags
    )


def test_the_cni_tool_builds_the_four_reference_plugins_with_their_version_stamp() -> None:
    assert CNI_PLUGINS in TOOLS
    assert CNI_PLUGINS.module == "github.com/containernetworking/plugins"
    assert CNI_PLUGINS.version == CNI_PLUGINS_VERSION
    base = "github.com/containernetworking/plugins/plugins"
    assert dict(zip(CNI_PLUGINS.binaries, CNI_PLUGINS.packages, strict=True)) == {
        "ptp": f"{base}/main/ptp",
        "bridge": f"{base}/main/bridge",
        "host-local": f"{base}/ipam/host-local",
        "loopback": f"{base}/main/loopback",
    }
    assert CNI_PLUGINS.ldflags == (
        "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion="
        f"{CNI_PLUGINS_VERSION}",
    )
    assert f"require github.com/containernetworking/plugins {CNI_PLUGINS_VERSION}" in (
        CNI_PLUGINS.go_mod()
    )
    assert cni_bin_dir() == CNI_PLUGINS.bin_dir
    assert cni_bin_dir().parent.name == f"cni-plugins-{CNI_PLUGINS_VERSION}"


def test_helm_is_built_with_its_release_makefile_ldflags() -> None:
    flags = dict(f.removeprefix("-X ").split("=", 1) for f in HELM.ldflags)
    assert flags["helm.sh/helm/v3/internal/version.version"] == HELM_VERSION
    assert flags["helm.sh/helm/v3/internal/version.gitTreeState"] == "clean"
    assert len(flags["helm.sh/helm/v3/internal/version.gitCommit"]) == 40
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        assert flags[f"{pkg}.k8sVersionMajor"] == "1"
        assert int(flags[f"{pkg}.k8sVersionMinor"]) >= 30  # the chart's kubeVersion floor


def test_main_prints_every_binary_path_once_all_are_present(
    cache: Path, capsys: pytest.CaptureFixture[str], fake_go: FakeGo
) -> None:
    for tool in TOOLS:
        install(tool, stamp=tool.digest)
    assert toolchain.main() == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(t.path(b)) for t in TOOLS for b in t.binaries]
    assert str(cni_bin_dir() / "ptp") in printed
    assert fake_go.calls == []  # nothing rebuilt


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


def test_stockade_cni_is_built_from_the_repository_module_and_keyed_on_its_sources() -> None:
    assert toolchain.STOCKADE_CNI in TOOLS
    files = toolchain._cni_sources()
    assert sorted(files) == ["go.mod", "go.sum", "main.go"]
    assert "module github.com/stockade/stockade-cni" in files["go.mod"]
    assert "github.com/containernetworking/cni" in files["go.mod"]
    assert toolchain.STOCKADE_CNI.binaries == ("stockade-cni",)
    assert toolchain.STOCKADE_CNI.version == toolchain._sources_version(files)
    edited = {**files, "main.go": files["main.go"] + "\n// an edit\n"}
    assert toolchain._sources_version(edited) != toolchain.STOCKADE_CNI.version
