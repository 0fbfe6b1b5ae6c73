"""Kubernetes label selectors: matching, as the API defines it.

Every policy kind selects namespaces, pods and nodes with `metav1.LabelSelector`; the wire models
(`stockade.model.crd_common`, `stockade.model.netpol_v1`) build `LabelSelector` values, the
evaluator and the compiler call `LabelSelector.matches`. A selector is canonical (requirements
sorted, `matchLabels` folded into `In` requirements) so that equal selectors compare and hash
equal and the compiler can share peer sets between rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()  # sorted, without duplicates

    def matches(self, labels: Mapping[str, str]) -> bool:
        # apimachinery labels.Requirement.Matches: NotIn and DoesNotExist match an absent key.
        present = self.key in labels
        if self.operator is SelectorOperator.IN:
            return present and labels[self.key] in self.values
        if self.operator is SelectorOperator.NOT_IN:
            return not present or labels[self.key] not in self.values
        if self.operator is SelectorOperator.EXISTS:
            return present
        return not present


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements. No requirement at all (`{}`) selects everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def selects_all(self) -> bool:
        return not self.requirements

    @classmethod
    def of(cls, match_labels: Mapping[str, str] | None = None) -> LabelSelector:
        """A selector from `matchLabels` alone (a convenience for code and tests)."""
        reqs = [Requirement(k, SelectorOperator.IN, (v,)) for k, v in (match_labels or {}).items()]
        return cls(tuple(sorted(set(reqs))))


EVERYTHING = LabelSelector()
