"""The CRDs a sandbox serves: stockade's own (from the repository's `crds/`, the single source of
truth) and the pinned upstream ClusterNetworkPolicy CRD (`stockade.sandbox.upstream`).

Called by `stockade sandbox up` and by test fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stockade.sandbox.upstream import install_upstream_crds, upstream_crd_manifests

CRD_DIR = Path(__file__).resolve().parents[4] / "crds"


def stockade_crd_manifests() -> list[dict[str, Any]]:
    """Every CRD manifest in crds/ (one per file)."""
    files = sorted(CRD_DIR.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRD manifests in {CRD_DIR}")
    return [yaml.safe_load(f.read_text()) for f in files]


def install_crds(api_client: Any, *, upstream: bool = True) -> tuple[str, ...]:
    """Create or replace stockade's CRDs (and the upstream one) and wait until Established."""
    manifests = stockade_crd_manifests()
    if upstream:
        manifests += upstream_crd_manifests()
    return install_upstream_crds(api_client, manifests)
