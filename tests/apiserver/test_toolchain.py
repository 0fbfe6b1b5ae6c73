"""The built toolchain runs and says what it is: every Kubernetes binary reports the pinned version,
the CNI plugins answer the CNI VERSION command, and helm is a release-like build (its version, and
a default Kubernetes version new enough for the chart, so `helm template` needs no --kube-version).

Builds any tool that is missing (the first run takes long); never starts a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from stockade.sandbox.toolchain import (
    CNI_PLUGINS,
    CNI_PLUGINS_VERSION,
    HELM,
    HELM_K8S_MAJOR,
    HELM_K8S_MINOR,
    HELM_VERSION,
    KUBERNETES,
    KUBERNETES_VERSION,
    ensure,
)
from tests.paths import ROOT

CHART = ROOT / "charts" / "stockade"


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


def test_helm_reports_its_release_version_and_a_clean_tree() -> None:
    ensure((HELM,))
    out = run([str(HELM.path("helm")), "version", "--template", "{{.Version}} {{.GitTreeState}}"])
    assert out.split() == [HELM_VERSION, "clean"]


def test_helm_defaults_to_the_kubernetes_version_of_its_client_go() -> None:
    ensure((HELM,))
    # helm's Makefile derives the default from k8s.io/client-go in helm's go.mod (v0.N.x -> 1.N).
    info = json.loads(run(["go", "mod", "download", "-json", f"helm.sh/helm/v3@{HELM_VERSION}"]))
    requires = Path(info["GoMod"]).read_text().split()
    client_go = requires[requires.index("k8s.io/client-go") + 1]
    assert client_go.split(".")[:2] == ["v0", HELM_K8S_MINOR]
    assert HELM_K8S_MAJOR == "1"
    with tempfile.TemporaryDirectory(prefix="stockade-helm-") as tmp:
        chart = Path(tmp) / "capabilities"
        (chart / "templates").mkdir(parents=True)
        (chart / "Chart.yaml").write_text("apiVersion: v2\nname: capabilities\nversion: 0.1.0\n")
        (chart / "templates" / "kube.yaml").write_text(
            "# {{ .Capabilities.KubeVersion.Version }}\n"
        )
        out = run([str(HELM.path("helm")), "template", str(chart)])
    assert f"# v1.{HELM_K8S_MINOR}.0" in out


def test_helm_renders_the_chart_without_a_kube_version_flag() -> None:
    ensure((HELM,))
    out = run([str(HELM.path("helm")), "template", "stockade", str(CHART)])
    assert "kind: DaemonSet" in out
