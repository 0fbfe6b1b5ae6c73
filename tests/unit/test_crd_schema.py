"""The CRDs in crds/ are exactly what the policy models generate, and are shaped so that the API
server accepts them: structural, every list, map and string bounded (the API server estimates
the cost of every CEL rule from these bounds), every CEL rule with a message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.model.crd import CRD_KINDS, crd_manifest, render_crd_yaml
from stockade.model.crd_schema import CrdKind, SchemaError, resolve_node

CRDS = Path(__file__).resolve().parents[2] / "crds"
KIND_IDS = [k.kind for k in CRD_KINDS]


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


def spec_nodes(kind: CrdKind) -> list[tuple[str, dict[str, Any]]]:
    root = crd_manifest(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return list(nodes(root["properties"]["spec"], "spec")) + list(
        nodes(root["properties"]["status"], "status")
    )


@pytest.mark.parametrize("kind", CRD_KINDS, ids=KIND_IDS)
def test_the_crd_file_matches_what_the_models_generate(kind: CrdKind) -> None:
    path = CRDS / kind.filename
    assert path.read_text() == render_crd_yaml(kind), (
        f"{path} is out of date: run `.venv/bin/python hack/gen-crds.py`"
    )


def test_crds_holds_only_generated_files() -> None:
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(k.filename for k in CRD_KINDS)


@pytest.mark.parametrize("kind", CRD_KINDS, ids=KIND_IDS)
def test_the_crd_file_parses_as_one_custom_resource_definition(kind: CrdKind) -> None:
    docs = list(yaml.safe_load_all((CRDS / kind.filename).read_text()))
    assert docs == [crd_manifest(kind)]


@pytest.mark.parametrize("kind", CRD_KINDS, ids=KIND_IDS)
def test_every_schema_node_is_structural(kind: CrdKind) -> None:
    for path, node in spec_nodes(kind):
        assert "$ref" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "boolean"}, path
        assert not ("properties" in node and "additionalProperties" in node), path


@pytest.mark.parametrize("kind", CRD_KINDS, ids=KIND_IDS)
def test_every_list_map_and_string_is_bounded(kind: CrdKind) -> None:
    for path, node in spec_nodes(kind):
        kind_of = node.get("type")
        if kind_of == "array":
            assert "maxItems" in node, path
        elif kind_of == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path
        elif kind_of == "string":
            assert "maxLength" in node or "enum" in node or node.get("format") == "date-time", path


@pytest.mark.parametrize("kind", CRD_KINDS, ids=KIND_IDS)
def test_every_cel_rule_has_a_message(kind: CrdKind) -> None:
    rules = [r for _, n in spec_nodes(kind) for r in n.get("x-kubernetes-validations", [])]
    assert rules
    for rule in rules:
        assert rule["message"] and rule["rule"]
        assert rule.get("fieldPath", ".").startswith(".")


def test_the_crds_name_their_kinds_as_the_api_says() -> None:
    by_kind = {k.kind: crd_manifest(k)["spec"] for k in CRD_KINDS}
    snp, scnp = by_kind["NetworkPolicy"], by_kind["ClusterNetworkPolicy"]
    assert (snp["scope"], snp["names"]["shortNames"]) == ("Namespaced", ["snp"])
    assert (scnp["scope"], scnp["names"]["shortNames"]) == ("Cluster", ["scnp"])
    for spec in (snp, scnp):
        assert spec["group"] == "stockade.io"
        assert spec["names"]["categories"] == ["stockade"]
        version = spec["versions"][0]
        assert version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert {"Accepted", "Programmed", "Age"} <= set(columns)
    scnp_columns = [c["name"] for c in scnp["versions"][0]["additionalPrinterColumns"]]
    assert scnp_columns[:2] == ["Tier", "Priority"]


def test_defaults_reach_the_schema() -> None:
    spec = crd_manifest(CRD_KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    props = spec["properties"]["spec"]["properties"]
    assert props["mode"]["default"] == "Enforce"
    assert props["ingress"]["items"]["properties"]["action"]["default"] == "Allow"


def test_a_union_the_api_server_cannot_express_is_refused() -> None:
    node = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    with pytest.raises(SchemaError, match="union"):
        resolve_node(node, {}, "spec.x")


def test_an_unknown_schema_keyword_is_refused() -> None:
    with pytest.raises(SchemaError, match="propertyNames"):
        resolve_node({"type": "object", "propertyNames": {"pattern": "x"}}, {}, "spec.x")
