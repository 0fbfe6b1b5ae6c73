"""The policy kinds stockade enforces, each named once: where it lives in the API, whether it
carries a status of ours, and the model of its objects.

Everything that watches, lists, creates or writes the status of a policy object iterates over
`POLICY_RESOURCES` (the operator's handlers, priming and status writes, the sandbox's policy
handle); the parser and admission find an object's kind with `resource_for`, and the CRD
definitions (`stockade.model.crd`) take the stockade kinds' names from here. The kind and group
of every kind are spelled once, in `PolicyKind`'s value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel

from stockade.model.crd_schema import VERSION
from stockade.model.crd_scnp import StockadeClusterNetworkPolicy
from stockade.model.crd_snp import StockadeNetworkPolicy
from stockade.model.policy import PolicyKind


@dataclass(frozen=True)
class PolicyResource:
    """One policy kind as the API serves it."""

    kind: PolicyKind
    version: str
    plural: str
    has_status: bool  # the standard NetworkPolicy reports through Events only
    # The pydantic model of a whole object, for the kinds whose schema stockade owns (its CRDs are
    # generated from it); None for the standard and upstream kinds, which their API servers check.
    model: type[BaseModel] | None = None

    @property
    def name(self) -> str:
        """The kind's name as objects spell it (`kind: NetworkPolicy`)."""
        return self.kind.value.split(".", 1)[0]

    @property
    def group(self) -> str:
        return self.kind.value.split(".", 1)[1]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def namespaced(self) -> bool:
        return not self.kind.cluster_scoped

    @property
    def upstream_crd(self) -> bool:
        """Served only when the upstream network-policy-api CRD is installed; the operator then
        enforces it unless told not to."""
        return self.kind is PolicyKind.CLUSTER_NETWORK_POLICY

    @property
    def custom(self) -> bool:
        """Served through a CustomResourceDefinition (stockade's or upstream's), not built in."""
        return self.model is not None or self.upstream_crd


POLICY_RESOURCES: tuple[PolicyResource, ...] = (
    PolicyResource(PolicyKind.NETWORK_POLICY, "v1", "networkpolicies", has_status=False),
    PolicyResource(
        PolicyKind.STOCKADE_NETWORK_POLICY,
        VERSION,
        "networkpolicies",
        has_status=True,
        model=StockadeNetworkPolicy,
    ),
    PolicyResource(
        PolicyKind.STOCKADE_CLUSTER_NETWORK_POLICY,
        VERSION,
        "clusternetworkpolicies",
        has_status=True,
        model=StockadeClusterNetworkPolicy,
    ),
    PolicyResource(
        PolicyKind.CLUSTER_NETWORK_POLICY, "v1alpha2", "clusternetworkpolicies", has_status=True
    ),
)

RESOURCE_OF: Mapping[PolicyKind, PolicyResource] = {r.kind: r for r in POLICY_RESOURCES}
_BY_TYPE: Mapping[tuple[str, str], PolicyResource] = {
    (r.api_version, r.name): r for r in POLICY_RESOURCES
}


def resource_for(api_version: object, kind: object) -> PolicyResource | None:
    """The resource for an object's (apiVersion, kind), or None when stockade does not enforce
    it."""
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    return _BY_TYPE.get((api_version, kind))


def enforced(*, upstream_cnp: bool = True) -> tuple[PolicyResource, ...]:
    """The resources the operator watches: every kind, less the upstream ClusterNetworkPolicy
    when it is turned off (the chart then grants no access to it either)."""
    return tuple(r for r in POLICY_RESOURCES if upstream_cnp or not r.upstream_crd)
