"""Every file in examples/ applies cleanly to a real API server with the CRDs installed, and
each file opens with the comment block that explains it (the README is written from them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.model.crd import parse_policy
from tests.apiserver.test_crd_validation import create, delete

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 6


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_an_example_applies_and_reads_back_as_the_same_policy(
    path: Path, api_client: Any, k8s_namespace: str
) -> None:
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must open with a comment that explains it"
    for doc in yaml.safe_load_all(text):
        if "namespace" in doc["metadata"]:
            doc["metadata"]["namespace"] = k8s_namespace
        stored = create(api_client, k8s_namespace, doc)
        try:
            assert parse_policy(stored).spec == parse_policy(doc).spec
        finally:
            delete(api_client, k8s_namespace, doc)
