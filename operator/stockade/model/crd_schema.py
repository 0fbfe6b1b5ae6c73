"""Turn the pydantic policy models into Kubernetes structural OpenAPI schemas and whole
CustomResourceDefinition manifests.

The models in `crd_snp` and `crd_scnp` are the single source of truth: `hack/gen-crds.py` writes
`crds/*.yaml` from `render_crd_yaml()`, and a unit test fails when the files in `crds/` differ
from what this module generates. Pure functions, no I/O.

Pydantic's JSON schema is close to a structural schema; the differences handled here are:
`$ref`s are inlined, `Optional[X]` (anyOf with null) becomes X, `const` becomes a one-value
enum, titles, `default: null` and `additionalProperties: false` are dropped, and the
int-or-string port keeps its `x-kubernetes-int-or-string` form. Anything else unexpected is an
error rather than a silently wrong CRD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from stockade.model.crd_common import JsonDict, PolicyStatus

GROUP = "stockade.io"
VERSION = "v1alpha1"
CATEGORY = "stockade"

_DROP = {"title", "additionalProperties"}
_ALLOWED = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minItems",
    "maxItems",
    "maxProperties",
    "minProperties",
    "anyOf",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}


# Keyword order in the generated YAML: what a reader looks for first comes first.
_ORDER = {k: i for i, k in enumerate(("type", "description", "required", "properties", "items"))}


class SchemaError(ValueError):
    """The models produced a JSON schema that has no structural-schema equivalent."""


def _merge(base: JsonDict, outer: JsonDict) -> JsonDict:
    """`outer` (a field's own keywords) over `base` (its type's); CEL rules of both apply."""
    rules = base.get("x-kubernetes-validations", []) + outer.get("x-kubernetes-validations", [])
    merged = {**base, **outer}
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def resolve_node(node: Mapping[str, Any], defs: Mapping[str, Any], path: str) -> JsonDict:
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        return _merge(resolve_node(defs[name], defs, path), resolve_node(node, defs, path))
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise SchemaError(f"{path}: a union other than Optional[X] has no structural form")
        if node.get("default", 0) is None:
            node.pop("default")
        return _merge(resolve_node(branches[0], defs, path), resolve_node(node, defs, path))
    out: JsonDict = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {k: resolve_node(v, defs, f"{path}.{k}") for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = resolve_node(value, defs, f"{path}[]")
        elif key == "default" and value is None:
            continue
        elif key not in _ALLOWED:
            raise SchemaError(f"{path}: keyword {key!r} has no structural form")
        else:
            out[key] = value
    if out.get("enum") and "type" not in out:
        out["type"] = "string"
    if "description" in out:
        out["description"] = _unwrap(out["description"])
    return dict(sorted(out.items(), key=lambda kv: _ORDER.get(kv[0], len(_ORDER))))


def _unwrap(text: str) -> str:
    """Docstring line breaks inside a paragraph become spaces; paragraphs stay apart."""
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text.strip())


def structural_schema(model: type[BaseModel]) -> JsonDict:
    """The structural OpenAPI v3 schema of `model`, with its CEL rules, as the CRD needs it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return resolve_node(raw, defs, model.__name__)


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0

    def manifest(self) -> JsonDict:
        out: JsonDict = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


def condition_column(condition: str) -> PrinterColumn:
    return PrinterColumn(
        condition,
        "string",
        f'.status.conditions[?(@.type=="{condition}")].status',
        f"Whether the policy is {condition.lower()}",
    )


@dataclass(frozen=True)
class CrdKind:
    """Everything that names one custom resource besides its schema."""

    kind: str
    plural: str
    singular: str
    short_name: str
    scope: str  # Namespaced | Cluster
    spec_model: type[BaseModel]
    description: str
    columns: tuple[PrinterColumn, ...]
    status_model: type[BaseModel] = PolicyStatus

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"


def crd_manifest(kind: CrdKind) -> JsonDict:
    """The whole CustomResourceDefinition object for `kind`."""
    schema: JsonDict = {
        "type": "object",
        "description": kind.description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(kind.spec_model),
            "status": structural_schema(kind.status_model),
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.name},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "scope": kind.scope,
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.manifest() for c in kind.columns],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = "# Generated by hack/gen-crds.py from stockade.model (crd_snp, crd_scnp). Do not edit.\n"


def render_crd_yaml(kind: CrdKind) -> str:
    """The exact text of `crds/<kind.filename>`."""
    body = yaml.dump(
        crd_manifest(kind), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER + "---\n" + body
