"""The CI workflow and kind-config.yaml cannot run here (no Docker); check what can be checked:
they parse, the workflow runs every test tier, and its steps name real make targets and files,
and the images it loads are the ones it installs the chart with."""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from tests.conftest import TIERS
from tests.paths import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yaml"
FILE_LIKE = re.compile(r"^(?:\./)?(?:[\w.-]+/)*[\w.-]+\.(?:ya?ml|sh|py|Dockerfile|tar)$")


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def run_lines() -> list[str]:
    lines: list[str] = []
    for job in workflow()["jobs"].values():
        for step in job["steps"]:
            text = step.get("run", "").replace("\\\n", " ")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())
    return lines


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", text, re.M))


def test_kind_config_parses_and_has_at_least_two_nodes_that_run_pods() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in config["nodes"]]
    assert roles.count("control-plane") == 1
    assert roles.count("worker") >= 2
    assert config["name"] == "stockade"


def test_the_workflow_runs_every_test_tier() -> None:
    jobs = workflow()["jobs"]
    assert set(jobs) == {"lint", "test", "images", "kind"}
    assert sorted(jobs["test"]["strategy"]["matrix"]["tier"]) == sorted(TIERS)
    assert "--privileged" in jobs["test"]["container"]["options"]
    on = workflow().get("on", workflow().get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in on


def test_every_make_target_in_the_workflow_exists() -> None:
    targets = make_targets()
    used = [
        word
        for line in run_lines()
        if line.startswith("make ")
        for word in shlex.split(line)[1:]
        if not word.startswith("-")
    ]
    assert used
    assert not sorted(set(used) - targets)


def test_every_file_the_workflow_names_exists() -> None:
    named = {
        word
        for line in run_lines()
        for word in shlex.split(line, comments=True)
        if FILE_LIKE.match(word) and not word.startswith(("images.tar", "kind-logs"))
    }
    for option in ("-f", "--config"):
        for line in run_lines():
            words = shlex.split(line)
            named.update(words[i + 1] for i, w in enumerate(words[:-1]) if w == option)
    assert {"kind-config.yaml", "images/operator.Dockerfile", "images/agent.Dockerfile"} <= named
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing


def test_the_chart_installed_on_kind_uses_the_images_the_workflow_built_and_loaded() -> None:
    lines = run_lines()
    built = {shlex.split(line)[-2] for line in lines if line.startswith("docker build")}
    loaded = next(line for line in lines if line.startswith("kind load docker-image"))
    assert built == {"stockade-operator:ci", "stockade-agent:ci"}
    assert built <= set(shlex.split(loaded))
    install = " ".join(lines[lines.index(next(x for x in lines if x.startswith("helm install"))) :])
    for component in ("operator", "agent"):
        assert f"{component}.image.repository=stockade-{component}" in install
        assert f"{component}.image.tag=ci" in install
        assert f"{component}.image.pullPolicy=Never" in install
    assert any("--engine cluster" in line for line in lines)
    assert (ROOT / "charts" / "stockade" / "Chart.yaml").exists()
