"""The upstream ClusterNetworkPolicy CRD (sigs.k8s.io/network-policy-api at the pinned version,
from the Go module cache) on a real kube-apiserver: it installs and becomes Established, it
serves `policy.networking.k8s.io/v1alpha2`, every ClusterNetworkPolicy of the upstream conformance
case file (symbolic addresses made concrete) passes its validation unchanged, and objects that
upstream's CEL rules forbid are rejected with upstream's message.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.upstream import (
    CHANNEL,
    CRD_NAMES,
    NETWORK_POLICY_API_VERSION,
    SERVED_VERSION,
    UpstreamCrdError,
    install_upstream_crds,
    module_dir,
    upstream_crd_manifests,
)
from tests.fixtures.controlplane import wait_for_crd
from tests.unit.test_translate import UPSTREAM

GROUP = "policy.networking.k8s.io"
PLURAL = "clusternetworkpolicies"


@pytest.fixture(scope="module")
def upstream_crds(control_plane: ControlPlane) -> Iterator[tuple[str, ...]]:
    with control_plane.api_client() as client:
        yield install_upstream_crds(client)


def create(api_client: Any, obj: dict[str, Any], *, dry_run: bool = True) -> dict[str, Any]:
    """Create `obj` through v1alpha2 as `kubectl apply` would (strict field validation)."""
    objects: Any = kubernetes.client.CustomObjectsApi(api_client)
    extra = {"dry_run": "All"} if dry_run else {}
    result = objects.create_cluster_custom_object(
        GROUP, SERVED_VERSION, PLURAL, obj, field_validation="Strict", **extra
    )
    assert isinstance(result, dict)
    return result


def test_the_pinned_upstream_crd_installs_and_is_established(
    upstream_crds: tuple[str, ...], api_client: Any
) -> None:
    assert upstream_crds == CRD_NAMES
    ext: Any = kubernetes.client.ApiextensionsV1Api(api_client)
    for name in upstream_crds:
        wait_for_crd(api_client, name)
        crd = ext.read_custom_resource_definition(name)
        annotations = crd.metadata.annotations
        assert annotations[f"{GROUP}/bundle-version"] == NETWORK_POLICY_API_VERSION
        assert annotations[f"{GROUP}/channel"] == CHANNEL
        assert crd.spec.scope == "Cluster"
        assert SERVED_VERSION in [v.name for v in crd.spec.versions if v.served]


@pytest.mark.parametrize(("label", "obj"), UPSTREAM, ids=[label for label, _ in UPSTREAM])
def test_every_case_file_policy_passes_upstream_validation_unchanged(
    upstream_crds: tuple[str, ...], api_client: Any, label: str, obj: dict[str, Any]
) -> None:
    stored = create(api_client, obj)
    assert stored["apiVersion"] == f"{GROUP}/{SERVED_VERSION}"
    assert stored["spec"] == obj["spec"]  # nothing pruned, nothing defaulted


def test_a_policy_created_through_v1alpha2_reads_back_unchanged(
    upstream_crds: tuple[str, ...], api_client: Any
) -> None:
    _, obj = UPSTREAM[0]
    obj = copy.deepcopy(obj)
    obj["metadata"] = {"name": "stockade-round-trip"}
    objects: Any = kubernetes.client.CustomObjectsApi(api_client)
    create(api_client, obj, dry_run=False)
    try:
        read = objects.get_cluster_custom_object(
            GROUP, SERVED_VERSION, PLURAL, obj["metadata"]["name"]
        )
        assert read["apiVersion"] == f"{GROUP}/{SERVED_VERSION}"
        assert read["spec"] == obj["spec"]
    finally:
        objects.delete_cluster_custom_object(GROUP, SERVED_VERSION, PLURAL, obj["metadata"]["name"])


def _policy(name: str, egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{SERVED_VERSION}",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "Admin",
            "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "egress": egress,
        },
    }


def _ports(start: int, end: int) -> dict[str, Any]:
    return {
        "action": "Accept",
        "to": [{"namespaces": {}}],
        "protocols": [{"tcp": {"destinationPort": {"range": {"start": start, "end": end}}}}],
    }


NAMED_PORT_PEERS = "networks/nodes/domainNames peer cannot be set with namedPorts"
REJECTED = [
    (
        "cidr-host-bits",
        _policy("cidr-host-bits", [{"action": "Deny", "to": [{"networks": ["10.1.2.3/8"]}]}]),
        "Invalid CIDR format provided",
    ),
    (
        "cidr-malformed",
        _policy("cidr-malformed", [{"action": "Deny", "to": [{"networks": ["10.0.0.300/24"]}]}]),
        "Invalid CIDR format provided",
    ),
    (
        "port-range-empty",
        _policy("port-range-empty", [_ports(80, 80)]),
        "Start port must be less than End port",
    ),
    (
        "port-range-reversed",
        _policy("port-range-reversed", [_ports(90, 80)]),
        "Start port must be less than End port",
    ),
    (
        "named-port-to-networks",
        _policy(
            "named-port-to-networks",
            [
                {
                    "action": "Accept",
                    "to": [{"networks": ["10.0.0.0/24"]}],
                    "protocols": [{"destinationNamedPort": "web"}],
                }
            ],
        ),
        NAMED_PORT_PEERS,
    ),
    (
        "named-port-to-nodes",
        _policy(
            "named-port-to-nodes",
            [
                {
                    "action": "Accept",
                    "to": [{"nodes": {}}],
                    "protocols": [{"destinationNamedPort": "web"}],
                }
            ],
        ),
        NAMED_PORT_PEERS,
    ),
]


@pytest.mark.parametrize(
    ("obj", "message"), [(o, m) for _, o, m in REJECTED], ids=[i for i, _, _ in REJECTED]
)
def test_upstream_cel_rules_reject_bad_policies(
    upstream_crds: tuple[str, ...], api_client: Any, obj: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as caught:
        create(api_client, obj)
    assert caught.value.status == 422
    assert message in str(caught.value.body)
    assert "spec.egress[0]" in str(caught.value.body)


def test_the_manifests_are_fresh_copies() -> None:
    first = upstream_crd_manifests()
    first[0]["metadata"]["name"] = "changed"
    assert [m["metadata"]["name"] for m in upstream_crd_manifests()] == list(CRD_NAMES)


def test_an_unreachable_module_proxy_is_reported_as_such(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GOPATH": str(tmp_path / "go"),
        "GOMODCACHE": str(tmp_path / "modcache"),
        "GOCACHE": str(tmp_path / "gocache"),
        "GOPROXY": "http://127.0.0.1:9",
        "GOSUMDB": "off",
    }
    with pytest.raises(
        UpstreamCrdError, match=r"Go module proxy http://127\.0\.0\.1:9 could not be reached"
    ):
        module_dir(NETWORK_POLICY_API_VERSION, env=env)
