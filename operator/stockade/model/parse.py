"""The entry point from a raw policy object (any of the four kinds) to a `Policy`.

The operator calls `parse_policy` on every watched object (through `stockade.model.admission`)
and reports a `PolicyParseError` as a condition; the conformance engines call it on case-file
objects. stockade's own kinds are validated by the pydantic models their CRDs are generated from
(`stockade.model.crd.parse_policy`), the standard NetworkPolicy by its lenient models
(`stockade.model.netpol_v1`); each model then maps itself to `Policy`. The upstream
ClusterNetworkPolicy still goes through the field parser (`parse_cnp`). It never raises anything
but `PolicyParseError`, whatever dict it is given.
"""

from __future__ import annotations

from pydantic import ValidationError

from stockade.model import crd, fields, netpol_v1
from stockade.model.errors import FieldProblem, PolicyParseError
from stockade.model.fields import Problems
from stockade.model.kinds import POLICY_RESOURCES, resource_for
from stockade.model.parse_cnp import parse_cluster_network_policy
from stockade.model.parse_common import parse_name
from stockade.model.policy import Policy, PolicyKind


def parse_policy(obj: object) -> Policy:
    """Parse a full Kubernetes object (apiVersion, kind, metadata, spec).

    Raises `PolicyParseError` carrying every problem found, each with its field path.
    """
    problems = Problems()
    try:
        policy = _parse(obj, problems)
    except RecursionError:  # a pathologically deep object; everything else is checked
        raise PolicyParseError([FieldProblem("", "object nested too deeply")]) from None
    problems.raise_if_any()
    if policy is None:  # defensive: a parser declined without saying why
        raise PolicyParseError([FieldProblem("spec", "invalid")])
    return policy


def _parse(obj: object, problems: Problems) -> Policy | None:
    top = fields.mapping(obj, "", problems)
    if top is None:
        return None
    resource = resource_for(top.get("apiVersion"), top.get("kind"))
    if resource is None:
        problems.add(
            "kind",
            f"unsupported apiVersion/kind {top.get('apiVersion')!r}/{top.get('kind')!r}; "
            f"expected one of {', '.join(f'{r.api_version}/{r.name}' for r in POLICY_RESOURCES)}",
        )
        return None
    if resource.model is not None:
        return crd.parse_policy(top).to_policy()
    if resource.kind is PolicyKind.NETWORK_POLICY:
        try:
            return netpol_v1.NetworkPolicy.model_validate(top).to_policy()
        except ValidationError as exc:
            raise PolicyParseError(crd.field_errors(exc)) from None
    metadata = fields.mapping(top.get("metadata"), "metadata", problems)
    spec = fields.mapping(top.get("spec", {}), "spec", problems)
    if metadata is None or spec is None:
        return None
    # Missing names are recorded; the spec is still parsed so that every problem is reported.
    name = parse_name(metadata, "metadata", problems, "name") or ""
    return parse_cluster_network_policy(name, spec, problems)
