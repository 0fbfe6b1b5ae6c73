"""`helm install` into the sandbox API server: every object passes server-side validation, and
the ServiceAccounts' permissions are what tests/chart/access.py declares, no more, no less.

The release is installed once per module (its pods never run: the sandbox has no kubelet for
them). The RBAC harness asks the API server itself (SubjectAccessReview), then removes each
rule of the chart in turn and shows that a declared access then fails: every rule is needed.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import pytest

from stockade.sandbox.controlplane.server import ControlPlane
from tests.chart.access import AGENT, FORBIDDEN, OPERATOR, Access, Scope, required
from tests.chart.chart import CHART, default_values, helm, roles_of
from tests.chart.rbac import VERBS, allowed
from tests.fixtures.controlplane import wait_for


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    values: dict[str, Any]
    api_client: Any

    def sa(self, component: str) -> str:
        return f"{self.name}-{component}"


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane) -> Iterator[Release]:
    name = f"stockade-{secrets.token_hex(3)}"
    namespace = f"{name}-system"
    kubeconfig = str(control_plane.kubeconfig)
    helm(
        "install",
        name,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--kubeconfig",
        kubeconfig,
    )
    with control_plane.api_client() as client:
        try:
            yield Release(name, namespace, default_values(), client)
        finally:
            helm("uninstall", name, "--namespace", namespace, "--kubeconfig", kubeconfig)
            kubernetes.client.CoreV1Api(client).delete_namespace(namespace)


def installed_objects(release: Release) -> list[dict[str, Any]]:
    """The release's Roles, ClusterRoles and bindings, as the API server has them."""
    rbac = kubernetes.client.RbacAuthorizationV1Api(release.api_client)
    client = release.api_client
    objects: list[dict[str, Any]] = []
    selector = f"app.kubernetes.io/instance={release.name}"
    for kind, items in (
        ("ClusterRole", rbac.list_cluster_role(label_selector=selector).items),
        ("ClusterRoleBinding", rbac.list_cluster_role_binding(label_selector=selector).items),
        ("Role", rbac.list_namespaced_role(release.namespace, label_selector=selector).items),
        (
            "RoleBinding",
            rbac.list_namespaced_role_binding(release.namespace, label_selector=selector).items,
        ),
    ):
        for item in items:
            obj = client.sanitize_for_serialization(item)
            obj["kind"] = kind
            objects.append(obj)
    return objects


def test_helm_install_creates_every_object_on_the_api_server(release: Release) -> None:
    apps = kubernetes.client.AppsV1Api(release.api_client)
    core = kubernetes.client.CoreV1Api(release.api_client)
    deploy = apps.read_namespaced_deployment(f"{release.name}-operator", release.namespace)
    ds = apps.read_namespaced_daemon_set(f"{release.name}-agent", release.namespace)
    assert deploy.spec.replicas == 2
    assert ds.spec.template.spec.host_network is True
    assert ds.spec.template.spec.priority_class_name == "system-node-critical"
    agent = ds.spec.template.spec.containers[0].security_context
    assert sorted(agent.capabilities.add) == ["BPF", "NET_ADMIN", "PERFMON"]
    assert agent.app_armor_profile.type == "Unconfined"
    services = {s.metadata.name for s in core.list_namespaced_service(release.namespace).items}
    assert services == {f"{release.name}-operator-metrics", f"{release.name}-agent-metrics"}


def test_the_helm_test_pod_passes_server_side_validation(
    release: Release, control_plane: ControlPlane
) -> None:
    text = helm(
        "template",
        release.name,
        str(CHART),
        "--namespace",
        release.namespace,
        "--show-only",
        "templates/tests/test-operator-metrics.yaml",
    ).stdout
    control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=text)


@pytest.mark.parametrize("component", ["operator", "agent"])
def test_each_declared_access_is_allowed(release: Release, component: str) -> None:
    denied = [
        str(a)
        for a in required(component, release.values)
        if not allowed(release.api_client, release.namespace, release.sa(component), a)
    ]
    assert not denied, f"{component} lacks {denied}"


@pytest.mark.parametrize("component", ["operator", "agent"])
def test_nothing_beyond_the_declared_accesses_is_allowed(release: Release, component: str) -> None:
    """Every verb on every resource either component touches, at every scope: allowed exactly
    when declared."""
    needed = required(component, release.values)
    resources = {(a.group, a.resource, a.subresource) for a in (*OPERATOR, *AGENT)}
    wrong: list[str] = []
    for group, resource, sub in sorted(resources):
        for verb in VERBS:
            for where, name in (
                ("", ""),
                (release.namespace, ""),
                ("elsewhere", ""),
                (release.namespace, "stockade-operator"),
                (release.namespace, "another-name"),
            ):
                probe = Access(verb, group, resource, sub, Scope.ALL_NAMESPACES, name)
                expect = any(
                    (a.verb, a.group, a.resource, a.subresource) == (verb, group, resource, sub)
                    and a.name in ("", name)
                    and (a.scope is not Scope.RELEASE_NAMESPACE or where == release.namespace)
                    for a in needed
                )
                got = allowed(
                    release.api_client,
                    release.namespace,
                    release.sa(component),
                    probe,
                    in_namespace=where,
                )
                if got != expect:
                    wrong.append(f"{probe} in {where or 'all namespaces'}: allowed={got}")
    assert not wrong, f"{component}: " + "; ".join(wrong)


@pytest.mark.parametrize("component", ["operator", "agent"])
def test_sensitive_accesses_are_denied(release: Release, component: str) -> None:
    granted = [
        str(a)
        for a in FORBIDDEN
        if allowed(release.api_client, release.namespace, release.sa(component), a)
    ]
    assert not granted


def _rules_and_replace(release: Release, role: dict[str, Any]) -> tuple[list[Any], Any]:
    rbac = kubernetes.client.RbacAuthorizationV1Api(release.api_client)
    name = role["metadata"]["name"]
    if role["kind"] == "ClusterRole":

        def put(rules: list[Any]) -> None:
            current = rbac.read_cluster_role(name)
            current.rules = rules
            rbac.replace_cluster_role(name, current)
    else:

        def put(rules: list[Any]) -> None:
            current = rbac.read_namespaced_role(name, release.namespace)
            current.rules = rules
            rbac.replace_namespaced_role(name, release.namespace, current)

    return role["rules"], put


@pytest.mark.parametrize("component", ["operator", "agent"])
def test_removing_any_one_rule_breaks_a_declared_access(release: Release, component: str) -> None:
    needed = required(component, release.values)
    sa = release.sa(component)
    roles = roles_of(installed_objects(release), sa)
    assert roles, f"no roles bound to {sa}"

    def failing() -> list[Access]:
        return [a for a in needed if not allowed(release.api_client, release.namespace, sa, a)]

    useless: list[str] = []
    for role in roles:
        rules, put = _rules_and_replace(release, role)
        for index, rule in enumerate(rules):
            kept = [r for i, r in enumerate(copy.deepcopy(rules)) if i != index]
            put(kept)
            try:
                # RBAC sees the change as soon as its informer does: wait for a failure
                wait_for(
                    f"a declared access to fail without rule {index} of {role['kind']} "
                    f"{role['metadata']['name']}",
                    lambda: bool(failing()),
                    timeout=10,
                )
            except AssertionError:
                useless.append(f"{role['kind']} {role['metadata']['name']} rule {index}: {rule}")
            finally:
                put(rules)
                wait_for("the role to be restored", lambda: not failing())
    assert not useless, f"rules nothing declared needs: {useless}"


def test_the_agent_cannot_write_datapath_tables(release: Release) -> None:
    for verb in ("create", "update", "patch", "delete"):
        access = Access(verb, "stockade.io", "datapathtables")
        assert not allowed(release.api_client, release.namespace, release.sa("agent"), access)
    status_update = Access("update", "stockade.io", "datapathtables", "status")
    assert not allowed(release.api_client, release.namespace, release.sa("agent"), status_update)
