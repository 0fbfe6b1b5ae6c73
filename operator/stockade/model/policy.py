"""The one internal representation of every policy kind stockade enforces.

Four API kinds parse into these frozen dataclasses (`stockade.model.parse.parse_policy`):
networking.k8s.io/v1 NetworkPolicy, stockade.io/v1alpha1 NetworkPolicy and ClusterNetworkPolicy,
and policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy. The reference evaluator
(`stockade.model.evaluator`) gives them meaning; the compiler lowers the same values to BPF maps.
Nothing downstream ever looks at a raw API object again.

Normal forms, so that consumers have one case to handle:
- "every peer" and "every port" are explicit values (`AnyPeer`, `AnyPort`), never an empty list;
- CNP `Accept` and NetworkPolicy `Allow` are both `RuleAction.ALLOW`;
- a NetworkPolicy peer without `namespaceSelector` names its policy's namespace in `PodSet`;
- rules of a direction that `policyTypes` leaves out are dropped at parse time (they have no
  effect, as the standard says).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from stockade.model.selectors import EVERYTHING, LabelSelector

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyKind(StrEnum):
    """An API kind with its group (`kubectl` resource.group spelling), stable in rule ids."""

    NETWORK_POLICY = "NetworkPolicy.networking.k8s.io"
    STOCKADE_NETWORK_POLICY = "NetworkPolicy.stockade.io"
    STOCKADE_CLUSTER_NETWORK_POLICY = "ClusterNetworkPolicy.stockade.io"
    CLUSTER_NETWORK_POLICY = "ClusterNetworkPolicy.policy.networking.k8s.io"

    @property
    def cluster_scoped(self) -> bool:
        return self in (
            PolicyKind.STOCKADE_CLUSTER_NETWORK_POLICY,
            PolicyKind.CLUSTER_NETWORK_POLICY,
        )


class Direction(StrEnum):
    """From the selected (subject) pod's point of view."""

    INGRESS = "Ingress"
    EGRESS = "Egress"


class Tier(StrEnum):
    """DESIGN.md §2's evaluation order, first to last."""

    ADMIN = "Admin"
    NAMESPACE = "Namespace"  # standard and stockade NetworkPolicies
    BASELINE = "Baseline"


class RuleAction(StrEnum):
    ALLOW = "Allow"  # NetworkPolicy Allow, ClusterNetworkPolicy Accept
    DENY = "Deny"
    PASS = "Pass"  # ClusterNetworkPolicy only: skip the rest of this tier


class Mode(StrEnum):
    ENFORCE = "Enforce"
    AUDIT = "Audit"  # decide, report, never drop


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"
    ICMP = "ICMP"
    ICMPV6 = "ICMPv6"

    @property
    def number(self) -> int:
        """The IANA protocol number that the datapath matches on."""
        return _PROTOCOL_NUMBERS[self]

    @property
    def has_ports(self) -> bool:
        return self in (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


_PROTOCOL_NUMBERS = {
    Protocol.TCP: 6,
    Protocol.UDP: 17,
    Protocol.SCTP: 132,
    Protocol.ICMP: 1,
    Protocol.ICMPV6: 58,
}

ISOLATION_INDEX = -1


@dataclass(frozen=True, order=True)
class RuleRef:
    """The stable identity of a rule, reported by counters, drop events and `explain`.

    `index` is the rule's position in the policy's `ingress` or `egress` list as written; the
    isolation default of a NetworkPolicy (a selected pod with no matching rule) is
    `index == ISOLATION_INDEX`. `namespace` is "" for cluster-scoped kinds.
    """

    kind: PolicyKind
    namespace: str
    name: str
    direction: Direction
    index: int

    @property
    def is_isolation(self) -> bool:
        return self.index == ISOLATION_INDEX

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        what = "isolation" if self.is_isolation else f"rule #{self.index}"
        return f"{self.kind} {where} {self.direction.value.lower()} {what}"


@dataclass(frozen=True)
class PodSet:
    """Pods chosen by namespace and pod labels (host-network pods are never members).

    Exactly one of `namespace` (a fixed namespace: the policy's own) and `namespace_selector`
    is set; both must match, and `pod_selector` must match the pod's labels.
    """

    pod_selector: LabelSelector = EVERYTHING
    namespace_selector: LabelSelector | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        if (self.namespace is None) == (self.namespace_selector is None):
            raise ValueError("PodSet needs exactly one of namespace and namespace_selector")

    def contains(
        self, pod_namespace: str, pod_labels: Mapping[str, str], ns_labels: Mapping[str, str]
    ) -> bool:
        if self.namespace is not None and pod_namespace != self.namespace:
            return False
        if self.namespace_selector is not None and not self.namespace_selector.matches(ns_labels):
            return False
        return self.pod_selector.matches(pod_labels)


@dataclass(frozen=True)
class AnyPeer:
    """Every address: a NetworkPolicy rule without `from`/`to` (or with an empty list)."""


@dataclass(frozen=True)
class PodPeer:
    pods: PodSet


@dataclass(frozen=True)
class CidrPeer:
    """An address block minus exceptions; matches pod, node and external addresses alike."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, address: IPAddress) -> bool:
        return (
            address.version == self.cidr.version
            and address in self.cidr
            and not any(address in e for e in self.excepts)
        )


@dataclass(frozen=True)
class NodePeer:
    """The addresses of the nodes whose labels match (ClusterNetworkPolicy `nodes`)."""

    selector: LabelSelector


Peer = AnyPeer | PodPeer | CidrPeer | NodePeer


@dataclass(frozen=True)
class AnyPort:
    """Every protocol and port: a rule without `ports`/`protocols`."""


@dataclass(frozen=True)
class PortRange:
    """`protocol` with destination port in [start, end]; `start is None` means every port."""

    protocol: Protocol
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class NamedPort:
    """A container port name, resolved on the destination pod; `protocol` None means any."""

    name: str
    protocol: Protocol | None = None


@dataclass(frozen=True)
class IcmpMatch:
    """ICMP (`Protocol.ICMP`) or ICMPv6 type, and code unless `code is None`."""

    protocol: Protocol
    type: int
    code: int | None = None


PortSpec = AnyPort | PortRange | NamedPort | IcmpMatch


@dataclass(frozen=True)
class Rule:
    ref: RuleRef
    action: RuleAction
    peers: tuple[Peer, ...]  # any one matching is enough
    ports: tuple[PortSpec, ...]  # any one matching is enough
    name: str = ""  # ClusterNetworkPolicy rule name (for people; identity is `ref`)


@dataclass(frozen=True)
class Policy:
    """One policy object in the internal representation.

    `subject` selects the pods it applies to. `directions` is the set of directions it affects
    (`policyTypes` for NetworkPolicies, the directions with rules for ClusterNetworkPolicies);
    in the namespace tier it is also the set of directions it isolates.
    """

    kind: PolicyKind
    namespace: str  # "" for cluster-scoped kinds
    name: str
    tier: Tier
    priority: int  # 0 for NetworkPolicies
    mode: Mode
    subject: PodSet
    directions: frozenset[Direction]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress

    def isolation_ref(self, direction: Direction) -> RuleRef:
        return RuleRef(self.kind, self.namespace, self.name, direction, ISOLATION_INDEX)

    @property
    def sort_key(self) -> tuple[int, str, str, str]:
        """Precedence within a tier: ascending priority, then name, namespace and kind.

        ClusterNetworkPolicy leaves the order of equal priorities to the implementation;
        stockade breaks ties by name so that the choice is deterministic and explainable.
        """
        return (self.priority, self.name, self.namespace, self.kind.value)
