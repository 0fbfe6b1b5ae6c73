"""Kubernetes label selectors: parsing and matching, as the API defines them.

Every policy kind selects namespaces, pods and nodes with `metav1.LabelSelector`; the parsers in
`stockade.model.parse_*` build `LabelSelector` values, the evaluator and the compiler call
`LabelSelector.matches`. A selector is canonical (requirements sorted, `matchLabels` folded into
`In` requirements) so that equal selectors compare and hash equal and the compiler can share
peer sets between rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from stockade.model import fields
from stockade.model.fields import Problems


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


def parse_selector(value: object, path: str, problems: Problems) -> LabelSelector | None:
    """Parse a `metav1.LabelSelector`; None (with problems recorded) when it is malformed."""
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    before = len(problems.items)
    fields.known_keys(obj, path, problems, ("matchLabels", "matchExpressions"))
    reqs: set[Requirement] = set()
    labels_path = fields.join(path, "matchLabels")
    raw_labels = obj.get("matchLabels")
    if raw_labels is not None:
        labels = fields.mapping(raw_labels, labels_path, problems)
        for key, val in (labels or {}).items():
            item_path = f"{labels_path}.{key}"
            text = fields.string(val, item_path, problems)
            if text is None:
                continue
            problem = fields.label_key_problem(key) or fields.label_value_problem(text)
            if problem:
                problems.add(item_path, problem)
                continue
            reqs.add(Requirement(key, SelectorOperator.IN, (text,)))
    exprs_path = fields.join(path, "matchExpressions")
    raw_exprs = obj.get("matchExpressions")
    if raw_exprs is not None:
        for i, raw in enumerate(fields.sequence(raw_exprs, exprs_path, problems) or []):
            req = _parse_requirement(raw, f"{exprs_path}[{i}]", problems)
            if req is not None:
                reqs.add(req)
    if len(problems.items) != before:
        return None
    return LabelSelector(tuple(sorted(reqs)))


def _parse_requirement(value: object, path: str, problems: Problems) -> Requirement | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    fields.known_keys(obj, path, problems, ("key", "operator", "values"))
    key = fields.string(obj.get("key"), f"{path}.key", problems)
    op_name = fields.choice(
        obj.get("operator"), f"{path}.operator", problems, [o.value for o in SelectorOperator]
    )
    raw_values = obj.get("values")
    values: list[str] = []
    if raw_values is not None:
        for j, raw in enumerate(fields.sequence(raw_values, f"{path}.values", problems) or []):
            text = fields.string(raw, f"{path}.values[{j}]", problems)
            if text is not None:
                problem = fields.label_value_problem(text)
                if problem:
                    problems.add(f"{path}.values[{j}]", problem)
                values.append(text)
    if key is not None and (problem := fields.label_key_problem(key)):
        problems.add(f"{path}.key", problem)
        return None
    if key is None or op_name is None:
        return None
    op = SelectorOperator(op_name)
    # apimachinery validation: In/NotIn need values, Exists/DoesNotExist forbid them.
    if op in (SelectorOperator.IN, SelectorOperator.NOT_IN) and not values:
        problems.add(f"{path}.values", f"must be non-empty when operator is {op.value}")
        return None
    if op in (SelectorOperator.EXISTS, SelectorOperator.DOES_NOT_EXIST) and values:
        problems.add(f"{path}.values", f"must be empty when operator is {op.value}")
        return None
    return Requirement(key, op, tuple(sorted(set(values))))
