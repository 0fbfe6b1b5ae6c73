"""The world of one conformance case: namespaces, pods, nodes, labels and policies.

Every engine can keep its view of a case in a `World`: it applies the case's actions (label
changes, policy create/update/delete) the way the API server would, parses each policy with the
model's parser (so a bad object is rejected as `kubectl apply` would reject it), and turns
itself into a `stockade.model.cluster.ClusterState` for the engine's addresses. The reference
engine evaluates against it directly; the datapath engine lowers the same state and policies; the
e2e engine mirrors its actions into the API server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.conformance.casefile import (
    Action,
    AddNamespaceLabels,
    AddPodLabels,
    Case,
    CreatePolicy,
    DeleteAllPolicies,
    DeletePolicy,
    Serve,
    Topology,
    UpdatePolicy,
)
from stockade.conformance.engine import ActionRejectedError, Addresses
from stockade.model.admission import admit
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.errors import PolicyParseError
from stockade.model.kinds import resource_for
from stockade.model.policy import Policy, PolicyKind


@dataclass(frozen=True, order=True)
class PolicyKey:
    kind: PolicyKind
    namespace: str  # "" for cluster-scoped kinds
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


def policy_key(api_version: object, kind: object, namespace: object, name: object) -> PolicyKey:
    found = resource_for(api_version, kind)
    if found is None:
        raise ActionRejectedError(f"unsupported apiVersion/kind {api_version}/{kind}")
    ns = str(namespace or "") if found.namespaced else ""
    return PolicyKey(found.kind, ns, str(name or ""))


class World:
    """Mutable state of one case; `setup` of an engine creates it, `teardown` drops it."""

    def __init__(self, topology: Topology, case: Case) -> None:
        self.topology = topology
        self.case = case
        self.namespace_labels: dict[str, dict[str, str]] = {
            name: dict(labels) for name, labels in topology.namespaces.items()
        }
        self.pod_labels: dict[str, dict[str, str]] = {
            pod.key: dict(pod.labels) for pod in topology.pods
        }
        self.objects: dict[PolicyKey, Mapping[str, Any]] = {}
        self.policies: dict[PolicyKey, Policy] = {}
        self.placement: dict[str, str] = {}  # pod key -> node name, set by the engine

    def serves(self, pod: str) -> tuple[Serve, ...]:
        model = next(p for p in self.topology.pods if p.key == pod)
        return self.case.serves(model)

    def apply(self, action: Action) -> None:
        """Apply one action as the API server would; raises `ActionRejectedError` otherwise."""
        if isinstance(action, CreatePolicy | UpdatePolicy):
            self._put(action.obj, create=isinstance(action, CreatePolicy))
        elif isinstance(action, DeletePolicy):
            key = policy_key(action.api_version, action.kind, action.namespace, action.name)
            if key not in self.objects:
                raise ActionRejectedError(f"delete_policy: {key} does not exist")
            del self.objects[key], self.policies[key]
        elif isinstance(action, DeleteAllPolicies):
            for key in [k for k in self.objects if k.namespace in action.namespaces]:
                del self.objects[key], self.policies[key]
        elif isinstance(action, AddPodLabels):
            if action.pod not in self.pod_labels:
                raise ActionRejectedError(f"add_pod_labels: unknown pod {action.pod!r}")
            self.pod_labels[action.pod].update(action.labels)
        elif isinstance(action, AddNamespaceLabels):
            if action.namespace not in self.namespace_labels:
                raise ActionRejectedError(
                    f"add_namespace_labels: unknown namespace {action.namespace!r}"
                )
            self.namespace_labels[action.namespace].update(action.labels)
        else:  # pragma: no cover - exhaustive over Action
            raise ActionRejectedError(f"unknown action {action!r}")

    def _put(self, obj: Mapping[str, Any], *, create: bool) -> None:
        verb = "create_policy" if create else "update_policy"
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        key = policy_key(
            obj.get("apiVersion"), obj.get("kind"), meta.get("namespace"), meta.get("name")
        )
        if create and key in self.objects:
            raise ActionRejectedError(f"{verb}: {key} already exists")
        if not create and key not in self.objects:
            raise ActionRejectedError(f"{verb}: {key} does not exist")
        if key.namespace and key.namespace not in self.namespace_labels:
            raise ActionRejectedError(f"{verb}: namespace {key.namespace!r} does not exist")
        try:
            policy = admit(obj)
        except PolicyParseError as err:
            raise ActionRejectedError(
                f"{verb}: {key}: {err}", unsupported=err.only_unsupported
            ) from err
        self.objects[key] = obj
        self.policies[key] = policy

    def cluster_state(self, addresses: Addresses) -> ClusterState:
        """The model's view of this world with the engine's addresses."""
        namespaces = [Namespace(n, labels) for n, labels in self.namespace_labels.items()]
        pods: list[Pod] = []
        for model in self.topology.pods:
            named = {s.name: (s.port, s.protocol) for s in self.case.serves(model) if s.name}
            pods.append(
                Pod(
                    namespace=model.namespace,
                    name=model.name,
                    labels=self.pod_labels[model.key],
                    ips=addresses.pods.get(model.key, ()),
                    node=self.node_of(model.key),
                    named_ports=named,
                    host_network=model.host_network,
                )
            )
        labels = {n.name: n.labels for n in self.topology.nodes}
        nodes = [Node(name, ips, labels.get(name, {})) for name, ips in addresses.nodes.items()]
        return ClusterState(namespaces, pods, nodes)

    def node_of(self, pod: str) -> str | None:
        return self.placement.get(pod)


def default_placement(topology: Topology, nodes: list[str]) -> dict[str, str]:
    """Pods the model pins keep their node; the others go round-robin, in model order."""
    if not nodes:
        raise ValueError("an engine needs at least one node")
    placement: dict[str, str] = {}
    free = 0
    for pod in topology.pods:
        if pod.node is not None:
            placement[pod.key] = pod.node
        else:
            placement[pod.key] = nodes[free % len(nodes)]
            free += 1
    return placement
