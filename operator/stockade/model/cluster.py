"""Cluster state as policy sees it: namespaces, pods and nodes with their labels and addresses.

The operator builds a `ClusterState` from its watches, the conformance engines from a case file's
model; the evaluator and the compiler read it. Pure values, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from stockade.model.policy import IPAddress, Protocol

if TYPE_CHECKING:
    from stockade.model.index import ClusterIndex


def _frozen(labels: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(labels))


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Node:
    name: str
    ips: tuple[IPAddress, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


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

    @functools.cached_property
    def index(self) -> ClusterIndex:
        """Label indexes for selector look-ups, built on first use."""
        from stockade.model.index import ClusterIndex  # the index module imports this one

        return ClusterIndex(self)

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


def ip(text: str) -> IPAddress:
    """Parse an address (a convenience for callers that hold strings)."""
    return ipaddress.ip_address(text)
