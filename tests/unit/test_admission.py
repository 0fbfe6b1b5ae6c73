"""The operator's admission agrees with the API server: every bad object of the CRD tables is
rejected naming the same field, and every good one is accepted and parsed."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.model.admission import admit
from stockade.model.errors import PolicyParseError
from tests.unit.test_crd_cases import BAD, GOOD, Bad


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_a_bad_object_is_rejected_naming_its_field(case: Bad) -> None:
    with pytest.raises(PolicyParseError) as caught:
        admit(case.obj)
    paths = [p.path for p in caught.value.problems]
    assert any(p.startswith(case.path) for p in paths), paths


@pytest.mark.parametrize(("name", "obj"), GOOD, ids=[g[0] for g in GOOD])
def test_a_good_object_is_accepted(name: str, obj: dict[str, Any]) -> None:
    if obj["kind"] == "NetworkPolicy":  # `kubectl apply -n` fills in the namespace
        obj = {**obj, "metadata": {**obj["metadata"], "namespace": "default"}}
    policy = admit(obj)
    assert policy.name == obj["metadata"]["name"]
