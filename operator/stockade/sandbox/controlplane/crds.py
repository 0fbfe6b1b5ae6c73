"""The CRDs a sandbox serves: stockade's own (from the repository's `crds/`, the single source of
truth) and the pinned upstream ClusterNetworkPolicy CRD (`stockade.sandbox.upstream`).

Called by `stockade sandbox up` and by test fixtures. `up` also calls `warm_watch_caches` in the
background while it starts kube-proxy, the kubelets and the DNS.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

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


def warm_watch_caches(api_client: Any, manifests: list[dict[str, Any]] | None = None) -> None:
    """List every served version of every custom resource once. The API server builds a custom
    resource's watch cache on its first list and answers 429 until it is built, which costs the
    client a 1 s retry: the operator paid it on every sandbox start, on its first list of
    stockade's NetworkPolicies. A failed list is left for the real client to retry."""
    custom = kubernetes.client.CustomObjectsApi(api_client)
    if manifests is None:
        manifests = stockade_crd_manifests() + upstream_crd_manifests()
    for manifest in manifests:
        spec = manifest["spec"]
        for version in spec["versions"]:
            if version.get("served", True):
                # Any failure (a 429 past the client's retries, a dropped connection) is left
                # for the real clients, which retry.
                with contextlib.suppress(ApiException, HTTPError, OSError, ValueError):
                    custom.list_cluster_custom_object(
                        spec["group"], version["name"], spec["names"]["plural"], limit=1
                    )
