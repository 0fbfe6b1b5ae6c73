"""Building blocks shared by the two stockade policy kinds: label selectors, CIDRs, ports, ICMP
matches, status conditions, and the way a CEL rule is declared next to the Python check that
mirrors it.

Every constraint lives here twice, side by side: as a CEL rule (`x-kubernetes-validations`) that
`crd_schema` copies into the CRD so that the API server rejects bad objects at `kubectl apply`,
and as a pydantic validator so that the operator, which validates again, gives the same answer.
`crd_snp` and `crd_scnp` build the policy kinds from these pieces; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from stockade.model import selectors
from stockade.model.errors import FieldProblem, PolicyParseError

# A rule's error type: `crd.field_errors` appends ctx["field"] to the error's location, so that a
# cross-field check made on an object reports the same path as the CEL rule's `fieldPath`.
FIELD_ERROR = "stockade_field"
# The same, for a well-formed field that names a feature stockade does not implement.
UNSUPPORTED = "stockade_unsupported"

JsonDict = dict[str, Any]


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> JsonDict:
    """One `x-kubernetes-validations` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def validations(*rules: JsonDict, **extra: Any) -> JsonDict:
    """A `json_schema_extra` value carrying CEL rules (and any other schema keywords)."""
    out: JsonDict = dict(extra)
    if rules:
        out["x-kubernetes-validations"] = list(rules)
    return out


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error about `field` of the object being validated, raised from a model validator."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


def unsupported(field: str, message: str) -> PydanticCustomError:
    """A feature stockade lacks, named at `field` of the object being validated."""
    return PydanticCustomError(UNSUPPORTED, "{message}", {"field": field, "message": message})


class WireModel(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
    )


def exactly_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    """Raise unless exactly one of `fields` (python names) is set; the message names the aliases."""
    names = [type(model).model_fields[f].alias or f for f in fields]
    chosen = [n for f, n in zip(fields, names, strict=True) if getattr(model, f) is not None]
    if len(chosen) != 1:
        found = ", ".join(chosen) if chosen else "none"
        raise PydanticCustomError(
            "exactly_one",
            "{what} must set exactly one of {names} (found: {found})",
            {"what": what, "names": ", ".join(names), "found": found},
        )


def exactly_one_rule(names: tuple[str, ...], what: str) -> JsonDict:
    """The CEL twin of `exactly_one`."""
    count = " + ".join(f"(has(self.{n}) ? 1 : 0)" for n in names)
    return cel(f"{count} == 1", f"{what} must set exactly one of {', '.join(names)}")


# --- label selectors -------------------------------------------------------------------------

LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
MAX_MATCH_LABELS = 32
MAX_MATCH_EXPRESSIONS = 16
MAX_MATCH_VALUES = 64


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label key (a Kubernetes qualified name), or None."""
    prefix, _, name = key.rpartition("/")
    if len(prefix) > 253 or len(name) > 63 or not re.fullmatch(LABEL_KEY_PATTERN, key):
        return f"label key {key!r} is not a valid qualified name"
    return None


LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]


class LabelSelectorRequirement(WireModel):
    """A selector requirement: a label key, an operator and (for In and NotIn) values."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
                " : (!has(self.values) || size(self.values) == 0)",
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
                field_path=".values",
            )
        )
    )

    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] | None = Field(default=None, max_length=MAX_MATCH_VALUES)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        has_values = bool(self.values)
        if self.operator in ("In", "NotIn") and not has_values:
            raise field_error("values", f"values must be non-empty for {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and has_values:
            raise field_error("values", f"values must be empty for {self.operator}")
        return self


class LabelSelector(WireModel):
    """A standard label selector; an empty selector selects everything."""

    match_labels: dict[str, LabelValue] | None = Field(
        default=None, json_schema_extra={"maxProperties": MAX_MATCH_LABELS}
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=MAX_MATCH_EXPRESSIONS
    )

    @field_validator("match_labels")
    @classmethod
    def _bounded_labels(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_MATCH_LABELS:
            raise ValueError(f"at most {MAX_MATCH_LABELS} labels")
        # A schema cannot constrain a map's keys; the API server's label validation does.
        for key in value or ():
            if problem := label_key_problem(key):
                raise field_error(key, problem)
        return value

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether `labels` satisfy this selector (Kubernetes semantics)."""
        for key, value in (self.match_labels or {}).items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions or ():
            present = req.key in labels
            inside = present and labels[req.key] in (req.values or ())
            if (
                (req.operator == "In" and not inside)
                or (req.operator == "NotIn" and inside)
                or (req.operator == "Exists" and not present)
                or (req.operator == "DoesNotExist" and present)
            ):
                return False
        return True

    def to_selector(self) -> selectors.LabelSelector:
        """The internal, canonical selector: `matchLabels` folded into `In` requirements."""
        reqs = {
            selectors.Requirement(key, selectors.SelectorOperator.IN, (value,))
            for key, value in (self.match_labels or {}).items()
        }
        reqs.update(
            selectors.Requirement(
                req.key,
                selectors.SelectorOperator(req.operator),
                tuple(sorted(set(req.values or ()))),
            )
            for req in self.match_expressions or ()
        )
        return selectors.LabelSelector(tuple(sorted(reqs)))


# --- CIDRs -----------------------------------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CIDR_MALFORMED = "must be a valid CIDR such as 10.0.0.0/8 or fd00::/8"
CIDR_HOST_BITS = "must not have host bits set: use the network address of the prefix"


def parse_cidr(text: str) -> IPNetwork:
    """Parse a CIDR the way the API server's `cidr()` does: address/length, no zone, no
    IPv4-mapped IPv6, no host bits. The ValueError says what is wrong."""
    if "/" not in text or "%" in text:
        raise ValueError(CIDR_MALFORMED)
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(CIDR_MALFORMED) from None
    if isinstance(loose, ipaddress.IPv6Network) and loose.network_address.ipv4_mapped is not None:
        raise ValueError(CIDR_MALFORMED)
    address = ipaddress.ip_address(text.split("/", 1)[0])
    if address != loose.network_address:
        raise ValueError(f"{CIDR_HOST_BITS} (did you mean {loose}?)")
    return loose


def _check_cidr(text: str) -> str:
    parse_cidr(text)
    return text


Cidr = Annotated[
    str,
    Field(
        max_length=43,
        json_schema_extra=validations(
            cel("isCIDR(self)", CIDR_MALFORMED, reason="FieldValueInvalid"),
            cel(
                "!isCIDR(self) || cidr(self) == cidr(self).masked()",
                CIDR_HOST_BITS,
                reason="FieldValueInvalid",
            ),
        ),
    ),
    AfterValidator(_check_cidr),
]

# --- ports and ICMP --------------------------------------------------------------------------

# IANA_SVC_NAME as Kubernetes validates a named port: at most 15 characters, lower-case letters,
# digits and inner single hyphens, with at least one letter. One RE2-compatible pattern (split at
# the first letter: digit-only tokens, the token holding the first letter, any further tokens),
# so that the schema checks it without a CEL rule (an int-or-string value has no length bound
# that CEL's cost estimate could use).
PORT_NAME_PATTERN = r"^([0-9]+-)*[0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*$"
PORT_NAME = "must be 1 to 15 lower-case letters, digits and inner single hyphens, with a letter"
PORT_RANGE = "must be between 1 and 65535"


def type_name(value: object) -> str:
    """How an error message names a value's JSON type."""
    return "null" if value is None else type(value).__name__


def _between(low: int, high: int) -> BeforeValidator:
    """A strict integer check with the bounds in its message ("80" and True are not ports)."""

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PydanticCustomError(
                "int_type", "must be an integer, got {kind}", {"kind": type_name(value)}
            )
        if not low <= value <= high:
            raise PydanticCustomError(
                "int_range",
                "must be between {low} and {high}, got {value}",
                {"low": low, "high": high, "value": value},
            )
        return value

    return BeforeValidator(check)


PortNumber = Annotated[int, Field(ge=1, le=65535), _between(1, 65535)]
IcmpNumber = Annotated[int, Field(ge=0, le=255), _between(0, 255)]
Priority = Annotated[int, Field(ge=0, le=1000), _between(0, 1000)]


def _check_port_name(name: str) -> str:
    if len(name) > 15 or not re.fullmatch(PORT_NAME_PATTERN, name):
        raise PydanticCustomError("port_name", PORT_NAME)
    return name


def _check_port(value: object) -> int | str:
    if isinstance(value, bool):
        raise PydanticCustomError("port", "must be a port number or a port name")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise PydanticCustomError("port_range", PORT_RANGE)
        return value
    if isinstance(value, str):
        return _check_port_name(value)
    raise PydanticCustomError("port", "must be a port number or a port name")


# The numeric bounds apply only to a number and the string bounds only to a string.
IntOrPort = Annotated[
    int | str,
    PlainValidator(_check_port),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "minimum": 1,
            "maximum": 65535,
            "maxLength": 15,
            "pattern": PORT_NAME_PATTERN,
        }
    ),
]

NamedPort = Annotated[
    str,
    Field(max_length=15, pattern=PORT_NAME_PATTERN),
    AfterValidator(_check_port_name),
]


class IcmpMatch(WireModel):
    """An ICMP (or ICMPv6) type and, optionally, code. Without a code every code matches."""

    type: IcmpNumber
    code: IcmpNumber | None = None


# --- status ----------------------------------------------------------------------------------

MAX_CONDITIONS = 8
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(WireModel):
    """A standard status condition (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: datetime
    reason: str = Field(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)
    message: str = Field(max_length=32768)


class PolicyStatus(WireModel):
    """What stockade observed: whether the policy is accepted and programmed on the nodes."""

    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=MAX_CONDITIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class ObjectMeta(BaseModel):
    """The part of an object's metadata that stockade reads; everything else is ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
        frozen=True,
    )

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    def required_namespace(self) -> str:
        """The namespace of a namespaced object, which the API server always sets."""
        if self.namespace is None:
            raise PolicyParseError([FieldProblem("metadata.namespace", "required")])
        if not self.namespace:
            raise PolicyParseError([FieldProblem("metadata.namespace", "must not be empty")])
        return self.namespace
