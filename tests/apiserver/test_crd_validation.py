"""The generated CRDs on a real kube-apiserver: they install and become Established (so their CEL
rules fit the cost budget), every bad object of the shared table is rejected at create time with
a message naming the field, every good object is accepted, read back with its defaults, and
parses with the same models the operator uses.

The tables live in tests/unit/test_crd_cases.py, where the pydantic models are held to the same
verdicts. `install_crds()` is also used by tests/apiserver/test_examples.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from stockade.model.crd import API_VERSION, CRD_KINDS, parse_policy
from stockade.sandbox.controlplane.server import ControlPlane
from tests.fixtures.controlplane import wait_for_crd
from tests.unit.test_crd_cases import BAD, GOOD, Bad, Obj, names_field, snp_block

CRDS = Path(__file__).resolve().parents[2] / "crds"
GROUP, VERSION = API_VERSION.split("/")
PLURALS = {k.kind: k.plural for k in CRD_KINDS}


def install_crds(api_client: Any) -> None:
    """Create (or replace) every CRD in crds/ and wait until each is Established."""
    ext = kubernetes.client.ApiextensionsV1Api(api_client)
    for kind in CRD_KINDS:
        body = yaml.safe_load((CRDS / kind.filename).read_text())
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(kind.name).metadata
            assert current is not None
            body["metadata"]["resourceVersion"] = current.resource_version
            ext.replace_custom_resource_definition(kind.name, body)
    for kind in CRD_KINDS:
        wait_for_crd(api_client, kind.name)


def create(api_client: Any, namespace: str, obj: Obj) -> dict[str, Any]:
    """Create `obj` as `kubectl apply` would (strict field validation); return what was stored."""
    objects = kubernetes.client.CustomObjectsApi(api_client)
    plural = PLURALS[obj["kind"]]
    if obj["kind"] == "ClusterNetworkPolicy":
        result = objects.create_cluster_custom_object(
            GROUP, VERSION, plural, obj, field_validation="Strict"
        )
    else:
        result = objects.create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, obj, field_validation="Strict"
        )
    assert isinstance(result, dict)
    return result


def delete(api_client: Any, namespace: str, obj: Obj) -> None:
    objects = kubernetes.client.CustomObjectsApi(api_client)
    plural, name = PLURALS[obj["kind"]], obj["metadata"]["name"]
    if obj["kind"] == "ClusterNetworkPolicy":
        objects.delete_cluster_custom_object(GROUP, VERSION, plural, name)
    else:
        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)


def named(obj: Obj, name: str) -> Obj:
    return {**obj, "metadata": {**obj["metadata"], "name": name}}


def rejection(exc: ApiException) -> tuple[str, list[str]]:
    """The Status message of a rejected request and the fields its causes name."""
    status = json.loads(exc.body or "{}")
    causes = (status.get("details") or {}).get("causes") or []
    return status.get("message", ""), [c.get("field", "") for c in causes]


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_the_api_server_rejects_a_bad_object_naming_the_field(
    case: Bad, api_client: Any, k8s_namespace: str
) -> None:
    with pytest.raises(ApiException) as info:
        create(api_client, k8s_namespace, named(case.obj, case.id))
    assert info.value.status in (400, 422), info.value.body
    message, fields = rejection(info.value)
    assert names_field(case.path, message), message
    if fields:
        assert any(names_field(case.path, f) for f in fields), (fields, message)


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize(("case_id", "obj"), GOOD, ids=[g[0] for g in GOOD])
def test_the_api_server_accepts_a_good_object_and_the_models_parse_what_it_stored(
    case_id: str, obj: Obj, api_client: Any, k8s_namespace: str
) -> None:
    stored = create(api_client, k8s_namespace, named(obj, case_id))
    try:
        parsed = parse_policy(stored)
        assert parsed.spec.mode == obj["spec"].get("mode", "Enforce")
        assert stored["spec"]["mode"] == parsed.spec.mode
    finally:
        delete(api_client, k8s_namespace, stored)


@pytest.mark.usefixtures("crds")
def test_the_api_server_fills_in_the_default_action_and_mode(
    api_client: Any, k8s_namespace: str
) -> None:
    obj = named(GOOD[0][1], "defaults") | {
        "spec": {"podSelector": {}, "ingress": [{}], "egress": [{"action": "Deny"}]}
    }
    stored = create(api_client, k8s_namespace, obj)
    assert stored["spec"]["mode"] == "Enforce"
    assert [r["action"] for r in stored["spec"]["ingress"] + stored["spec"]["egress"]] == [
        "Allow",
        "Deny",
    ]


@pytest.mark.usefixtures("crds")
def test_status_is_a_subresource_that_takes_conditions_and_shows_in_the_columns(
    control_plane: ControlPlane, api_client: Any, k8s_namespace: str
) -> None:
    objects = kubernetes.client.CustomObjectsApi(api_client)
    stored = create(api_client, k8s_namespace, named(GOOD[0][1], "with-status"))
    condition = {
        "type": "Accepted",
        "status": "True",
        "reason": "Valid",
        "message": "the policy is valid",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
        "observedGeneration": stored["metadata"]["generation"],
    }
    status = {"observedGeneration": stored["metadata"]["generation"], "conditions": [condition]}
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, k8s_namespace, "networkpolicies", "with-status", {"status": status}
    )
    again = objects.get_namespaced_custom_object(
        GROUP, VERSION, k8s_namespace, "networkpolicies", "with-status"
    )
    assert isinstance(again, dict)
    assert again["status"]["conditions"][0]["reason"] == "Valid"
    assert again["metadata"]["generation"] == stored["metadata"]["generation"]
    parsed = parse_policy(again)
    assert parsed.status is not None and parsed.status.conditions is not None
    assert parsed.status.conditions[0].type == "Accepted"
    listing = control_plane.kubectl("get", "snp", "-n", k8s_namespace).stdout.splitlines()
    header, row = listing[0].split(), listing[1].split()
    assert header == ["NAME", "MODE", "ACCEPTED", "PROGRAMMED", "AGE"]
    assert row[:3] == ["with-status", "Enforce", "True"]
    assert len(row) == 4, "Programmed is not set yet, so its column is empty"


@pytest.mark.usefixtures("crds")
def test_a_status_with_a_malformed_condition_is_rejected(
    api_client: Any, k8s_namespace: str
) -> None:
    objects = kubernetes.client.CustomObjectsApi(api_client)
    create(api_client, k8s_namespace, named(GOOD[0][1], "bad-status"))
    bad = {"conditions": [{"type": "Accepted", "status": "Maybe", "reason": "x", "message": ""}]}
    with pytest.raises(ApiException) as info:
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, k8s_namespace, "networkpolicies", "bad-status", {"status": bad}
        )
    message, _ = rejection(info.value)
    assert names_field("status.conditions[0].status", message), message


@pytest.mark.usefixtures("crds")
def test_kubectl_apply_of_a_bad_policy_fails_with_the_field_and_the_reason(
    control_plane: ControlPlane, k8s_namespace: str
) -> None:
    bad = named(snp_block("10.0.0.0/8", "192.168.0.0/16"), "outside")
    result = control_plane.kubectl(
        "apply", "-n", k8s_namespace, "-f", "-", input=yaml.safe_dump(bad), check=False
    )
    assert result.returncode != 0
    assert "spec.ingress[0].from[0].ipBlock.except" in result.stderr, result.stderr
    assert "every except entry must lie strictly inside cidr" in result.stderr, result.stderr


@pytest.mark.usefixtures("crds")
def test_the_stockade_category_and_short_names_list_both_kinds(
    control_plane: ControlPlane, api_client: Any, k8s_namespace: str
) -> None:
    create(api_client, k8s_namespace, named(GOOD[0][1], "listed"))
    cluster = named(next(obj for _, obj in GOOD if obj["kind"] == "ClusterNetworkPolicy"), "listed")
    create(api_client, k8s_namespace, cluster)
    try:
        names = control_plane.kubectl("get", "stockade", "-A", "-o", "name").stdout.split()
        assert "networkpolicy.stockade.io/listed" in names
        assert "clusternetworkpolicy.stockade.io/listed" in names
        wide = control_plane.kubectl("get", "scnp", "listed").stdout.splitlines()
        assert wide[0].split()[:3] == ["NAME", "TIER", "PRIORITY"]
    finally:
        delete(api_client, k8s_namespace, cluster)
