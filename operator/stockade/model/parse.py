"""The entry point from a raw policy object (any of the four kinds) to a `Policy`.

The operator calls `parse_policy` on every watched object (through `stockade.model.admission`)
and reports a `PolicyParseError` as a condition; the conformance engines call it on case-file
objects. Each kind has one pydantic schema, which validates an object and maps it to `Policy`:
stockade's own kinds the models their CRDs are generated from (`stockade.model.crd`), the
standard NetworkPolicy and the upstream ClusterNetworkPolicy their lenient models
(`stockade.model.netpol_v1`, `stockade.model.cnp_v1alpha2`). It never raises anything but
`PolicyParseError`, whatever it is given.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from stockade.model import cnp_v1alpha2, crd, netpol_v1
from stockade.model.crd_common import type_name
from stockade.model.errors import FieldProblem, PolicyParseError
from stockade.model.kinds import POLICY_RESOURCES, resource_for
from stockade.model.policy import Policy, PolicyKind


def parse_policy(obj: object) -> Policy:
    """Parse a full Kubernetes object (apiVersion, kind, metadata, spec).

    Raises `PolicyParseError` carrying every problem found, each with its field path.
    """
    try:
        return _parse(obj)
    except RecursionError:  # a pathologically deep object; everything else is checked
        raise PolicyParseError([FieldProblem("", "object nested too deeply")]) from None


def _parse(obj: object) -> Policy:
    if not isinstance(obj, Mapping):
        raise PolicyParseError([FieldProblem("", f"must be an object, got {type_name(obj)}")])
    resource = resource_for(obj.get("apiVersion"), obj.get("kind"))
    if resource is None:
        expected = ", ".join(f"{r.api_version}/{r.name}" for r in POLICY_RESOURCES)
        raise PolicyParseError(
            [
                FieldProblem(
                    "kind",
                    f"unsupported apiVersion/kind {obj.get('apiVersion')!r}/{obj.get('kind')!r}; "
                    f"expected one of {expected}",
                )
            ]
        )
    if resource.model is not None:
        return crd.parse_policy(obj).to_policy()
    model = (
        netpol_v1.NetworkPolicy
        if resource.kind is PolicyKind.NETWORK_POLICY
        else cnp_v1alpha2.ClusterNetworkPolicy
    )
    try:
        return model.model_validate(obj).to_policy()
    except ValidationError as exc:
        raise PolicyParseError(crd.field_errors(exc)) from None
