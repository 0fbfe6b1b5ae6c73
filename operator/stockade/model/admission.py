"""What the operator accepts: the CRD's rules first, then the internal representation.

The API server validates stockade's kinds with the CRD schema and CEL rules; the operator checks
again with the same rules (the pydantic models that generate the CRDs, `stockade.model.crd`),
then parses into `Policy` (`stockade.model.parse`). One entry point, so that what the operator
reports as `Accepted` never disagrees with what `kubectl apply` would say. Other kinds (the
standard NetworkPolicy, the upstream ClusterNetworkPolicy) are validated by their own API
servers' schemas; the parser checks what the internal representation needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stockade.model import crd
from stockade.model.errors import FieldProblem, PolicyParseError
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy


def admit(obj: Mapping[str, Any]) -> Policy:
    """The policy an object means, or PolicyParseError naming every problem's field."""
    if obj.get("apiVersion") == crd.API_VERSION:
        try:
            crd.parse_policy(obj)
        except crd.InvalidPolicyError as exc:
            raise PolicyParseError([FieldProblem(e.path, e.message) for e in exc.errors]) from None
    return parse_policy(obj)
