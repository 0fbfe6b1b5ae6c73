"""The kind registry: every policy kind named once, and found again from an object's type."""

from __future__ import annotations

import pytest

from stockade.model import crd
from stockade.model.kinds import (
    POLICY_RESOURCES,
    RESOURCE_OF,
    PolicyResource,
    enforced,
    resource_for,
)
from stockade.model.policy import PolicyKind


def test_every_policy_kind_has_exactly_one_resource() -> None:
    assert sorted(r.kind for r in POLICY_RESOURCES) == sorted(PolicyKind)
    assert set(RESOURCE_OF) == set(PolicyKind)


@pytest.mark.parametrize("resource", POLICY_RESOURCES, ids=[r.kind.value for r in POLICY_RESOURCES])
def test_an_objects_api_version_and_kind_find_its_resource(resource: PolicyResource) -> None:
    assert resource is RESOURCE_OF[resource.kind]
    found = resource_for(resource.api_version, resource.name)
    assert found is resource


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [("v1", "Pod"), ("stockade.io/v1alpha1", "DatapathTable"), (None, "NetworkPolicy"), (1, 2)],
    ids=["pod", "datapath-table", "no-api-version", "not-strings"],
)
def test_anything_else_is_not_a_policy_resource(api_version: object, kind: object) -> None:
    assert resource_for(api_version, kind) is None


def test_the_stockade_kinds_live_where_their_crds_say() -> None:
    for crd_kind in crd.POLICY_KINDS:
        found = resource_for(crd.API_VERSION, crd_kind.kind)
        assert found is not None
        assert (found.plural, found.namespaced) == (crd_kind.plural, crd_kind.scope == "Namespaced")


def test_only_the_standard_network_policy_reports_through_events_alone() -> None:
    assert [r.kind for r in POLICY_RESOURCES if not r.has_status] == [PolicyKind.NETWORK_POLICY]


def test_the_upstream_cluster_network_policy_can_be_left_unwatched() -> None:
    assert len(enforced()) == len(POLICY_RESOURCES)
    assert [r.kind for r in POLICY_RESOURCES if r not in enforced(upstream_cnp=False)] == [
        PolicyKind.CLUSTER_NETWORK_POLICY
    ]
