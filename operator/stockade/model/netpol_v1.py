"""The standard `networking.k8s.io/v1` NetworkPolicy, as stockade reads it.

The API server validates these objects with its own schema, which is more lenient than stockade's
CRD (`stockade.model.crd_snp`): no count bounds, `podSelector` optional, host bits allowed in a
CIDR. These models check what the internal representation needs, strictly typed ("80" is not a
port number), and map a valid object to `Policy` with the same helpers as stockade's kind
(`crd_snp.network_policy`). Called by `stockade.model.parse.parse_policy`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictStr, model_validator
from pydantic_core import PydanticCustomError

from stockade.model import policy as internal
from stockade.model import selectors
from stockade.model.crd_common import (
    LABEL_VALUE_PATTERN,
    ObjectMeta,
    PortNumber,
    WireModel,
    field_error,
    label_key_problem,
    type_name,
)
from stockade.model.crd_snp import (
    RuleModel,
    default_policy_types,
    netpol_peer,
    netpol_port,
    network_policy,
    network_rule,
)
from stockade.model.selectors import EVERYTHING

_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, "{message}", {"message": message})


def string(value: object) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError(
            "string_type", "must be a string, got {kind}", {"kind": type_name(value)}
        )
    return value


class Requirement(WireModel):
    key: StrictStr
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[StrictStr] | None = None

    @model_validator(mode="after")
    def _valid(self) -> Requirement:
        if problem := label_key_problem(self.key):
            raise field_error("key", problem)
        for j, value in enumerate(self.values or ()):
            if len(value) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, value):
                raise field_error(f"values[{j}]", f"label value {value!r} is not valid")
        # apimachinery validation: In/NotIn need values, Exists/DoesNotExist forbid them.
        if self.operator in ("In", "NotIn") and not self.values:
            raise field_error("values", f"must be non-empty when operator is {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise field_error("values", f"must be empty when operator is {self.operator}")
        return self


class Selector(WireModel):
    """A `metav1.LabelSelector` without stockade's count bounds."""

    match_labels: dict[str, StrictStr] | None = None
    match_expressions: list[Requirement] | None = None

    @model_validator(mode="after")
    def _valid_labels(self) -> Selector:
        for key, value in (self.match_labels or {}).items():
            if problem := label_key_problem(key):
                raise field_error(f"matchLabels.{key}", problem)
            if len(value) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, value):
                raise field_error(f"matchLabels.{key}", f"label value {value!r} is not valid")
        return self

    def to_selector(self) -> selectors.LabelSelector:
        reqs = {
            selectors.Requirement(k, selectors.SelectorOperator.IN, (v,))
            for k, v in (self.match_labels or {}).items()
        }
        reqs.update(
            selectors.Requirement(
                r.key, selectors.SelectorOperator(r.operator), tuple(sorted(set(r.values or ())))
            )
            for r in self.match_expressions or ()
        )
        return selectors.LabelSelector(tuple(sorted(reqs)))


def _cidr(value: object) -> internal.IPNetwork:
    """A CIDR; host bits may be set (`10.0.0.1/8` means `10.0.0.0/8`), as the API accepts."""
    text = string(value)
    if "/" not in text:
        raise _error("cidr", f"{text!r} is not a CIDR (address/prefix length)")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise _error("cidr", f"{text!r} is not a valid CIDR") from None


Cidr = Annotated[internal.IPNetwork, PlainValidator(_cidr)]


class IPBlock(WireModel):
    cidr: Cidr
    except_: list[Cidr] | None = Field(default=None, alias="except")

    @model_validator(mode="after")
    def _strictly_inside(self) -> IPBlock:
        for i, net in enumerate(self.except_ or ()):
            if net.version != self.cidr.version or not net.subnet_of(self.cidr) or net == self.cidr:  # type: ignore[arg-type]
                raise field_error(f"except[{i}]", f"{net} must be strictly within cidr {self.cidr}")
        return self

    def to_peer(self) -> internal.CidrPeer:
        excepts = sorted(
            set(self.except_ or ()), key=lambda n: (n.version, n.network_address, n.prefixlen)
        )
        return internal.CidrPeer(self.cidr, tuple(excepts))


class Peer(WireModel):
    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Peer:
        selected = self.pod_selector is not None or self.namespace_selector is not None
        if self.ip_block is not None and selected:
            raise ValueError("ipBlock may not be combined with podSelector or namespaceSelector")
        if self.ip_block is None and not selected:
            raise ValueError("must specify at least one of podSelector, namespaceSelector, ipBlock")
        return self

    def to_peer(self, namespace: str) -> internal.Peer:
        return netpol_peer(self.pod_selector, self.namespace_selector, self.ip_block, namespace)


def port_name(name: str) -> str:
    """A container port name (IANA_SVC_NAME), or an error saying why it is not one."""
    if (
        not name
        or len(name) > 15
        or not _IANA_SVC_NAME.match(name)
        or "--" in name
        or not any(c.isalpha() for c in name)
    ):
        raise _error(
            "port_name",
            f"{name!r} is not a valid port name (IANA_SVC_NAME: 1-15 lowercase a-z0-9 and -)",
        )
    return name


def _port(value: object) -> int | str:
    if isinstance(value, str):
        return port_name(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError(
            "int_type", "must be an integer, got {kind}", {"kind": type_name(value)}
        )
    if not 1 <= value <= 65535:
        raise PydanticCustomError(
            "int_range", "must be between 1 and 65535, got {value}", {"value": value}
        )
    return value


class Port(WireModel):
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"  # "If not specified, ... defaults to TCP."
    port: Annotated[int | str, PlainValidator(_port)] | None = None
    end_port: PortNumber | None = None

    @model_validator(mode="after")
    def _end_port(self) -> Port:
        if self.end_port is None:
            return self
        if self.port is None:
            raise field_error("endPort", "may not be set without port")
        if isinstance(self.port, str):
            raise field_error("endPort", "may not be set when port is a named port")
        if self.end_port < self.port:
            raise field_error("endPort", f"must be >= port ({self.port}), got {self.end_port}")
        return self

    def to_port(self) -> internal.PortSpec:
        return netpol_port(self.protocol, self.port, self.end_port)


class IngressRule(WireModel):
    from_: list[Peer] | None = Field(default=None, alias="from")
    ports: list[Port] | None = None

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule:
        peers = (p.to_peer(ref.namespace) for p in self.from_ or ())
        ports = (p.to_port() for p in self.ports or ())
        return network_rule(ref, internal.RuleAction.ALLOW, peers, ports)


class EgressRule(WireModel):
    to: list[Peer] | None = None
    ports: list[Port] | None = None

    def to_rule(self, ref: internal.RuleRef) -> internal.Rule:
        peers = (p.to_peer(ref.namespace) for p in self.to or ())
        ports = (p.to_port() for p in self.ports or ())
        return network_rule(ref, internal.RuleAction.ALLOW, peers, ports)


class Spec(WireModel):
    pod_selector: Selector | None = None
    ingress: list[IngressRule] | None = None
    egress: list[EgressRule] | None = None
    policy_types: list[Literal["Ingress", "Egress"]] | None = None


class Metadata(ObjectMeta):
    """Any non-empty name: the API server has checked it, and nothing of it reaches the C."""

    name: str = Field(min_length=1)


class NetworkPolicy(BaseModel):
    """A whole `networking.k8s.io/v1` NetworkPolicy object."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    metadata: Metadata
    spec: Spec = Spec()

    def to_policy(self) -> internal.Policy:
        namespace = self.metadata.required_namespace()
        kind = internal.PolicyKind.NETWORK_POLICY
        ref = internal.RuleRef(kind, namespace, self.metadata.name, internal.Direction.INGRESS, 0)
        spec = self.spec
        directions = default_policy_types(spec.policy_types, spec.egress)
        subject = spec.pod_selector.to_selector() if spec.pod_selector else EVERYTHING
        ingress: list[RuleModel] | None = list(spec.ingress) if spec.ingress else None
        egress: list[RuleModel] | None = list(spec.egress) if spec.egress else None
        return network_policy(ref, internal.Mode.ENFORCE, subject, directions, ingress, egress)
