"""What stockade accepts: the CRD's rules first, then the internal representation.

The one path from a policy object to a `Policy`: the operator (`stockade.control.policies`), the
conformance engines (`stockade.conformance.world`) and the demo call `admit`. The API server
validates stockade's kinds with the CRD schema and CEL rules; admission checks again with the
same rules (the pydantic model the kind registry names, `stockade.model.kinds`, from which the
CRDs are generated), then parses into `Policy` (`stockade.model.parse`), so that what the
operator reports as `Accepted` never disagrees with what `kubectl apply` would say. Other kinds
(the standard NetworkPolicy, the upstream ClusterNetworkPolicy) are validated by their own API
servers' schemas; the parser checks what the internal representation needs. Either step raises
`PolicyParseError`, naming every problem's field.
"""

from __future__ import annotations

from collections.abc import Mapping

from stockade.model import crd
from stockade.model.kinds import resource_for
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy


def admit(obj: object) -> Policy:
    """The policy an object means, or PolicyParseError naming every problem's field."""
    if isinstance(obj, Mapping):
        resource = resource_for(obj.get("apiVersion"), obj.get("kind"))
        if resource is not None and resource.model is not None:
            crd.parse_policy(obj)
    return parse_policy(obj)
