"""crds/ is the single source of truth: the chart carries an identical copy, and a plain
`kubectl apply -f crds/` (the install path without Helm) works against a real API server."""

from __future__ import annotations

import subprocess

import yaml

from stockade.sandbox.controlplane.server import ControlPlane
from tests.chart.chart import CHART
from tests.fixtures.controlplane import wait_for_crd
from tests.paths import ROOT

CRDS = ROOT / "crds"


def test_the_chart_carries_exactly_the_crds_of_crds_dir() -> None:
    source = {p.name: p.read_text() for p in CRDS.glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert source, "crds/ is empty"
    assert sorted(chart) == sorted(source), "run hack/chart-crds.sh (make chart-crds)"
    drifted = [name for name in source if chart[name] != source[name]]
    assert not drifted, f"{drifted} differ from crds/: run hack/chart-crds.sh (make chart-crds)"


def test_the_copy_script_reports_no_drift() -> None:
    proc = subprocess.run(
        [str(ROOT / "hack" / "chart-crds.sh"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_kubectl_apply_of_the_crds_directory_installs_every_crd(
    control_plane: ControlPlane, api_client: object
) -> None:
    out = control_plane.kubectl("apply", "-f", str(CRDS)).stdout
    names = [line.split()[0].split("/", 1)[1] for line in out.splitlines() if line.strip()]
    declared = [
        doc["metadata"]["name"]
        for path in CRDS.glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert sorted(names) == sorted(declared)
    for name in names:
        wait_for_crd(api_client, name)
    again = control_plane.kubectl("apply", "-f", str(CRDS)).stdout
    assert all(line.endswith("unchanged") for line in again.splitlines() if line.strip())
