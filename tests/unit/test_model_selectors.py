"""Label selectors: parsing, validation and matching as apimachinery defines them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from stockade.model.crd import field_errors
from stockade.model.netpol_v1 import Selector
from stockade.model.selectors import LabelSelector, Requirement, SelectorOperator


def parse(raw: object) -> LabelSelector:
    return Selector.model_validate(raw).to_selector()


def problems_of(raw: object) -> list[str]:
    with pytest.raises(ValidationError) as info:
        Selector.model_validate(raw)
    return [str(p) for p in field_errors(info.value, ("sel",))]


MATCHES = [
    ("empty selector", {}, {"a": "1"}, True),
    ("empty selector with no labels", {}, {}, True),
    (
        "empty matchLabels and matchExpressions",
        {"matchLabels": {}, "matchExpressions": []},
        {},
        True,
    ),
    ("matchLabels equal", {"matchLabels": {"pod": "a"}}, {"pod": "a", "x": "y"}, True),
    ("matchLabels other value", {"matchLabels": {"pod": "a"}}, {"pod": "b"}, False),
    ("matchLabels absent key", {"matchLabels": {"pod": "a"}}, {}, False),
    ("matchLabels all keys", {"matchLabels": {"a": "1", "b": "2"}}, {"a": "1"}, False),
    (
        "In matches",
        {"matchExpressions": [{"key": "k", "operator": "In", "values": ["a", "b"]}]},
        {"k": "b"},
        True,
    ),
    (
        "In absent key",
        {"matchExpressions": [{"key": "k", "operator": "In", "values": ["a"]}]},
        {},
        False,
    ),
    (
        "NotIn other value",
        {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["a"]}]},
        {"k": "b"},
        True,
    ),
    (
        "NotIn listed value",
        {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["a"]}]},
        {"k": "a"},
        False,
    ),
    (
        "NotIn absent key",
        {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["a"]}]},
        {},
        True,
    ),
    ("Exists present", {"matchExpressions": [{"key": "k", "operator": "Exists"}]}, {"k": ""}, True),
    ("Exists absent", {"matchExpressions": [{"key": "k", "operator": "Exists"}]}, {}, False),
    (
        "DoesNotExist absent",
        {"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]},
        {"j": "1"},
        True,
    ),
    (
        "DoesNotExist present",
        {"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]},
        {"k": "1"},
        False,
    ),
    (
        "matchLabels and matchExpressions are ANDed",
        {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
        {"a": "1"},
        False,
    ),
]


@pytest.mark.parametrize(
    ("raw", "labels", "expected"), [m[1:] for m in MATCHES], ids=[m[0] for m in MATCHES]
)
def test_a_selector_matches_labels_as_apimachinery_does(
    raw: object, labels: dict[str, str], expected: bool
) -> None:
    assert parse(raw).matches(labels) is expected


INVALID = [
    ("not an object", "pod=a", "sel: must be an object, got str"),
    (
        "In without values",
        {"matchExpressions": [{"key": "k", "operator": "In"}]},
        "sel.matchExpressions[0].values: must be non-empty when operator is In",
    ),
    (
        "Exists with values",
        {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["a"]}]},
        "sel.matchExpressions[0].values: must be empty when operator is Exists",
    ),
    (
        "unknown operator",
        {"matchExpressions": [{"key": "k", "operator": "Gt", "values": ["1"]}]},
        "sel.matchExpressions[0].operator: must be one of In, NotIn, Exists, DoesNotExist, got "
        "'Gt'",
    ),
    (
        "non-string label value",
        {"matchLabels": {"a": 1}},
        "sel.matchLabels.a: must be a string, got int",
    ),
    (
        "invalid label key",
        {"matchLabels": {"-bad": "x"}},
        "sel.matchLabels.-bad: label key '-bad' is not a valid qualified name",
    ),
    ("unknown field", {"matchLabel": {"a": "b"}}, "sel.matchLabel: unknown field"),
]


@pytest.mark.parametrize(("raw", "message"), [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_an_invalid_selector_is_rejected_with_its_field_path(raw: object, message: str) -> None:
    assert message in problems_of(raw)


def test_match_labels_and_equal_in_expressions_parse_to_the_same_selector() -> None:
    a = parse({"matchLabels": {"pod": "a"}})
    b = parse({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a"]}]})
    assert a == b == LabelSelector.of({"pod": "a"})


KEYS = st.sampled_from(["a", "b", "c", "example.com/d"])
VALUES = st.sampled_from(["1", "2", "3"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)
REQUIREMENTS = st.builds(
    lambda key, op, values: Requirement(
        key,
        op,
        tuple(sorted(set(values))) if op in (SelectorOperator.IN, SelectorOperator.NOT_IN) else (),
    ),
    KEYS,
    st.sampled_from(list(SelectorOperator)),
    st.lists(VALUES, min_size=1, max_size=3),
)


def _to_raw(reqs: list[Requirement]) -> dict[str, object]:
    return {
        "matchExpressions": [
            {"key": r.key, "operator": r.operator.value}
            | ({"values": list(r.values)} if r.values else {})
            for r in reqs
        ]
    }


@given(st.lists(REQUIREMENTS, max_size=4), LABELS)
def test_a_selector_matches_exactly_when_every_requirement_does(
    reqs: list[Requirement], labels: dict[str, str]
) -> None:
    def holds(r: Requirement) -> bool:
        value = labels.get(r.key)
        return {
            SelectorOperator.IN: value is not None and value in r.values,
            SelectorOperator.NOT_IN: value is None or value not in r.values,
            SelectorOperator.EXISTS: value is not None,
            SelectorOperator.DOES_NOT_EXIST: value is None,
        }[r.operator]

    assert parse(_to_raw(reqs)).matches(labels) == all(holds(r) for r in reqs)


@given(st.lists(REQUIREMENTS, max_size=4), st.randoms())
def test_the_order_of_requirements_does_not_change_the_selector(
    reqs: list[Requirement], rnd: object
) -> None:
    shuffled = list(reqs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert parse(_to_raw(reqs)) == parse(_to_raw(shuffled))


@given(LABELS, LABELS)
def test_match_labels_taken_from_a_pod_always_select_that_pod(
    labels: dict[str, str], extra: dict[str, str]
) -> None:
    assert parse({"matchLabels": labels}).matches({**extra, **labels})
