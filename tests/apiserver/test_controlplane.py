"""The sandbox control plane is a real, secured Kubernetes API: pinned version, CRDs with
structural schemas and CEL rules, RBAC enforced for ServiceAccount tokens, a controller manager
that makes `default` ServiceAccounts and finishes deleting namespaces, a scheduler that binds Pods,
a dual-stack service range, and a start-up failure that explains itself."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
from kubernetes.client.exceptions import ApiException

from stockade.sandbox.controlplane.server import ControlPlane, ControlPlaneError
from stockade.sandbox.node.registration import create_pod, register_node
from stockade.sandbox.processes import find_processes
from stockade.sandbox.toolchain import ETCD, KUBERNETES, KUBERNETES_VERSION
from stockade.sandbox.topology import node_net
from tests.fixtures.controlplane import wait_for, wait_for_crd

GROUP = "controlplane-test.stockade.io"
WIDGETS = f"widgets.{GROUP}"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": WIDGETS},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["replicas"],
                                "properties": {
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer"},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "!has(self.maxReplicas) || "
                                        "self.maxReplicas >= self.replicas",
                                        "fieldPath": ".maxReplicas",
                                        "message": "maxReplicas must not be below replicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def widget_crd(control_plane: ControlPlane) -> Iterator[str]:
    """The Widget CRD, installed once for this module (CRD deletion completes asynchronously)."""
    with control_plane.api_client() as client:
        ext = k8s.ApiextensionsV1Api(client)
        ext.create_custom_resource_definition(WIDGET_CRD)  # type: ignore[arg-type]
        wait_for_crd(client, WIDGETS)
        yield WIDGETS
        ext.delete_custom_resource_definition(WIDGETS)


def test_the_api_server_reports_the_pinned_kubernetes_version(api_client: Any) -> None:
    version = k8s.VersionApi(api_client).get_code()
    assert version.git_version == KUBERNETES_VERSION


def test_a_crd_with_a_structural_schema_is_served_and_stores_a_valid_object(
    api_client: Any, widget_crd: str, k8s_namespace: str
) -> None:
    custom = k8s.CustomObjectsApi(api_client)
    body = widget("ok", {"replicas": 2, "maxReplicas": 3, "color": "red"})
    custom.create_namespaced_custom_object(GROUP, "v1", k8s_namespace, "widgets", body)

    stored: Any = custom.get_namespaced_custom_object(GROUP, "v1", k8s_namespace, "widgets", "ok")
    assert stored["spec"] == {"replicas": 2, "maxReplicas": 3, "color": "red"}


@dataclass(frozen=True)
class Violation:
    spec: dict[str, Any]
    field: str
    reason: str


@pytest.mark.parametrize(
    "violation",
    [
        Violation({"replicas": -1}, "spec.replicas", "should be greater than or equal to 0"),
        Violation({"replicas": "two"}, "spec.replicas", "must be of type integer"),
        Violation({"replicas": 1, "color": "green"}, "spec.color", "Unsupported value"),
        Violation({"color": "red"}, "spec.replicas", "Required value"),
        Violation(
            {"replicas": 3, "maxReplicas": 2}, "spec.maxReplicas", "must not be below replicas"
        ),
    ],
    ids=["below-minimum", "wrong-type", "not-in-enum", "missing-required", "cel-rule"],
)
def test_an_object_that_violates_the_schema_is_rejected_with_a_message_naming_the_field(
    api_client: Any, widget_crd: str, k8s_namespace: str, violation: Violation
) -> None:
    custom = k8s.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(
            GROUP, "v1", k8s_namespace, "widgets", widget("bad", violation.spec)
        )
    assert rejected.value.status == 422
    body = str(rejected.value.body)
    assert violation.field in body
    assert violation.reason in body


def test_a_pod_in_a_new_namespace_is_admitted_with_the_default_service_account(
    api_client: Any,
) -> None:
    """The controller manager makes the namespace's `default` ServiceAccount; the ServiceAccount
    admission plugin gives it to the Pod (a Pod sent before it exists is sent again)."""
    core = k8s.CoreV1Api(api_client)
    ns = f"fresh-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))
    try:
        pod = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="web", labels={"app": "web"}),
            spec=k8s.V1PodSpec(
                containers=[k8s.V1Container(name="web", image="registry.invalid/w:1")]
            ),
        )
        create_pod(api_client, ns, pod)

        stored: Any = core.read_namespaced_pod("web", ns)
        assert stored.metadata.labels == {"app": "web"}
        assert stored.spec.service_account_name == "default"
        assert core.read_namespaced_service_account("default", ns).metadata.name == "default"
    finally:
        core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
        core.delete_namespace(ns)


def _namespace_gone(core: k8s.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def test_a_deleted_namespace_finishes_deleting_with_what_it_held(api_client: Any) -> None:
    core = k8s.CoreV1Api(api_client)
    ns = f"doomed-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))
    core.create_namespaced_config_map(
        ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="held"), data={"a": "b"})
    )
    core.delete_namespace(ns)

    wait_for(f"namespace {ns} gone", lambda: _namespace_gone(core, ns), timeout=60)
    held = core.list_config_map_for_all_namespaces(field_selector=f"metadata.namespace={ns}")
    assert held.items == []


def test_the_scheduler_binds_a_pod_that_names_no_node_to_a_fitting_node(
    api_client: Any, k8s_namespace: str
) -> None:
    node = node_net("sch0", 61)
    register_node(api_client, node)
    core = k8s.CoreV1Api(api_client)
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="unbound"),
        spec=k8s.V1PodSpec(
            node_selector={"kubernetes.io/hostname": node.name},
            containers=[k8s.V1Container(name="c", image="registry.invalid/c:1")],
        ),
    )
    create_pod(api_client, k8s_namespace, pod)

    def bound() -> str | None:
        spec = core.read_namespaced_pod("unbound", k8s_namespace).spec
        return spec.node_name if spec is not None else None

    assert wait_for("the scheduler binds the pod", bound) == node.name


def _cluster_ips(api_client: Any, ns: str, name: str, policy: str) -> list[str]:
    core = k8s.CoreV1Api(api_client)
    service: Any = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ipFamilyPolicy": policy, "ports": [{"port": 80, "protocol": "TCP"}]},
    }
    created: Any = core.create_namespaced_service(ns, service)
    return list(created.spec.cluster_ips)


def test_a_service_gets_a_cluster_ip_in_the_ipv4_service_range(
    api_client: Any, k8s_namespace: str
) -> None:
    ips = _cluster_ips(api_client, k8s_namespace, "single", "SingleStack")
    assert len(ips) == 1
    assert ipaddress.ip_address(ips[0]) in ipaddress.ip_network("10.96.0.0/16")


def test_a_dual_stack_service_gets_a_cluster_ip_from_each_service_range(
    api_client: Any, k8s_namespace: str
) -> None:
    ips = _cluster_ips(api_client, k8s_namespace, "dual", "RequireDualStack")
    assert len(ips) == 2
    assert ipaddress.ip_address(ips[0]) in ipaddress.ip_network("10.96.0.0/16")
    assert ipaddress.ip_address(ips[1]) in ipaddress.ip_network("fd00:10:96::/112")


def test_the_default_service_cidr_lists_both_ranges_and_the_kubernetes_service_exists(
    api_client: Any,
) -> None:
    cidr: Any = k8s.NetworkingV1Api(api_client).read_service_cidr("kubernetes")
    assert cidr.spec.cidrs == ["10.96.0.0/16", "fd00:10:96::/112"]
    service: Any = k8s.CoreV1Api(api_client).read_namespaced_service("kubernetes", "default")
    assert service.spec.cluster_ip == "10.96.0.1"


def _list_config_maps(client: Any, namespace: str) -> Any:
    try:
        return k8s.CoreV1Api(client).list_namespaced_config_map(namespace)
    except ApiException as exc:
        if exc.status == 403:
            return None
        raise


def test_rbac_denies_a_service_account_without_a_grant_and_allows_it_after_one(
    control_plane: ControlPlane, api_client: Any, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    core = k8s.CoreV1Api(api_client)
    rbac = k8s.RbacAuthorizationV1Api(api_client)
    core.create_namespaced_service_account(
        ns, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="reader"))
    )
    token_request: Any = core.create_namespaced_service_account_token(
        "reader",
        ns,
        k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
        ),
    )

    with control_plane.api_client(token=token_request.status.token) as reader:
        with pytest.raises(ApiException) as denied:
            k8s.CoreV1Api(reader).list_namespaced_config_map(ns)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{ns}:reader" in str(denied.value.body)

        rbac.create_namespaced_role(
            ns,
            k8s.V1Role(
                metadata=k8s.V1ObjectMeta(name="configmap-reader"),
                rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
            ),
        )
        rbac.create_namespaced_role_binding(
            ns,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name="reader-reads-configmaps"),
                role_ref=k8s.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"
                ),
                subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=ns)],
            ),
        )
        listed = wait_for(
            "the grant reaches the RBAC authorizer", lambda: _list_config_maps(reader, ns)
        )
        assert [cm.metadata.name for cm in listed.items] == []

        with pytest.raises(ApiException) as still_denied:
            k8s.CoreV1Api(reader).list_namespaced_secret(ns)
        assert still_denied.value.status == 403


def test_a_control_plane_that_cannot_start_says_why_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    (tmp_path / "etcd").write_text("a file where etcd's data directory belongs\n")
    plane = ControlPlane(tmp_path)

    with pytest.raises(ControlPlaneError) as failed:
        plane.start()

    message = str(failed.value)
    assert "etcd exited during start-up" in message
    assert str(tmp_path / "etcd.log") in message
    assert "not a directory" in message  # etcd's own words, from the log tail
    assert find_processes(BINARIES, tmp_path) == []


BINARIES = {ETCD.path("etcd")} | {
    KUBERNETES.path(b) for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
}


def test_a_controller_manager_that_cannot_start_says_why_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    (tmp_path / "kube-controller-manager-certs").write_text("a file where a directory belongs\n")
    plane = ControlPlane(tmp_path)

    with pytest.raises(ControlPlaneError) as failed:
        plane.start()

    message = str(failed.value)
    assert "kube-controller-manager exited during start-up" in message
    assert str(tmp_path / "kube-controller-manager.log") in message
    assert "kube-controller-manager-certs" in message  # from its log tail
    assert find_processes(BINARIES, tmp_path) == []


def test_a_stopped_control_plane_leaves_no_process(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path)
    plane.start()
    assert {r.name for r in plane.record.processes} == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    }
    assert all(plane.health().values())
    plane.stop()
    assert find_processes(BINARIES, tmp_path) == []
