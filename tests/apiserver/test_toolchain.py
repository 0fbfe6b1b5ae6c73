"""The built toolchain runs and says what it is: every Kubernetes binary reports the pinned version,
and the CNI plugins answer the CNI VERSION command.

Builds any tool that is missing (the first run takes long); never starts a cluster."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from stockade.sandbox.toolchain import (
    CNI_PLUGINS,
    CNI_PLUGINS_VERSION,
    KUBERNETES,
    KUBERNETES_VERSION,
    ensure,
)


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize(
    "binary", ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"]
)
def test_each_kubernetes_binary_reports_the_pinned_version(binary: str) -> None:
    ensure((KUBERNETES,))
    assert run([str(KUBERNETES.path(binary)), "--version"]).strip() == (
        f"Kubernetes {KUBERNETES_VERSION}"
    )


def test_kubectl_reports_the_pinned_client_version() -> None:
    ensure((KUBERNETES,))
    out = json.loads(run([str(KUBERNETES.path("kubectl")), "version", "--client", "-o", "json"]))
    assert out["clientVersion"]["gitVersion"] == KUBERNETES_VERSION


@pytest.mark.parametrize("plugin", CNI_PLUGINS.binaries)
def test_each_cni_plugin_answers_the_version_command(plugin: str) -> None:
    ensure((CNI_PLUGINS,))
    env = {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "")}
    answer = json.loads(run([str(CNI_PLUGINS.path(plugin))], env=env))
    assert "1.0.0" in answer["supportedVersions"]
    assert "0.4.0" in answer["supportedVersions"]


def test_a_cni_plugin_reports_the_pinned_plugins_version() -> None:
    ensure((CNI_PLUGINS,))
    # With no CNI_COMMAND a plugin prints its "about" line, which carries the stamped version.
    proc = subprocess.run(
        [str(CNI_PLUGINS.path("ptp"))],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "")},
        timeout=60,
    )
    assert f"CNI ptp plugin {CNI_PLUGINS_VERSION}" in proc.stdout + proc.stderr
