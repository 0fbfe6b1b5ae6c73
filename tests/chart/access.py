"""The API accesses stockade's operator and agent need: the one declared list.

The chart's RBAC must grant exactly these (tests/chart/test_rbac.py checks it on a real API
server with SubjectAccessReview, and that removing any one rule of the chart breaks one of
them). The operator's and agent's own tests can import `OPERATOR` and `AGENT` to check that
every request their code makes is declared here: a call the list lacks fails in a cluster.

Each access is (verb, API group, resource, subresource, scope), optionally limited to one
object name, and optionally needed only when a values switch is on (`feature`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum


class Scope(StrEnum):
    CLUSTER = "cluster"  # a cluster-scoped resource
    ALL_NAMESPACES = "all-namespaces"  # a namespaced resource, in every namespace
    RELEASE_NAMESPACE = "release-namespace"  # a namespaced resource, only in the chart's own


@dataclass(frozen=True, order=True)
class Access:
    verb: str
    group: str
    resource: str
    subresource: str = ""
    scope: Scope = Scope.CLUSTER
    name: str = ""  # only this object (RBAC resourceNames)
    feature: str = ""  # a values path that must be true, e.g. "operator.leaderElection.enabled"

    def __str__(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        group = self.group or "core"
        named = f" {self.name!r}" if self.name else ""
        return f"{self.verb} {group} {what}{named} ({self.scope})"


def _many(
    verbs: Iterable[str],
    group: str,
    resources: Iterable[str],
    subresource: str = "",
    scope: Scope = Scope.CLUSTER,
    feature: str = "",
) -> list[Access]:
    return [
        Access(v, group, r, subresource, scope, feature=feature) for r in resources for v in verbs
    ]


UPSTREAM_CNP = "operator.upstreamClusterNetworkPolicy"
SERVICE_SPACE = "operator.serviceSpace"
LEADER_ELECTION = "operator.leaderElection.enabled"
DEFAULT_LEASE = "stockade-operator"
NS = Scope.ALL_NAMESPACES

OPERATOR: tuple[Access, ...] = tuple(
    [
        # watch every policy kind it enforces
        *_many(["list", "watch"], "stockade.io", ["networkpolicies"], scope=NS),
        *_many(["list", "watch"], "stockade.io", ["clusternetworkpolicies"]),
        *_many(["list", "watch"], "networking.k8s.io", ["networkpolicies"], scope=NS),
        *_many(
            ["list", "watch"],
            "policy.networking.k8s.io",
            ["clusternetworkpolicies"],
            feature=UPSTREAM_CNP,
        ),
        # conditions on stockade's policies
        Access("patch", "stockade.io", "networkpolicies", "status", NS),
        Access("patch", "stockade.io", "clusternetworkpolicies", "status"),
        Access(
            "patch",
            "policy.networking.k8s.io",
            "clusternetworkpolicies",
            "status",
            feature=UPSTREAM_CNP,
        ),
        # notice the upstream ClusterNetworkPolicy CRD
        *_many(
            ["get", "list", "watch"],
            "apiextensions.k8s.io",
            ["customresourcedefinitions"],
            feature=UPSTREAM_CNP,
        ),
        # the Service address space
        *_many(["list", "watch"], "", ["services"], scope=NS, feature=SERVICE_SPACE),
        *_many(["list", "watch"], "networking.k8s.io", ["servicecidrs"], feature=SERVICE_SPACE),
        *_many(
            ["list", "watch"],
            "discovery.k8s.io",
            ["endpointslices"],
            scope=NS,
            feature=SERVICE_SPACE,
        ),
        # what selectors select
        *_many(["list", "watch"], "", ["pods"], scope=NS),
        *_many(["list", "watch"], "", ["namespaces", "nodes"]),
        # the hand-off objects it publishes
        *_many(
            ["get", "list", "watch", "create", "update", "patch", "delete"],
            "stockade.io",
            ["datapathtables"],
        ),
        Access("create", "", "events", scope=NS),
        # leader election: one Lease in the release namespace
        Access(
            "create",
            "coordination.k8s.io",
            "leases",
            scope=Scope.RELEASE_NAMESPACE,
            feature=LEADER_ELECTION,
        ),
        *[
            Access(
                verb,
                "coordination.k8s.io",
                "leases",
                scope=Scope.RELEASE_NAMESPACE,
                name=DEFAULT_LEASE,
                feature=LEADER_ELECTION,
            )
            for verb in ("get", "update")
        ],
    ]
)

AGENT: tuple[Access, ...] = (
    *_many(["get", "list", "watch"], "stockade.io", ["datapathtables"]),
    Access("patch", "stockade.io", "datapathtables", "status"),
    # The pods of its node (field selector spec.nodeName), to name them in Events.
    Access("list", "", "pods", scope=NS),
    Access("create", "", "events", scope=NS),
)

BY_COMPONENT: Mapping[str, tuple[Access, ...]] = {"operator": OPERATOR, "agent": AGENT}

# Never granted to either component, whatever the values.
FORBIDDEN: tuple[Access, ...] = (
    *_many(["get", "list", "watch"], "", ["secrets", "configmaps"], scope=NS),
    Access("create", "", "pods", "exec", NS),
    Access("create", "", "serviceaccounts", "token", NS),
    Access("get", "", "nodes", "proxy"),
    Access("patch", "", "nodes"),
    Access("delete", "", "pods", scope=NS),
    Access("update", "stockade.io", "networkpolicies", scope=NS),
    Access("delete", "stockade.io", "clusternetworkpolicies"),
    Access("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    Access("escalate", "rbac.authorization.k8s.io", "clusterroles"),
    Access("create", "apiextensions.k8s.io", "customresourcedefinitions"),
)


def values_at(values: Mapping[str, object], path: str) -> object:
    """The value at dotted `path` of the (merged) chart values."""
    node: object = values
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"values have no {path!r}")
        node = node[part]
    return node


def feature_on(values: Mapping[str, object], path: str) -> bool:
    """The boolean at dotted `path` of the (merged) chart values."""
    node = values_at(values, path)
    if not isinstance(node, bool):
        raise TypeError(f"values {path!r} is not a boolean")
    return node


def required(component: str, values: Mapping[str, object]) -> tuple[Access, ...]:
    """What `component` needs with these values (nothing when it is disabled)."""
    block = values[component]
    if not (isinstance(block, Mapping) and block.get("enabled")):
        return ()
    lease = values_at(values, "operator.leaderElection.leaseName")
    return tuple(
        replace(a, name=str(lease)) if a.name == DEFAULT_LEASE else a
        for a in BY_COMPONENT[component]
        if not a.feature or feature_on(values, a.feature)
    )
