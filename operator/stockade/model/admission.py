"""What stockade accepts: the one path from a policy object to a `Policy`.

The operator (`stockade.control.policies`), the conformance engines (`stockade.conformance.world`)
and the demo call `admit`. stockade's own kinds are checked once, by the pydantic models the kind
registry names (`stockade.model.kinds`), from which the CRDs are generated, so that what the
operator reports as `Accepted` never disagrees with what `kubectl apply` would say; the models then
map themselves to `Policy`. Other kinds (the standard NetworkPolicy, the upstream
ClusterNetworkPolicy) are validated by their own API servers' schemas; their parsers check what the
internal representation needs (`stockade.model.parse`). Either way a problem raises
`PolicyParseError`, naming every problem's field.

Size: a policy's lowering work and the entries it adds to a node's tables grow linearly in its
size (`stockade.compiler.lower`), but the standard NetworkPolicy has no bound of its own, so
stockade sets one: a policy holds at most `POLICY_SIZE_LIMIT` peers, `except` blocks and ports
in all its rules together. A larger one is not enforced (like any policy stockade does not
accept) and is reported with the reason `TooLarge` (`PolicyTooLargeError`), while every other
policy and node goes on converging.
"""

from __future__ import annotations

from stockade.model.errors import FieldProblem, PolicyTooLargeError
from stockade.model.parse import parse_policy
from stockade.model.policy import CidrPeer, Direction, Policy

POLICY_SIZE_LIMIT = 10_000  # peers + except blocks + ports, over all the rules of one policy


def policy_size(policy: Policy) -> int:
    """The peers, `except` blocks and ports of all the rules of `policy`."""
    return sum(
        len(rule.ports)
        + sum(1 + (len(p.excepts) if isinstance(p, CidrPeer) else 0) for p in rule.peers)
        for direction in Direction
        for rule in policy.rules(direction)
    )


def admit(obj: object) -> Policy:
    """The policy an object means, or PolicyParseError naming every problem's field
    (PolicyTooLargeError when it is past `POLICY_SIZE_LIMIT`)."""
    policy = parse_policy(obj)
    size = policy_size(policy)
    if size > POLICY_SIZE_LIMIT:
        raise PolicyTooLargeError(
            [
                FieldProblem(
                    "spec",
                    f"{size} peers, except blocks and ports in its rules, more than the "
                    f"policy size limit of {POLICY_SIZE_LIMIT}",
                )
            ]
        )
    return policy
