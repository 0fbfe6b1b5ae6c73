"""The one error type of policy admission: every problem, each with its field path.

The one path from an API object to a `Policy` (`stockade.model.parse`) raises it from the
pydantic models of every kind, with pydantic's errors worded the way the API server words them
(`stockade.model.crd.field_errors`). It lists every problem rather than the first, so that the
operator can report all of them at once as a condition on the object, and the conformance runner
can tell an unsupported feature from a malformed object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One problem: `path` is a JSON-ish field path such as `spec.ingress[0].ports[1].endPort`."""

    path: str
    message: str
    unsupported: bool = False  # the field is well-formed but names a feature stockade lacks

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PolicyParseError(ValueError):
    """A policy object could not be turned into the internal representation.

    `problems` lists every problem found, in field order; the message joins them.
    """

    def __init__(self, problems: list[FieldProblem] | tuple[FieldProblem, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid policy")

    @property
    def only_unsupported(self) -> bool:
        """True when the object is well-formed but uses features stockade does not implement."""
        return bool(self.problems) and all(p.unsupported for p in self.problems)


class PolicyTooLargeError(PolicyParseError):
    """A well-formed policy past stockade's size limit (`stockade.model.admission`): reported
    with the reason `TooLarge` instead of `Invalid`."""
