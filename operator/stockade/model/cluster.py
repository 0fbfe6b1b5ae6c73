"""Cluster state as policy sees it: namespaces, pods and nodes with their labels and addresses.

The operator builds a `ClusterState` from its watches, the conformance engines from a case file's
model; the evaluator and the compiler read it. Pure values, no I/O.

`ClusterState.holds` is the one answer to "is this pod in this pod set"; the evaluator
(`stockade.model.matching`) asks it for every flow, and the label index (`ClusterIndex`, built
once per state) asks it for each candidate, so that both agree by construction.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stockade.model.policy import IPAddress, PodSet, Protocol
from stockade.model.selectors import LabelSelector, SelectorOperator


def _frozen(labels: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(labels))


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def __reduce__(self) -> tuple[object, ...]:  # a mapping proxy does not pickle
        return (Namespace, (self.name, dict(self.labels)))


@dataclass(frozen=True)
class Pod:
    """A pod; `named_ports` maps a container port name to (port, protocol).

    A host-network pod's `ips` are its node's: it is never selected as a subject or a pod peer,
    and traffic to or from it is judged by address (CIDR and node peers) only.
    """

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[IPAddress, ...] = ()
    node: str | None = None
    named_ports: Mapping[str, tuple[int, Protocol]] = field(default_factory=dict)
    host_network: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "named_ports", MappingProxyType(dict(self.named_ports)))

    def __reduce__(self) -> tuple[object, ...]:  # the operator's lowering worker receives pods
        fields = (self.namespace, self.name, dict(self.labels), self.ips, self.node)
        return (Pod, (*fields, dict(self.named_ports), self.host_network))

    @functools.cached_property
    def key(self) -> str:
        """namespace/name; computed once (the lowering asks for it about 20 times per pod and
        pass: at 50,000 pods, building the string every time was a tenth of a pass)."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Node:
    name: str
    ips: tuple[IPAddress, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def __reduce__(self) -> tuple[object, ...]:
        return (Node, (self.name, self.ips, dict(self.labels)))


class ClusterState:
    """An immutable snapshot with the lookups policy needs (by name and by address)."""

    def __init__(
        self,
        namespaces: Iterable[Namespace] = (),
        pods: Iterable[Pod] = (),
        nodes: Iterable[Node] = (),
    ) -> None:
        self.namespaces: Mapping[str, Namespace] = MappingProxyType({n.name: n for n in namespaces})
        self.pods: tuple[Pod, ...] = tuple(pods)
        self.nodes: Mapping[str, Node] = MappingProxyType({n.name: n for n in nodes})
        by_ip: dict[IPAddress, Pod] = {}
        for pod in self.pods:
            if pod.host_network:
                continue
            for ip in pod.ips:
                if ip in by_ip:
                    raise ValueError(f"pods {by_ip[ip].key} and {pod.key} share address {ip}")
                by_ip[ip] = pod
        self._pod_by_ip: Mapping[IPAddress, Pod] = MappingProxyType(by_ip)
        self._node_by_ip: Mapping[IPAddress, Node] = MappingProxyType(
            {ip: node for node in self.nodes.values() for ip in node.ips}
        )

    @classmethod
    def indexed(
        cls,
        namespaces: Iterable[Namespace],
        pods: tuple[Pod, ...],
        nodes: Iterable[Node],
        pod_by_ip: dict[IPAddress, Pod],
    ) -> ClusterState:
        """A state whose address index the caller kept: `pod_by_ip` must be every
        non-host-network pod's addresses, each held by one pod (the operator's lowering mirror
        keeps it from change to change; the constructor checks and builds it in O(pods))."""
        state = cls.__new__(cls)
        state.namespaces = MappingProxyType({n.name: n for n in namespaces})
        state.pods = pods
        state.nodes = MappingProxyType({n.name: n for n in nodes})
        state._pod_by_ip = MappingProxyType(pod_by_ip)
        state._node_by_ip = MappingProxyType(
            {ip: node for node in state.nodes.values() for ip in node.ips}
        )
        return state

    @functools.cached_property
    def index(self) -> ClusterIndex:
        """Label indexes for selector look-ups, built on first use."""
        return ClusterIndex(self)

    def holds(self, pods: PodSet, pod: Pod) -> bool:
        """Whether `pod` is in `pods`: host-network pods never are ("host-networked pods are not
        included")."""
        return _holds(self.namespaces, pods, pod)

    def pod_at(self, address: IPAddress) -> Pod | None:
        """The (non-host-network) pod that owns `address`."""
        return self._pod_by_ip.get(address)

    def node_at(self, address: IPAddress) -> Node | None:
        return self._node_by_ip.get(address)

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self.namespaces.get(namespace)
        return ns.labels if ns is not None else {}

    def node_ips(self, node: str | None) -> tuple[IPAddress, ...]:
        found = self.nodes.get(node) if node is not None else None
        return found.ips if found is not None else ()


def _holds(namespaces: Mapping[str, Namespace], pods: PodSet, pod: Pod) -> bool:
    if pod.host_network:
        return False
    namespace = namespaces.get(pod.namespace)
    return pods.contains(pod.namespace, pod.labels, namespace.labels if namespace else {})


def _smallest_in(selector: LabelSelector) -> tuple[str, tuple[str, ...]] | None:
    ins = [r for r in selector.requirements if r.operator is SelectorOperator.IN]
    if not ins:
        return None
    best = min(ins, key=lambda r: len(r.values))
    return best.key, best.values


class ClusterIndex:
    """Which pods a `PodSet` holds, without a scan of all pods.

    Pods by namespace and by (namespace, label key, value); namespaces by (key, value). A
    selector's candidates come from the postings of its most selective `In` requirement (or, with
    none, every pod of the candidate namespaces); each candidate is then checked with
    `ClusterState.holds`. The pod-set membership the operator carries from pass to pass
    (`stockade.compiler.membership`, which also counts each policy's endpoints for its status)
    and the compiler's subject and peer sets (`stockade.compiler.lower`,
    `stockade.compiler.classes`) read it.
    """

    def __init__(self, state: ClusterState) -> None:
        # the namespaces, not the state: the state holds its index, and a cycle between them
        # would outlive the state until a full garbage collection (the lowering worker keeps
        # automatic collections off its long-lived objects; stockade.control.worker)
        self._namespaces_of = state.namespaces
        by_namespace: dict[str, list[Pod]] = defaultdict(list)
        by_label: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
        for pod in state.pods:
            if pod.host_network:
                continue  # never a member of a pod set
            by_namespace[pod.namespace].append(pod)
            for key, value in pod.labels.items():
                by_label[(pod.namespace, key, value)].append(pod)
        ns_by_label: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name, namespace in state.namespaces.items():
            for label in namespace.labels.items():
                ns_by_label[label].append(name)
        self._by_namespace = dict(by_namespace)
        self._by_label = dict(by_label)
        self._ns_by_label = dict(ns_by_label)

    def _namespaces(self, pods: PodSet) -> Iterable[str]:
        if pods.namespace is not None:
            return (pods.namespace,)
        assert pods.namespace_selector is not None
        found = _smallest_in(pods.namespace_selector)
        if found is None:
            return self._namespaces_of.keys()
        key, values = found
        return sorted({ns for v in values for ns in self._ns_by_label.get((key, v), ())})

    def _candidates(self, pods: PodSet, namespace: str) -> Iterable[Pod]:
        found = _smallest_in(pods.pod_selector)
        if found is None:
            return self._by_namespace.get(namespace, ())
        key, values = found
        return [p for v in values for p in self._by_label.get((namespace, key, v), ())]

    def pods_in(self, pods: PodSet) -> list[Pod]:
        """The pods of `pods` (host-network pods are never members), in no particular order."""
        return [
            pod
            for namespace in self._namespaces(pods)
            for pod in self._candidates(pods, namespace)
            if _holds(self._namespaces_of, pods, pod)
        ]


def ip(text: str) -> IPAddress:
    """Parse an address (a convenience for callers that hold strings)."""
    return ipaddress.ip_address(text)
