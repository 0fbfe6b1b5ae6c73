"""What stockade accepts: the one path from a policy object to a `Policy`.

The operator (`stockade.control.policies`), the conformance engines (`stockade.conformance.world`)
and the demo call `admit`. stockade's own kinds are checked once, by the pydantic models the kind
registry names (`stockade.model.kinds`), from which the CRDs are generated, so that what the
operator reports as `Accepted` never disagrees with what `kubectl apply` would say; the models then
map themselves to `Policy`. Other kinds (the standard NetworkPolicy, the upstream
ClusterNetworkPolicy) are validated by their own API servers' schemas; their parsers check what the
internal representation needs (`stockade.model.parse`). Either way a problem raises
`PolicyParseError`, naming every problem's field.
"""

from __future__ import annotations

from stockade.model.parse import parse_policy
from stockade.model.policy import Policy


def admit(obj: object) -> Policy:
    """The policy an object means, or PolicyParseError naming every problem's field."""
    return parse_policy(obj)
