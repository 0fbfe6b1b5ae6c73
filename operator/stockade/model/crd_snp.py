"""The stockade NetworkPolicy kind (`stockade.io/v1alpha1`, short name `snp`): the standard
`networking.k8s.io/v1` NetworkPolicy spec plus a per-rule `action` (Allow or Deny), ICMP and
ICMPv6 matches in `ports`, and a per-policy `mode` (Enforce or Audit).

The models are the single source of truth for the CRD schema (`crd_schema` generates
`crds/stockade.io_networkpolicies.yaml` from them), validate the same rules in Python for the
operator, and map a valid object to the internal `Policy` (`StockadeNetworkPolicy.to_policy`,
called by `stockade.model.parse.parse_policy`): one validation, one path.
"""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from stockade.model import policy as internal
from stockade.model import selectors
from stockade.model.crd_common import (
    Cidr,
    IcmpMatch,
    IntOrPort,
    IPNetwork,
    LabelSelector,
    ObjectMeta,
    PolicyStatus,
    PortNumber,
    WireModel,
    cel,
    parse_cidr,
    validations,
)
from stockade.model.selectors import EVERYTHING

MAX_RULES = 64
MAX_PEERS = 64
MAX_PORTS = 64
MAX_EXCEPT = 16  # bounds the CEL cost of the strict-subset rule across rules x peers

Protocol = Literal["TCP", "UDP", "SCTP"]
Action = Literal["Allow", "Deny"]
Mode = Literal["Enforce", "Audit"]
PolicyType = Literal["Ingress", "Egress"]

EXCEPT_OUTSIDE = (
    "every except entry must lie strictly inside cidr (and be of the same address family)"
)
PEER_KINDS = "a peer sets either ipBlock, or podSelector and/or namespaceSelector"
END_PORT_NAMED = "endPort requires a numeric port"
END_PORT_BELOW = "endPort must not be below port"
ICMP_EXCLUSIVE = "icmp and icmpv6 cannot be combined with protocol, port or endPort"
ICMP_BOTH = "set icmp or icmpv6, not both: use two ports entries"


class IPBlock(WireModel):
    """A CIDR, minus the CIDRs listed in `except`."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!isCIDR(self.cidr) || !has(self.except)"
                " || self.except.all(e, !isCIDR(e) || (cidr(self.cidr).containsCIDR(e)"
                " && cidr(e).prefixLength() > cidr(self.cidr).prefixLength()))",
                EXCEPT_OUTSIDE,
                field_path=".except",
            )
        )
    )

    cidr: Cidr
    except_: list[Cidr] | None = Field(default=None, alias="except", max_length=MAX_EXCEPT)

    @field_validator("except_")
    @classmethod
    def _inside_cidr(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        outer = info.data.get("cidr")
        if value is None or outer is None:
            return value
        net = parse_cidr(outer)
        for i, text in enumerate(value):
            inner = parse_cidr(text)
            if (
                inner.version != net.version
                or not inner.subnet_of(net)  # type: ignore[arg-type]
                or inner.prefixlen <= net.prefixlen
            ):
                raise ValueError(f"{EXCEPT_OUTSIDE}: except[{i}] {text} is not inside {outer}")
        return value

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    @property
    def excepted(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(e) for e in self.except_ or ())

    def to_peer(self) -> internal.CidrPeer:
        excepts = sorted(
            set(self.excepted), key=lambda n: (n.version, n.network_address, n.prefixlen)
        )
        return internal.CidrPeer(self.network, tuple(excepts))


def netpol_port(protocol: str, port: int | str | None, end_port: int | None) -> internal.PortSpec:
    """A NetworkPolicy port (stockade's or the standard's, validated by its own model)."""
    proto = internal.Protocol(protocol)
    if port is None:
        return internal.PortRange(proto)
    if isinstance(port, str):
        return internal.NamedPort(port, proto)
    return internal.PortRange(proto, port, end_port if end_port is not None else port)


class ToSelector(typing.Protocol):
    def to_selector(self) -> selectors.LabelSelector: ...


class ToCidrPeer(typing.Protocol):
    def to_peer(self) -> internal.CidrPeer: ...


def netpol_peer(
    pod_selector: ToSelector | None,
    namespace_selector: ToSelector | None,
    ip_block: ToCidrPeer | None,
    namespace: str,
) -> internal.Peer:
    """A NetworkPolicy peer (stockade's or the standard's, validated by its own model)."""
    if ip_block is not None:
        return ip_block.to_peer()
    pods = pod_selector.to_selector() if pod_selector else EVERYTHING
    if namespace_selector is None:
        # "If namespaceSelector is not set, the podSelector selects pods in the policy's own
        # namespace."
        return internal.PodPeer(internal.PodSet(pod_selector=pods, namespace=namespace))
    # Both set: "selects particular Pods within particular Namespaces" (AND).
    namespaces = namespace_selector.to_selector()
    return internal.PodPeer(internal.PodSet(pod_selector=pods, namespace_selector=namespaces))


class NetworkPolicyPeer(WireModel):
    """A peer: pods selected by podSelector within namespaces selected by namespaceSelector
    (either may be omitted), or an ipBlock."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.ipBlock) ? !(has(self.podSelector) || has(self.namespaceSelector))"
                " : (has(self.podSelector) || has(self.namespaceSelector))",
                PEER_KINDS,
            )
        )
    )

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPolicyPeer:
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if selectors == (self.ip_block is not None):
            raise ValueError(PEER_KINDS)
        return self

    def to_peer(self, namespace: str) -> internal.Peer:
        return netpol_peer(self.pod_selector, self.namespace_selector, self.ip_block, namespace)


class NetworkPolicyPort(WireModel):
    """A protocol and port (or port range), or an ICMP / ICMPv6 type and code. An entry without
    protocol, port and ICMP match means TCP on every port, as in the standard."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.endPort) || (has(self.port) && type(self.port) == int)",
                END_PORT_NAMED,
                field_path=".endPort",
            ),
            cel(
                "!has(self.endPort) || !has(self.port) || type(self.port) != int"
                " || self.endPort >= int(self.port)",
                END_PORT_BELOW,
                field_path=".endPort",
            ),
            cel(
                "!has(self.icmp) || !(has(self.protocol) || has(self.port) || has(self.endPort))",
                ICMP_EXCLUSIVE,
                field_path=".icmp",
            ),
            cel(
                "!has(self.icmpv6) || !(has(self.protocol) || has(self.port) || has(self.endPort))",
                ICMP_EXCLUSIVE,
                field_path=".icmpv6",
            ),
            cel("!(has(self.icmp) && has(self.icmpv6))", ICMP_BOTH, field_path=".icmpv6"),
        )
    )

    protocol: Protocol | None = None
    port: IntOrPort | None = None
    end_port: PortNumber | None = None
    icmp: IcmpMatch | None = None
    icmpv6: IcmpMatch | None = None

    @field_validator("end_port")
    @classmethod
    def _end_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        port = info.data.get("port")
        if value is None:
            return value
        if not isinstance(port, int):
            raise ValueError(END_PORT_NAMED)
        if value < port:
            raise ValueError(f"{END_PORT_BELOW} ({port})")
        return value

    @field_validator("icmp", "icmpv6")
    @classmethod
    def _icmp_alone(cls, value: IcmpMatch | None, info: ValidationInfo) -> IcmpMatch | None:
        if value is None:
            return value
        if any(info.data.get(f) is not None for f in ("protocol", "port", "end_port")):
            raise ValueError(ICMP_EXCLUSIVE)
        if info.field_name == "icmpv6" and info.data.get("icmp") is not None:
            raise ValueError(ICMP_BOTH)
        return value

    @property
    def effective_protocol(self) -> Literal["TCP", "UDP", "SCTP", "ICMP", "ICMPv6"]:
        if self.icmp is not None:
            return "ICMP"
        if self.icmpv6 is not None:
            return "ICMPv6"
        return self.protocol or "TCP"

    def to_port(self) -> internal.PortSpec:
        if self.icmp is not None:
            return internal.IcmpMatch(internal.Protocol.ICMP, self.icmp.type, self.icmp.code)
        if self.icmpv6 is not None:
            return internal.IcmpMatch(internal.Protocol.ICMPV6, self.icmpv6.type, self.icmpv6.code)
        return netpol_port(self.protocol or "TCP", self.port, self.end_port)  # "defaults to TCP"


class RuleModel(typing.Protocol):
    """A rule of either NetworkPolicy kind (`stockade.model.netpol_v1` has the standard's)."""

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule: ...


def network_rule(
    ref: internal.RuleRef,
    action: internal.RuleAction,
    peers: Iterable[internal.Peer],
    ports: Iterable[internal.PortSpec],
) -> internal.Rule:
    """A NetworkPolicy rule. "If this field is empty or missing, this rule matches all
    sources/destinations" and "... matches all ports"."""
    return internal.Rule(
        ref=ref,
        action=action,
        peers=tuple(dict.fromkeys(peers)) or (internal.AnyPeer(),),
        ports=tuple(dict.fromkeys(ports)) or (internal.AnyPort(),),
    )


def network_policy(
    ref: internal.RuleRef,
    mode: internal.Mode,
    pod_selector: selectors.LabelSelector,
    directions: frozenset[internal.Direction],
    ingress: Sequence[RuleModel] | None,
    egress: Sequence[RuleModel] | None,
) -> internal.Policy:
    """A NetworkPolicy of either kind; `ref` names the kind, namespace and name."""
    rules: dict[internal.Direction, tuple[internal.Rule, ...]] = {}
    for direction, items in (
        (internal.Direction.INGRESS, ingress),
        (internal.Direction.EGRESS, egress),
    ):
        # policyTypes: rules of a direction the policy does not affect do nothing.
        rules[direction] = tuple(
            rule.to_rule(replace(ref, direction=direction, index=i))
            for i, rule in enumerate(items or ())
            if direction in directions
        )
    return internal.Policy(
        kind=ref.kind,
        namespace=ref.namespace,
        name=ref.name,
        tier=internal.Tier.NAMESPACE,
        priority=0,
        mode=mode,
        subject=internal.PodSet(pod_selector=pod_selector, namespace=ref.namespace),
        directions=directions,
        ingress=rules[internal.Direction.INGRESS],
        egress=rules[internal.Direction.EGRESS],
    )


def default_policy_types(
    policy_types: Sequence[PolicyType] | None, egress: Sequence[object] | None
) -> frozenset[internal.Direction]:
    """networking/v1 defaulting (SetDefaults_NetworkPolicySpec): Ingress always, Egress when there
    are egress rules, unless policyTypes says otherwise (`[]` is defaulted as if absent)."""
    if policy_types:
        return frozenset(internal.Direction(t) for t in policy_types)
    return frozenset(
        {internal.Direction.INGRESS, internal.Direction.EGRESS}
        if egress
        else {internal.Direction.INGRESS}
    )


class NetworkPolicyIngressRule(WireModel):
    """Traffic from any of `from` (every source if omitted) to any of `ports` (every port if
    omitted); `action` says whether it is allowed or denied."""

    action: Action = "Allow"
    from_: list[NetworkPolicyPeer] | None = Field(default=None, alias="from", max_length=MAX_PEERS)
    ports: list[NetworkPolicyPort] | None = Field(default=None, max_length=MAX_PORTS)

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule:
        peers = (p.to_peer(ref.namespace) for p in self.from_ or ())
        ports = (p.to_port() for p in self.ports or ())
        return network_rule(ref, internal.RuleAction(self.action), peers, ports)


class NetworkPolicyEgressRule(WireModel):
    """Traffic to any of `to` (every destination if omitted) on any of `ports` (every port if
    omitted); `action` says whether it is allowed or denied."""

    action: Action = "Allow"
    to: list[NetworkPolicyPeer] | None = Field(default=None, max_length=MAX_PEERS)
    ports: list[NetworkPolicyPort] | None = Field(default=None, max_length=MAX_PORTS)

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule:
        peers = (p.to_peer(ref.namespace) for p in self.to or ())
        ports = (p.to_port() for p in self.ports or ())
        return network_rule(ref, internal.RuleAction(self.action), peers, ports)


class NetworkPolicySpec(WireModel):
    """The standard NetworkPolicy spec, plus per-rule actions, ICMP matches and an audit mode.

    In Audit mode the policy reports what it would drop and drops nothing."""

    pod_selector: LabelSelector
    policy_types: list[PolicyType] | None = Field(
        default=None, max_length=2, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    ingress: list[NetworkPolicyIngressRule] | None = Field(default=None, max_length=MAX_RULES)
    egress: list[NetworkPolicyEgressRule] | None = Field(default=None, max_length=MAX_RULES)
    mode: Mode = "Enforce"

    @field_validator("policy_types")
    @classmethod
    def _no_duplicate_types(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("duplicate entries")
        return value

    def effective_policy_types(self) -> frozenset[PolicyType]:
        """The directions this policy isolates, with the standard's defaulting: Ingress always,
        Egress when there are egress rules, unless policyTypes says otherwise."""
        if self.policy_types is not None:
            return frozenset(self.policy_types)
        types: set[PolicyType] = {"Ingress"}
        if self.egress:
            types.add("Egress")
        return frozenset(types)

    def to_policy(self, namespace: str, name: str) -> internal.Policy:
        kind = internal.PolicyKind.STOCKADE_NETWORK_POLICY
        ref = internal.RuleRef(kind, namespace, name, internal.Direction.INGRESS, 0)
        directions = default_policy_types(self.policy_types, self.egress)
        mode = internal.Mode(self.mode)
        subject = self.pod_selector.to_selector()
        return network_policy(ref, mode, subject, directions, self.ingress, self.egress)


class StockadeNetworkPolicy(WireModel):
    """A whole `stockade.io/v1alpha1` NetworkPolicy object as the API server returns it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["stockade.io/v1alpha1"] = "stockade.io/v1alpha1"
    kind: Literal["NetworkPolicy"] = "NetworkPolicy"
    metadata: ObjectMeta
    spec: NetworkPolicySpec
    status: PolicyStatus | None = None

    def to_policy(self) -> internal.Policy:
        """The internal representation of this (valid) object."""
        return self.spec.to_policy(self.metadata.required_namespace(), self.metadata.name)
