"""The agent's node scope, proven on a real API server: the chart's ValidatingAdmissionPolicy
lets a node's agent write the status of its own node's DatapathTable and refuses it another
node's, and refuses a token that names no node.

The chart's RBAC objects, admission policy and CRDs are applied (helm template) to the session's
control plane; two Nodes are registered, with an agent Pod on node A, and the operator's part is
played by the admin client (it creates `<A>.program.0` and `<B>.program.0`). The agent's tokens
are minted with TokenRequest: one bound to the agent Pod, as kubelet mints a pod's projected
token (the API server puts the Pod's node in the user extra
`authentication.kubernetes.io/node-name`), and one bound to nothing. RBAC grants the agent patch
on every table's status: each refusal here is the policy's, which the tests check by its message
and by asking RBAC (SubjectAccessReview) that it would have allowed the request. With RBAC
widened to patch the tables themselves, the policy still refuses the agent every write but a
status write.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.node.registration import register_node
from stockade.sandbox.topology import node_net
from stockade.sandbox.upstream import install_upstream_crds
from tests.chart.access import Access
from tests.chart.rbac import allowed
from tests.chart.rbac_stack import (
    GROUP,
    MERGE_PATCH,
    VERSION,
    chart_objects,
    k8s,
    mint_token,
    register_agent_pod,
)
from tests.fixtures.controlplane import wait_for

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
FORBIDDEN = 403
NOT_FOUND = 404
PATCH_STATUS = Access("patch", GROUP, "datapathtables", "status")


@dataclass
class Scope:
    """The applied chart objects, the two nodes' tables and the agent's two tokens."""

    plane: ControlPlane
    admin: Any
    release: str
    namespace: str
    node_a: str
    node_b: str
    policy: str
    bound_token: str  # bound to the agent Pod on node A
    unbound_token: str  # bound to nothing

    def table(self, node: str) -> str:
        return handoff.program_name(node)

    def patch_status(self, token: str, node: str, generation: int, dry_run: bool = False) -> Any:
        """Patch `node`'s program object's status as the agent does, with `token`."""
        with self.plane.api_client(token=token) as client:
            return k8s("CustomObjectsApi", client).patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                "datapathtables",
                self.table(node),
                {"status": {"appliedGeneration": generation, "endpointsAttached": 0}},
                _content_type=MERGE_PATCH,
                dry_run="All" if dry_run else None,
            )

    def refusal(self, token: str, node: str, generation: int) -> ApiException:
        """The API server's refusal of that patch; fails when it is allowed."""
        with pytest.raises(ApiException) as caught:
            self.patch_status(token, node, generation)
        return caught.value

    def applied(self, node: str) -> int | None:
        obj = k8s("CustomObjectsApi", self.admin).get_cluster_custom_object(
            GROUP, VERSION, "datapathtables", self.table(node)
        )
        value = (obj.get("status") or {}).get("appliedGeneration")
        return None if value is None else int(value)

    def who_am_i(self, token: str) -> dict[str, list[str]]:
        """The user extra the API server authenticates `token` to (SelfSubjectReview)."""
        with self.plane.api_client(token=token) as client:
            review = k8s("AuthenticationV1Api", client).create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
            )
        extra: dict[str, list[str]] = review.status.user_info.extra or {}
        return extra


def _table(node: str) -> dict[str, Any]:
    body: dict[str, Any] = handoff.TableObject(
        handoff.program_name(node), node, handoff.PROGRAM, 0, 1, 1, handoff.digest(())
    ).body()
    return body


def _policy_refuses_a_dry_run(scope: Scope) -> bool:
    """The policy is in force (bindings reach the API server's admission a moment after they
    are created): a dry run of a write to node B's table is refused by it."""
    try:
        scope.patch_status(scope.bound_token, scope.node_b, 1, dry_run=True)
    except ApiException as exc:
        return exc.status == FORBIDDEN and scope.policy in str(exc.body)
    return False


def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Delete something that may already be gone (or never was made: setup may have failed)."""
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        if exc.status != NOT_FOUND:
            raise


@pytest.fixture(scope="module")
def scope(control_plane: ControlPlane) -> Iterator[Scope]:
    suffix = secrets.token_hex(3)
    release = f"stockade-scope-{suffix}"  # names the chart's objects "<release>-<component>"
    namespace = f"{release}-system"
    objects, crds = chart_objects(release, namespace)
    (policy,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    nodes = [
        dataclasses.replace(node_net(suffix, i), name=f"scope-{suffix}-{n}")
        for i, n in ((1, "a"), (2, "b"))
    ]
    with control_plane.api_client() as admin:
        core = k8s("CoreV1Api", admin)
        objs = k8s("CustomObjectsApi", admin)
        install_upstream_crds(admin, crds)
        core.create_namespace({"metadata": {"name": namespace}})
        try:
            control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
            for node in nodes:
                register_node(admin, node)
                table = _table(node.name)
                objs.create_cluster_custom_object(GROUP, VERSION, "datapathtables", table)
            agent_sa = f"{release}-agent"
            uid = register_agent_pod(admin, namespace, "agent-a", nodes[0], agent_sa)
            world = Scope(
                plane=control_plane,
                admin=admin,
                release=release,
                namespace=namespace,
                node_a=nodes[0].name,
                node_b=nodes[1].name,
                policy=policy["metadata"]["name"],
                bound_token=mint_token(admin, namespace, agent_sa, ("agent-a", uid)),
                unbound_token=mint_token(admin, namespace, agent_sa),
            )
            wait_for("the admission policy in force", lambda: _policy_refuses_a_dry_run(world))
            yield world
        finally:
            control_plane.kubectl(
                "delete", "--ignore-not-found", "-f", "-", input=yaml.safe_dump_all(objects)
            )
            _quietly(core.delete_namespaced_pod, "agent-a", namespace, grace_period_seconds=0)
            for node in nodes:
                _quietly(
                    objs.delete_cluster_custom_object,
                    GROUP,
                    VERSION,
                    "datapathtables",
                    handoff.program_name(node.name),
                )
                _quietly(core.delete_node, node.name)
            _quietly(core.delete_namespace, namespace)


def test_a_pod_bound_token_names_the_pods_node_and_a_plain_one_none(scope: Scope) -> None:
    assert scope.who_am_i(scope.bound_token).get(NODE_NAME_EXTRA) == [scope.node_a]
    assert NODE_NAME_EXTRA not in scope.who_am_i(scope.unbound_token)


def test_rbac_alone_lets_the_agent_patch_every_tables_status(scope: Scope) -> None:
    """So the refusals below are the admission policy's, not RBAC's."""
    assert allowed(scope.admin, scope.namespace, f"{scope.release}-agent", PATCH_STATUS)


def test_the_agent_patches_its_own_nodes_table(scope: Scope) -> None:
    scope.patch_status(scope.bound_token, scope.node_a, 7)
    assert scope.applied(scope.node_a) == 7


def test_the_agent_is_refused_another_nodes_table(scope: Scope) -> None:
    exc = scope.refusal(scope.bound_token, scope.node_b, 8)
    assert exc.status == FORBIDDEN
    body = str(exc.body)
    assert scope.policy in body
    want = f"the stockade agent of node {scope.node_a} may not write DatapathTable "
    assert f"{want}{scope.table(scope.node_b)} (node {scope.node_b})" in body
    assert scope.applied(scope.node_b) is None


def test_a_token_bound_to_no_node_is_refused_even_its_own_table(scope: Scope) -> None:
    for node in (scope.node_a, scope.node_b):
        exc = scope.refusal(scope.unbound_token, node, 9)
        assert exc.status == FORBIDDEN
        assert scope.policy in str(exc.body)
        assert "token is bound to no node" in str(exc.body)
    assert scope.applied(scope.node_a) != 9
    assert scope.applied(scope.node_b) is None


@pytest.fixture
def widened_rbac(scope: Scope) -> Iterator[None]:
    """The agent's ServiceAccount may also patch DatapathTables themselves (a role someone
    added by mistake): only the admission policy stands in the way."""
    rbac = k8s("RbacAuthorizationV1Api", scope.admin)
    name = f"{scope.release}-widened"
    sa = f"{scope.release}-agent"
    rbac.create_cluster_role(
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [GROUP], "resources": ["datapathtables"], "verbs": ["patch"]}],
        }
    )
    try:
        rbac.create_cluster_role_binding(
            {
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": scope.namespace}],
            }
        )
        patch = Access("patch", GROUP, "datapathtables")
        wait_for(
            "RBAC to allow the patch", lambda: allowed(scope.admin, scope.namespace, sa, patch)
        )
        yield
    finally:
        _quietly(rbac.delete_cluster_role_binding, name)
        _quietly(rbac.delete_cluster_role, name)


@pytest.mark.usefixtures("widened_rbac")
def test_with_rbac_widened_the_agent_still_writes_no_tables_spec_even_its_own(
    scope: Scope,
) -> None:
    with (
        scope.plane.api_client(token=scope.bound_token) as client,
        pytest.raises(ApiException) as caught,
    ):
        k8s("CustomObjectsApi", client).patch_cluster_custom_object(
            GROUP,
            VERSION,
            "datapathtables",
            scope.table(scope.node_a),
            {"spec": {"generation": 99}},
            _content_type=MERGE_PATCH,
        )
    assert caught.value.status == FORBIDDEN, caught.value.body
    assert scope.policy in str(caught.value.body)
    assert "may only write the status of DatapathTables" in str(caught.value.body)
