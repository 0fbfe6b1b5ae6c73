"""A watched policy object, parsed: the `Policy` value, or every problem with its field path.

The kopf handlers call `parse_record()` on each policy event; the object goes through admission
(`stockade.model.admission.admit`: the CRD's rules for stockade's kinds, then the internal
representation), the one path from an object to a `Policy`. Never raises on an object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from stockade.model.admission import admit
from stockade.model.errors import PolicyParseError, PolicyTooLargeError
from stockade.model.kinds import RESOURCE_OF, resource_for
from stockade.model.policy import Policy, PolicyKind

INVALID = "Invalid"
TOO_LARGE = "TooLarge"  # past stockade.model.admission.POLICY_SIZE_LIMIT

PolicyKey = tuple[str, str, str]  # (PolicyKind value, namespace or "", name)


@dataclass(frozen=True)
class PolicyRecord:
    """What the operator knows about one policy object."""

    kind: PolicyKind
    namespace: str
    name: str
    uid: str
    generation: int
    policy: Policy | None  # None when the object is not accepted
    problems: tuple[str, ...] = ()  # "<field path>: <message>", in field order
    status: Mapping[str, Any] = field(default_factory=dict)  # as last seen on the object
    reason: str = "Invalid"  # why it is not accepted: Invalid, or TooLarge (past the size limit)

    @property
    def key(self) -> PolicyKey:
        return (self.kind.value, self.namespace, self.name)

    @property
    def accepted(self) -> bool:
        return self.policy is not None

    @property
    def has_status(self) -> bool:
        """The standard NetworkPolicy reports through Events only."""
        return RESOURCE_OF[self.kind].has_status

    def same_content(self, other: PolicyRecord) -> bool:
        """Equal but for the status (a status write must not trigger a new lowering)."""
        return (self.uid, self.generation, self.policy, self.problems) == (
            other.uid,
            other.generation,
            other.policy,
            other.problems,
        )


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _problems(obj: Mapping[str, Any]) -> tuple[Policy | None, tuple[str, ...], str]:
    try:
        return admit(obj), (), INVALID
    except PolicyTooLargeError as exc:
        return None, tuple(str(p) for p in exc.problems), TOO_LARGE
    except PolicyParseError as exc:
        return None, tuple(str(p) for p in exc.problems), INVALID


def parse_record(
    obj: Mapping[str, Any], known: Callable[[PolicyKey], PolicyRecord | None] | None = None
) -> PolicyRecord | None:
    """The record for a raw policy object; None when stockade does not enforce its kind.

    `known(key)` returns the record stored for the key; when it has the same uid and generation,
    the spec is the one already parsed and only the status is taken from `obj` (the operator's
    own status writes come back through the watch, one per policy: they must not cost a parse).
    """
    resource = resource_for(obj.get("apiVersion"), obj.get("kind"))
    if resource is None:
        return None
    kind = resource.kind
    meta = _meta(obj)
    generation = meta.get("generation")
    namespace = str(meta.get("namespace") or "") if not kind.cluster_scoped else ""
    name = str(meta.get("name", ""))
    uid = str(meta.get("uid", ""))
    generation = generation if isinstance(generation, int) else 0
    raw_status = obj.get("status")
    status = dict(raw_status) if isinstance(raw_status, Mapping) else {}
    before = known((kind.value, namespace, name)) if known is not None else None
    if before is not None and generation and (before.uid, before.generation) == (uid, generation):
        return replace(before, status=status)
    reason = INVALID
    try:
        policy, problems, reason = _problems(obj)
    except Exception as exc:  # the operator never crashes on an object
        policy, problems = None, (f"spec: could not be parsed ({type(exc).__name__}: {exc})",)
    return PolicyRecord(
        kind=kind,
        namespace=namespace,
        name=name,
        uid=uid,
        generation=generation,
        policy=policy,
        problems=problems,
        status=status,
        reason=reason,
    )
