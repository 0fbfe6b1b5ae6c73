"""The stockade policy API (`stockade.io/v1alpha1`) in one place: the two kinds, their CRDs, and
parsing of raw objects with every error reported by field path.

`stockade.model.parse` (the one path from an API object to a `Policy`) calls `parse_policy()` on
each stockade object (which the API server has validated against the same rules, generated from
these models) and then the model's `to_policy()`; a problem raises the one policy error type
(`stockade.model.errors.PolicyParseError`), worded as the API server words it. `hack/gen-crds.py`
and the drift test call `CRD_KINDS` / `render_crd_yaml()`. The models themselves live in
`crd_common`, `crd_snp` and `crd_scnp`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from stockade.model.crd_common import (
    FIELD_ERROR,
    UNSUPPORTED,
    IcmpMatch,
    LabelSelector,
    PolicyStatus,
    type_name,
)
from stockade.model.crd_datapath import DatapathTableSpec, DatapathTableStatus
from stockade.model.crd_schema import (
    GROUP,
    VERSION,
    CrdKind,
    PrinterColumn,
    condition_column,
    crd_manifest,
    render_crd_yaml,
)
from stockade.model.crd_scnp import (
    ClusterNetworkPolicySpec,
    StockadeClusterNetworkPolicy,
)
from stockade.model.crd_snp import NetworkPolicySpec, StockadeNetworkPolicy
from stockade.model.errors import FieldProblem, PolicyParseError
from stockade.model.kinds import RESOURCE_OF, resource_for
from stockade.model.policy import PolicyKind

__all__ = [
    "API_VERSION",
    "CLUSTER_NETWORK_POLICY",
    "CRD_KINDS",
    "DATAPATH_TABLE",
    "NETWORK_POLICY",
    "ClusterNetworkPolicySpec",
    "IcmpMatch",
    "LabelSelector",
    "NetworkPolicySpec",
    "PolicyStatus",
    "StockadeClusterNetworkPolicy",
    "StockadeNetworkPolicy",
    "crd_manifest",
    "field_errors",
    "parse_policy",
    "render_crd_yaml",
]

API_VERSION = f"{GROUP}/{VERSION}"

_AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")
_MODE = PrinterColumn("Mode", "string", ".spec.mode", "Enforce, or Audit (report only)")

_SNP = RESOURCE_OF[PolicyKind.STOCKADE_NETWORK_POLICY]
_SCNP = RESOURCE_OF[PolicyKind.STOCKADE_CLUSTER_NETWORK_POLICY]


def _scope(namespaced: bool) -> str:
    return "Namespaced" if namespaced else "Cluster"


NETWORK_POLICY = CrdKind(
    kind=_SNP.name,
    plural=_SNP.plural,
    singular="networkpolicy",
    short_name="snp",
    scope=_scope(_SNP.namespaced),
    spec_model=NetworkPolicySpec,
    description=(
        "A stockade NetworkPolicy: the standard NetworkPolicy plus per-rule Allow/Deny actions, "
        "ICMP matches and an Audit mode."
    ),
    columns=(_MODE, condition_column("Accepted"), condition_column("Programmed"), _AGE),
)

CLUSTER_NETWORK_POLICY = CrdKind(
    kind=_SCNP.name,
    plural=_SCNP.plural,
    singular="clusternetworkpolicy",
    short_name="scnp",
    scope=_scope(_SCNP.namespaced),
    spec_model=ClusterNetworkPolicySpec,
    description=(
        "A stockade ClusterNetworkPolicy: a cluster-wide policy in the Admin or Baseline tier, "
        "modelled on policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy."
    ),
    columns=(
        PrinterColumn("Tier", "string", ".spec.tier"),
        PrinterColumn("Priority", "integer", ".spec.priority"),
        _MODE,
        condition_column("Accepted"),
        condition_column("Programmed"),
        _AGE,
    ),
)

DATAPATH_TABLE = CrdKind(
    kind="DatapathTable",
    plural="datapathtables",
    singular="datapathtable",
    short_name="sdt",
    scope="Cluster",
    spec_model=DatapathTableSpec,
    status_model=DatapathTableStatus,
    description=(
        "One shard of a node's datapath tables, published by the stockade operator for the "
        "node's agent (stockade.handoff.codec describes the entries)."
    ),
    columns=(
        PrinterColumn("Node", "string", ".spec.node"),
        PrinterColumn("Part", "string", ".spec.part"),
        PrinterColumn("Shard", "integer", ".spec.shard"),
        PrinterColumn("Generation", "integer", ".spec.generation"),
        PrinterColumn("Applied", "integer", ".status.appliedGeneration"),
        _AGE,
    ),
)

POLICY_KINDS: tuple[CrdKind, ...] = (NETWORK_POLICY, CLUSTER_NETWORK_POLICY)
CRD_KINDS: tuple[CrdKind, ...] = (*POLICY_KINDS, DATAPATH_TABLE)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def field_errors(
    exc: ValidationError, prefix: tuple[int | str, ...] = ()
) -> tuple[FieldProblem, ...]:
    """Every error of a pydantic ValidationError, with its field path written the way the API
    server writes it (`spec.ingress[0].from[1].ipBlock.cidr`)."""
    out = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        unsupported = err["type"] == UNSUPPORTED
        if err["type"] == FIELD_ERROR or unsupported:
            ctx = err.get("ctx") or {}
            loc = (*loc, str(ctx["field"]))
        out.append(FieldProblem(_path(loc), _message(err), unsupported))
    return tuple(out)


_TYPE_ERRORS = {
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
}


def _message(err: ErrorDetails) -> str:
    """pydantic's error in the words the API server and stockade's other messages use."""
    kind, value = err["type"], err.get("input")
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return f"must be one of {', '.join(options)}, got {value!r}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    if kind == "string_too_short" and (err.get("ctx") or {}).get("min_length") == 1:
        return "must not be empty"
    if kind in _TYPE_ERRORS:
        return f"must be {_TYPE_ERRORS[kind]}, got {type_name(value)}"
    return err["msg"].removeprefix("Value error, ")


def parse_policy(obj: Mapping[str, Any]) -> StockadeNetworkPolicy | StockadeClusterNetworkPolicy:
    """Parse a raw `stockade.io/v1alpha1` policy object; raise PolicyParseError listing every
    problem."""
    resource = resource_for(obj.get("apiVersion"), obj.get("kind"))
    model = resource.model if resource is not None else None
    if model is None:
        found = f"{obj.get('apiVersion')}/{obj.get('kind', '')}"
        raise PolicyParseError([FieldProblem("kind", f"not a stockade policy: {found}")])
    try:
        parsed = model.model_validate(obj)
    except ValidationError as exc:
        raise PolicyParseError(field_errors(exc)) from None
    assert isinstance(parsed, StockadeNetworkPolicy | StockadeClusterNetworkPolicy)
    return parsed
