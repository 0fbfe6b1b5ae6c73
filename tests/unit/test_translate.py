"""`stockade.conformance.translate`: upstream ClusterNetworkPolicy objects become stockade
ClusterNetworkPolicy objects with the same fields, and every object of the upstream suite's case
file, once its symbolic addresses are concrete, is a valid stockade object.

`concrete_policy_objects()` is shared with tests/apiserver/test_upstream_crd.py.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from stockade.conformance.casefile import parse_case_file
from stockade.conformance.engines.reference import ReferenceEngine
from stockade.conformance.symbols import resolve
from stockade.conformance.translate import (
    UPSTREAM_API_VERSION,
    TranslationError,
    is_upstream_cnp,
    policy_objects,
    translate_case_file,
    translate_policy,
)
from stockade.model.crd import StockadeClusterNetworkPolicy, parse_policy
from stockade.model.errors import PolicyParseError
from tests.paths import CONFORMANCE

CNP_FILE = CONFORMANCE / "cnp-upstream.yaml"
STOCKADE = "stockade.io/v1alpha1"


def load(path: Any = CNP_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        raw = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert isinstance(raw, dict)
    return raw


def concrete_policy_objects(raw: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every object a case file creates or updates, as `(case-id:path, object)`, with symbolic
    addresses (`podIP(ns/pod)/N`, `nodeIP(node)`) replaced by the reference engine's addresses
    for that case."""
    casefile = parse_case_file(raw)
    engine = ReferenceEngine()
    out: list[tuple[str, dict[str, Any]]] = []
    for case_raw, case in zip(raw["cases"], casefile.cases, strict=True):
        addresses = engine.setup(casefile.topology, case)
        engine.teardown()
        for where, obj in policy_objects({"cases": [case_raw]}):
            label = f"{case.id}:{where.removeprefix('cases[0].')}"
            out.append((label, resolve(obj, addresses)))
    return out


UPSTREAM = [(label, obj) for label, obj in concrete_policy_objects(load()) if is_upstream_cnp(obj)]

POLICY: dict[str, Any] = {
    "apiVersion": UPSTREAM_API_VERSION,
    "kind": "ClusterNetworkPolicy",
    "metadata": {
        "name": "deny-egress",
        "uid": "0b5c2e7a-1111-2222-3333-444455556666",
        "resourceVersion": "42",
        "generation": 3,
        "creationTimestamp": "2025-01-01T00:00:00Z",
        "managedFields": [{"manager": "kubectl"}],
        "labels": {"team": "platform"},
        "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "owner": "net",
        },
    },
    "spec": {
        "tier": "Admin",
        "priority": 10,
        "subject": {"pods": {"podSelector": {"matchLabels": {"app": "db"}}}},
        "egress": [
            {
                "name": "web",
                "action": "Accept",
                "to": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}],
                "protocols": [
                    {"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8080}}}},
                    {"destinationNamedPort": "dns"},
                ],
            },
            {"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}, {"nodes": {}}]},
        ],
        "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}],
    },
    "status": {"conditions": []},
}


def test_the_case_file_holds_upstream_cluster_network_policies() -> None:
    assert len(UPSTREAM) >= 50
    assert all(obj["apiVersion"] == UPSTREAM_API_VERSION for _, obj in UPSTREAM)


@pytest.mark.parametrize(("label", "obj"), UPSTREAM, ids=[label for label, _ in UPSTREAM])
def test_every_translated_case_file_object_is_a_valid_stockade_policy(
    label: str, obj: dict[str, Any]
) -> None:
    translated = translate_policy(obj)
    parsed = parse_policy(translated)
    assert isinstance(parsed, StockadeClusterNetworkPolicy)
    assert parsed.spec.tier == obj["spec"]["tier"]
    assert parsed.spec.priority == obj["spec"]["priority"]
    assert len(parsed.spec.ingress or ()) == len(obj["spec"].get("ingress", ()))
    assert len(parsed.spec.egress or ()) == len(obj["spec"].get("egress", ()))


def test_translation_changes_the_api_version_and_keeps_the_spec_field_for_field() -> None:
    translated = translate_policy(POLICY)
    assert translated["apiVersion"] == STOCKADE
    assert translated["kind"] == "ClusterNetworkPolicy"
    assert translated["spec"] == POLICY["spec"]
    parse_policy(translated)


def test_translation_drops_status_and_what_the_api_server_set() -> None:
    translated = translate_policy(POLICY)
    assert "status" not in translated
    assert translated["metadata"] == {
        "name": "deny-egress",
        "labels": {"team": "platform"},
        "annotations": {"owner": "net"},
    }


def test_translation_leaves_its_input_unchanged() -> None:
    before = copy.deepcopy(POLICY)
    translated = translate_policy(POLICY)
    translated["spec"]["egress"][0]["to"].clear()
    assert before == POLICY


def test_a_v1beta1_object_translates_like_v1alpha2() -> None:
    beta = {**POLICY, "apiVersion": "policy.networking.k8s.io/v1beta1"}
    assert translate_policy(beta) == translate_policy(POLICY)


def test_domain_name_peers_are_refused_naming_the_field() -> None:
    obj = copy.deepcopy(POLICY)
    obj["spec"]["egress"][1]["to"].append({"domainNames": ["*.example.com"]})
    with pytest.raises(TranslationError, match=r"^spec\.egress\[1\]\.to\[2\]\.domainNames: "):
        translate_policy(obj)


def test_an_unknown_spec_field_is_refused_naming_the_field() -> None:
    obj = copy.deepcopy(POLICY)
    obj["spec"]["mode"] = "Audit"
    with pytest.raises(TranslationError, match=r"^spec\.mode: "):
        translate_policy(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {}},
        {"apiVersion": STOCKADE, "kind": "ClusterNetworkPolicy", "metadata": {}, "spec": {}},
        {"apiVersion": UPSTREAM_API_VERSION, "kind": "AdminNetworkPolicy", "spec": {}},
    ],
    ids=["standard-networkpolicy", "already-stockade", "other-upstream-kind"],
)
def test_only_upstream_cluster_network_policies_translate(obj: dict[str, Any]) -> None:
    with pytest.raises(TranslationError, match="not an upstream ClusterNetworkPolicy"):
        translate_policy(obj)


def _symbolic_case_file() -> dict[str, Any]:
    model = load()["model"]
    pod = next(iter(model["pods"]))
    obj = copy.deepcopy(POLICY)
    obj["spec"]["egress"][1]["to"] = [{"networks": [f"podIP({pod})/32"]}]
    return {
        "model": model,
        "cases": [
            {
                "id": "symbolic",
                "steps": [
                    {
                        "actions": [
                            {"create_policy": obj},
                            {"update_policy": obj},
                            {
                                "delete_policy": {
                                    "apiVersion": UPSTREAM_API_VERSION,
                                    "kind": "ClusterNetworkPolicy",
                                    "name": "deny-egress",
                                }
                            },
                            {
                                "delete_policy": {
                                    "apiVersion": "networking.k8s.io/v1",
                                    "kind": "NetworkPolicy",
                                    "namespace": "x",
                                    "name": "n",
                                }
                            },
                        ],
                        "probes": [],
                    }
                ],
            }
        ],
    }


def test_symbolic_cidrs_need_the_concrete_addresses_to_be_valid() -> None:
    raw = translate_case_file(_symbolic_case_file())
    ((_, symbolic), _) = policy_objects(raw)
    with pytest.raises(PolicyParseError, match=r"spec\.egress\[1\]\.to\[0\]\.networks\[0\]"):
        parse_policy(symbolic)
    ((_, concrete), _) = concrete_policy_objects(raw)
    (network,) = concrete["spec"]["egress"][1]["to"][0]["networks"]
    assert network.endswith("/32")
    assert not network.startswith("podIP")
    parse_policy(concrete)


def test_the_case_file_transformer_rewrites_objects_and_references_only() -> None:
    raw = _symbolic_case_file()
    before = copy.deepcopy(raw)
    out = translate_case_file(raw)
    assert raw == before
    actions = out["cases"][0]["steps"][0]["actions"]
    assert actions[0]["create_policy"]["apiVersion"] == STOCKADE
    assert actions[1]["update_policy"]["apiVersion"] == STOCKADE
    assert actions[2]["delete_policy"]["apiVersion"] == STOCKADE
    assert actions[3] == before["cases"][0]["steps"][0]["actions"][3]
    assert out["model"] == before["model"]
    assert out["translation"]["objects"] == 2


def test_the_translated_suite_has_no_upstream_object_left() -> None:
    out = translate_case_file(load())
    objects = [obj for _, obj in policy_objects(out)]
    assert not any(is_upstream_cnp(obj) for obj in objects)
    assert sum(obj["apiVersion"] == STOCKADE for obj in objects) == len(UPSTREAM)
    assert out["translation"]["objects"] == len(UPSTREAM)
    assert len(parse_case_file(out).cases) == len(load()["cases"])
