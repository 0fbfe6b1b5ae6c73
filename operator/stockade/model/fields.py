"""Typed reading of raw API payloads with field paths, collecting every problem.

The policy parsers call these helpers on untrusted dicts (anything a user can `kubectl apply`,
anything a case file holds). Each helper returns None and records a `FieldProblem` instead of
raising, so that one pass reports every problem and no input can crash the parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from stockade.model.errors import FieldProblem, PolicyParseError

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Problems:
    """An accumulator of field problems for one object."""

    def __init__(self) -> None:
        self.items: list[FieldProblem] = []

    def add(self, path: str, message: str, *, unsupported: bool = False) -> None:
        self.items.append(FieldProblem(path, message, unsupported))

    def raise_if_any(self) -> None:
        if self.items:
            raise PolicyParseError(self.items)


def mapping(value: object, path: str, problems: Problems) -> Mapping[str, object] | None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        problems.add(path, f"must be an object, got {_kind(value)}")
        return None
    return value


def sequence(value: object, path: str, problems: Problems) -> list[object] | None:
    if not isinstance(value, list | tuple):
        problems.add(path, f"must be a list, got {_kind(value)}")
        return None
    return list(value)


def string(value: object, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str):
        problems.add(path, f"must be a string, got {_kind(value)}")
        return None
    return value


def integer(
    value: object, path: str, problems: Problems, low: int | None = None, high: int | None = None
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(path, f"must be an integer, got {_kind(value)}")
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        problems.add(path, f"must be between {low} and {high}, got {value}")
        return None
    return value


def choice(value: object, path: str, problems: Problems, allowed: Iterable[str]) -> str | None:
    options = list(allowed)
    text = string(value, path, problems)
    if text is None:
        return None
    if text not in options:
        problems.add(path, f"must be one of {', '.join(options)}, got {text!r}")
        return None
    return text


def known_keys(
    obj: Mapping[str, object], path: str, problems: Problems, allowed: Iterable[str]
) -> None:
    """Record every key that the schema does not define (a typo must not widen a policy)."""
    known = set(allowed)
    for key in obj:
        if key not in known:
            problems.add(join(path, key), "unknown field")


def exactly_one(
    obj: Mapping[str, object], path: str, problems: Problems, options: Iterable[str]
) -> str | None:
    """The one key of `options` that is set (not None); records a problem otherwise."""
    names = list(options)
    present = [k for k in names if obj.get(k) is not None]
    if len(present) != 1:
        problems.add(path, f"exactly one of {', '.join(names)} must be set, got {len(present)}")
        return None
    return present[0]


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label key (Kubernetes qualified name), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r} has an invalid prefix"
    if not name or len(name) > 63 or not _NAME.match(name):
        return f"label key {key!r} is not a valid qualified name"
    return None


def label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _NAME.match(value)):
        return f"label value {value!r} is not valid"
    return None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return type(value).__name__
