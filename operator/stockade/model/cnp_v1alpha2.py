"""The upstream `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, as stockade reads it.

The upstream CRD validates these objects; these models check what the internal representation
needs, with today's messages and strict types, and map a valid object to `Policy`. stockade's own
kind (`stockade.model.crd_scnp`) is upstream's spec plus ICMP matches and `spec.mode`, validated
by the stricter models its CRD is generated from. Semantics quoted from upstream
`apis/v1alpha2/clusternetworkpolicy_types.go`. Called by `stockade.model.parse.parse_policy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

from stockade.model import policy as internal
from stockade.model.crd_common import PortNumber, Priority, WireModel, field_error, unsupported
from stockade.model.crd_scnp import (
    cluster_policy,
    in_namespaces,
    namespaced_pods,
    transport_port,
)
from stockade.model.netpol_v1 import Cidr, Metadata, Selector, port_name, string

MAX_RULES = 25
MAX_PEERS = 25
_ACTIONS = {
    "Accept": internal.RuleAction.ALLOW,
    "Deny": internal.RuleAction.DENY,
    "Pass": internal.RuleAction.PASS,
}


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    """Raise unless exactly one of `names` (wire names) is set."""
    fields = type(model).model_fields
    by_alias = {(info.alias or name): name for name, info in fields.items()}
    present = [n for n in names if getattr(model, by_alias.get(n, n), None) is not None]
    if len(present) != 1:
        raise ValueError(f"exactly one of {', '.join(names)} must be set, got {len(present)}")


class NamespacedPod(WireModel):
    # "NamespaceSelector ... if empty, it selects all Namespaces" (optional, not a pointer).
    namespace_selector: Selector | None = None
    pod_selector: Selector

    def to_pods(self) -> internal.PodSet:
        return namespaced_pods(self.pod_selector, self.namespace_selector)


class Subject(WireModel):
    # "Exactly one field must be set. Note that host-networked pods are not included."
    namespaces: Selector | None = None
    pods: NamespacedPod | None = None

    @model_validator(mode="after")
    def _one(self) -> Subject:
        _exactly_one(self, ("namespaces", "pods"))
        return self

    def to_pods(self) -> internal.PodSet:
        if self.pods is not None:
            return self.pods.to_pods()
        assert self.namespaces is not None
        return in_namespaces(self.namespaces)


class PortRange(WireModel):
    start: PortNumber
    end: PortNumber

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        # The upstream CRD also insists on start < end; a range of one port is harmless here.
        if self.start > self.end:
            raise field_error("end", f"must be at least start ({self.start}), got {self.end}")
        return self


class Port(WireModel):
    number: PortNumber | None = None
    range: PortRange | None = None

    @model_validator(mode="after")
    def _one(self) -> Port:
        _exactly_one(self, ("number", "range"))
        return self


class ProtocolPort(WireModel):
    destination_port: Port


NamedPort = Annotated[str, PlainValidator(lambda v: port_name(string(v)))]
_PROTOCOLS = ("tcp", "udp", "sctp", "destinationNamedPort")


class Protocol(WireModel):
    tcp: ProtocolPort | None = None
    udp: ProtocolPort | None = None
    sctp: ProtocolPort | None = None
    destination_named_port: NamedPort | None = None

    @model_validator(mode="after")
    def _one(self) -> Protocol:
        _exactly_one(self, _PROTOCOLS)
        return self

    def to_port(self) -> internal.PortSpec:
        if self.destination_named_port is not None:
            # "selects a destination port on a pod based on the ContainerPort name": the named
            # container port's own protocol applies.
            return internal.NamedPort(self.destination_named_port, None)
        return transport_port(self.tcp, self.udp, self.sctp)


class IngressPeer(WireModel):
    namespaces: Selector | None = None
    pods: NamespacedPod | None = None

    @model_validator(mode="after")
    def _one(self) -> IngressPeer:
        _exactly_one(self, ("namespaces", "pods"))
        return self

    def to_peers(self) -> list[internal.Peer]:
        if self.pods is not None:
            return [internal.PodPeer(self.pods.to_pods())]
        assert self.namespaces is not None
        return [internal.PodPeer(in_namespaces(self.namespaces))]


_EGRESS_PEERS = ("namespaces", "pods", "nodes", "networks", "domainNames")


class EgressPeer(IngressPeer):
    nodes: Selector | None = None
    networks: list[Cidr] | None = None
    domain_names: list[object] | None = None

    @field_validator("networks")
    @classmethod
    def _bounded(cls, value: list[internal.IPNetwork] | None) -> list[internal.IPNetwork] | None:
        if value is not None and not 1 <= len(value) <= MAX_PEERS:
            raise ValueError(f"must have 1 to {MAX_PEERS} CIDRs")
        return value

    @model_validator(mode="after")
    def _one(self) -> EgressPeer:
        _exactly_one(self, _EGRESS_PEERS)
        if self.domain_names is not None:
            raise unsupported("domainNames", "domainNames peers are not supported by stockade")
        return self

    def to_peers(self) -> list[internal.Peer]:
        if self.networks is not None:
            return [internal.CidrPeer(n) for n in self.networks]
        if self.nodes is not None:
            # "It selects the nodeIPs as the peer type by matching on the IPs present in the
            # node.Status.Addresses field of the node."
            return [internal.NodePeer(self.nodes.to_selector())]
        return super().to_peers()


def _sized(value: Sequence[object] | None, what: str) -> None:
    if value is not None and not 1 <= len(value) <= MAX_PEERS:
        raise ValueError(what)


class _Rule(WireModel):
    name: str | None = Field(default=None)
    action: Literal["Accept", "Deny", "Pass"]
    protocols: list[Protocol] | None = None

    @field_validator("name")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        if value is not None and len(value) > 100:
            raise ValueError("must be at most 100 characters")
        return value

    @field_validator("protocols")
    @classmethod
    def _protocols(cls, value: list[Protocol] | None) -> list[Protocol] | None:
        _sized(value, f"must have 1 to {MAX_PEERS} entries when set")
        return value

    def _rule(self, ref: internal.RuleRef, peers: list[IngressPeer]) -> internal.Rule:
        return internal.Rule(
            ref=ref,
            action=_ACTIONS[self.action],
            peers=tuple(dict.fromkeys(p for peer in peers for p in peer.to_peers())),
            # "If unspecified, protocol-specific attributes will not be used to match traffic."
            ports=tuple(dict.fromkeys(p.to_port() for p in self.protocols or ()))
            or (internal.AnyPort(),),
            name=self.name or "",
        )


class IngressRule(_Rule):
    from_: list[IngressPeer] = Field(alias="from")

    @field_validator("from_")
    @classmethod
    def _peers(cls, value: list[IngressPeer]) -> list[IngressPeer]:
        _sized(value, f"must have 1 to {MAX_PEERS} peers")
        return value

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule:
        return self._rule(ref, self.from_)


class EgressRule(_Rule):
    to: list[EgressPeer]

    @field_validator("to")
    @classmethod
    def _peers(cls, value: list[EgressPeer]) -> list[EgressPeer]:
        _sized(value, f"must have 1 to {MAX_PEERS} peers")
        return value

    @model_validator(mode="after")
    def _named_ports_need_pods(self) -> EgressRule:
        named = any(p.destination_named_port is not None for p in self.protocols or ())
        if named and any(t.networks is not None or t.nodes is not None for t in self.to):
            raise field_error(
                "protocols",
                "destinationNamedPort cannot be used with networks or nodes peers (they have no "
                "named ports)",
            )
        return self

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule:
        return self._rule(ref, list(self.to))


def _at_most(value: list[object] | None) -> None:
    if value is not None and len(value) > MAX_RULES:
        raise ValueError(f"must have at most {MAX_RULES} rules, got {len(value)}")


class Spec(WireModel):
    tier: Literal["Admin", "Baseline"]
    priority: Priority
    subject: Subject
    ingress: list[IngressRule] | None = None
    egress: list[EgressRule] | None = None

    @field_validator("ingress", "egress")
    @classmethod
    def _bounded(cls, value: list[object] | None) -> list[object] | None:
        _at_most(value)
        return value


class ClusterNetworkPolicy(BaseModel):
    """A whole `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy object."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    metadata: Metadata
    spec: Spec

    def to_policy(self) -> internal.Policy:
        kind = internal.PolicyKind.CLUSTER_NETWORK_POLICY
        ref = internal.RuleRef(kind, "", self.metadata.name, internal.Direction.INGRESS, 0)
        rank = (internal.Tier(self.spec.tier), self.spec.priority, internal.Mode.ENFORCE)
        spec = self.spec
        return cluster_policy(ref, rank, spec.subject.to_pods(), spec.ingress, spec.egress)
