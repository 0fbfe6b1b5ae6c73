"""The chart's RBAC, proven with the real operator and agents: with exactly the chart's roles
they run the whole scenario, and without any one rule some step of it fails.

Only the chart's RBAC objects, its agent admission policy and CRDs are applied (helm template);
the operator and one agent per node run as processes whose kubeconfigs carry TokenRequest tokens
of the chart's ServiceAccounts (each agent's bound to an agent Pod on its node, as kubelet binds
it, so that the admission policy lets it write its own node's tables). The scenario (2-node
topology; web and a ghost pod without an interface on node 1, client and other on node 2): the
operator takes its Lease in the release namespace, publishes DatapathTables for a standard
NetworkPolicy, a stockade NetworkPolicy and an upstream ClusterNetworkPolicy (whose CRD is
installed after the operator started), writes Accepted and Programmed, and posts the Programmed
Event of the standard policy; each agent attaches its programs and reports on
`<node>.program.0`; node 1's agent posts an Event on the ghost pod; a probe shows that only
client reaches web.

Then each rule of the chart's roles is removed in turn, the component that holds it restarted,
and the step that needs the rule fails as it should, while the component itself says why (a
403 in its log). `RULES` names, for every rule the chart renders, the step that needs it; a
rule without a step fails `test_every_rule_of_the_chart_has_a_step_that_needs_it`.
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

from stockade.sandbox import netns
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.node.registration import register_node, register_pod
from stockade.sandbox.topology import Topology
from stockade.sandbox.upstream import CRD_NAMES, install_upstream_crds, upstream_crd_manifests
from stockade.sandbox.workloads.traffic import Outcome, PodProcesses
from tests.chart.rbac_stack import (
    GROUP,
    PORT,
    UPSTREAM_GROUP,
    UPSTREAM_VERSION,
    VERSION,
    RbacStack,
    chart_objects,
    k8s,
    mint_kubeconfig,
    register_agent_pod,
    sample_access,
    wait_equal,
    wait_logged,
)
from tests.fixtures.controlplane import wait_for

UPSTREAM_CRD = CRD_NAMES[0]
ENFORCED = {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
OPEN = {"client": Outcome.CONNECTED, "other": Outcome.CONNECTED}
NETPOL = "NetworkPolicy.networking.k8s.io"
SNP = "NetworkPolicy.stockade.io"
UCNP = "ClusterNetworkPolicy.policy.networking.k8s.io"
FORBIDDEN = "Forbidden"
PODS = {"web": ("node-1", "web"), "ghost": ("node-1", "web")}
PODS |= {"client": ("node-2", "client"), "other": ("node-2", "other")}
BASE = f"p{PORT}"
PROGRAMMED = {"Accepted": "True", "Programmed": "True"}


# -- the world ------------------------------------------------------------------------------


def _crd_exists(admin: Any, name: str) -> bool:
    try:
        k8s("ApiextensionsV1Api", admin).read_custom_resource_definition(name)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def remove_upstream_crd(admin: Any) -> None:
    """Delete the upstream CRD (and so every upstream policy) and wait until it is gone."""
    if _crd_exists(admin, UPSTREAM_CRD):
        k8s("ApiextensionsV1Api", admin).delete_custom_resource_definition(UPSTREAM_CRD)
    wait_for(f"CRD {UPSTREAM_CRD} deleted", lambda: not _crd_exists(admin, UPSTREAM_CRD))


def _build(stack: RbacStack) -> None:
    """Nodes and pods in the topology and in the API; web serves; the ghost loses its veth."""
    admin, ns, topo = stack.admin, stack.workload_namespace, stack.topology
    for node in topo.nodes:
        register_node(admin, dataclasses.replace(node, name=stack.node_names[node.name]))
    for name, (where, role) in PODS.items():
        pod = topo.add_pod(f"{ns}/{name}", where)
        in_api = dataclasses.replace(pod, node=stack.node_names[where])
        register_pod(admin, ns, name, in_api, {"role": role}, [("http", PORT, "TCP")])
    ghost = topo.pods[f"{ns}/ghost"]
    with netns.ipr(topo.node("node-1").netns) as ip:
        ip.link("del", index=netns.link_index(ip, ghost.host_ifname))
    stack.procs.serve(f"{ns}/web", [(PORT, "TCP")])


def _delete_quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _remove_api_objects(stack: RbacStack, crds_found: bool) -> None:
    admin, ns = stack.admin, stack.workload_namespace
    core = k8s("CoreV1Api", admin)
    objects = k8s("CustomObjectsApi", admin)
    rbac = k8s("RbacAuthorizationV1Api", admin)
    for pod in PODS:
        _delete_quietly(core.delete_namespaced_pod, pod, ns, grace_period_seconds=0)
    for node in stack.topology.nodes:
        _delete_quietly(
            core.delete_namespaced_pod,
            f"agent-{node.name}",
            stack.release_namespace,
            grace_period_seconds=0,
        )
    for obj in objects.list_namespaced_custom_object(GROUP, VERSION, ns, "networkpolicies")[
        "items"
    ]:
        _delete_quietly(
            objects.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            "networkpolicies",
            obj["metadata"]["name"],
        )
    networking = k8s("NetworkingV1Api", admin)
    for np in networking.list_namespaced_network_policy(ns).items:
        _delete_quietly(networking.delete_namespaced_network_policy, np.metadata.name, ns)
    for node in stack.node_names.values():
        tables = objects.list_cluster_custom_object(
            GROUP, VERSION, "datapathtables", label_selector=f"stockade.io/node={node}"
        )["items"]
        for table in tables:
            _delete_quietly(
                objects.delete_cluster_custom_object,
                GROUP,
                VERSION,
                "datapathtables",
                table["metadata"]["name"],
            )
        _delete_quietly(core.delete_node, node)
    selector = f"app.kubernetes.io/instance={stack.release}"
    for role in rbac.list_cluster_role(label_selector=selector).items:
        rbac.delete_cluster_role(role.metadata.name)
    for binding in rbac.list_cluster_role_binding(label_selector=selector).items:
        rbac.delete_cluster_role_binding(binding.metadata.name)
    admission = k8s("AdmissionregistrationV1Api", admin)
    for vapb in admission.list_validating_admission_policy_binding(label_selector=selector).items:
        admission.delete_validating_admission_policy_binding(vapb.metadata.name)
    for vap in admission.list_validating_admission_policy(label_selector=selector).items:
        admission.delete_validating_admission_policy(vap.metadata.name)
    for namespace in (ns, stack.release_namespace):
        _delete_quietly(core.delete_namespace, namespace)
    if crds_found:
        install_upstream_crds(admin, upstream_crd_manifests())
    else:
        remove_upstream_crd(admin)


@pytest.fixture(scope="module")
def private_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of this module's own. The scenario asserts that no component is refused
    anything, so it must not see other tests' leftovers: their namespaces may still be
    Terminating (a Pod bound to a node waits for a kubelet to confirm its deletion), and the API
    server refuses new Events there with 403."""
    plane = ControlPlane(tmp_path_factory.mktemp("rbac-plane"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def stack(
    private_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RbacStack]:
    control_plane = private_plane
    suffix = secrets.token_hex(3)
    release = f"stockade-{suffix}"
    release_namespace = f"{release}-system"
    workdir = tmp_path_factory.mktemp("rbac-e2e")
    rbac, crds = chart_objects(release, release_namespace)
    with control_plane.api_client() as admin:
        core = k8s("CoreV1Api", admin)
        upstream_found = _crd_exists(admin, UPSTREAM_CRD)
        remove_upstream_crd(admin)  # installed mid-scenario: the operator must notice it
        install_upstream_crds(admin, crds)  # the chart's own CRDs
        for name in (release_namespace, f"rbac-{suffix}"):
            core.create_namespace({"metadata": {"name": name}})
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
        topology = Topology.create(nodes=2)
        procs = PodProcesses(topology)
        stack = RbacStack(
            plane=control_plane,
            admin=admin,
            workdir=workdir,
            release=release,
            release_namespace=release_namespace,
            workload_namespace=f"rbac-{suffix}",
            roles=[o for o in rbac if o["kind"] in ("Role", "ClusterRole")],
            topology=topology,
            procs=procs,
            node_names={n.name: f"rbac-{suffix}-{n.index}" for n in topology.nodes},
        )
        try:
            stack.kubeconfigs["operator"] = mint_kubeconfig(
                control_plane,
                release_namespace,
                f"{release}-operator",
                workdir / "operator.kubeconfig",
            )
            _build(stack)
            agent_sa = f"{release}-agent"
            for node in topology.nodes:
                in_api = dataclasses.replace(node, name=stack.node_names[node.name])
                pod = f"agent-{node.name}"
                uid = register_agent_pod(admin, release_namespace, pod, in_api, agent_sa)
                stack.kubeconfigs[f"agent/{node.name}"] = mint_kubeconfig(
                    control_plane,
                    release_namespace,
                    agent_sa,
                    workdir / f"agent-{node.name}.kubeconfig",
                    pod=(pod, uid),
                )
            yield stack
        finally:
            stack.close()
            procs.close()
            try:
                _remove_api_objects(stack, upstream_found)
            finally:
                topology.destroy()


# -- scenario steps -------------------------------------------------------------------------


def tag_port(tag: str) -> int:
    """Each step's policies decide traffic to a port of their own ("p<port>"): a rule that
    decides nothing (shadowed by an equal rule of another policy) has no entry in the tables."""
    return int(tag.removeprefix("p"))


def create_policies(stack: RbacStack, tag: str) -> None:
    """A standard NetworkPolicy that lets client reach web on the tag's port and a stockade
    NetworkPolicy that denies other there (both isolate web: 8080 stays client-only)."""
    ns, port = stack.workload_namespace, tag_port(tag)
    spec = {"podSelector": {"matchLabels": {"role": "web"}}, "policyTypes": ["Ingress"]}
    standard = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np-{tag}", "namespace": ns},
        "spec": {
            **spec,
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                    "ports": [{"port": port}],
                }
            ],
        },
    }
    k8s("NetworkingV1Api", stack.admin).create_namespaced_network_policy(ns, standard)
    ours = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"snp-{tag}", "namespace": ns},
        "spec": {
            **spec,
            "ingress": [
                {
                    "action": "Deny",
                    "from": [{"podSelector": {"matchLabels": {"role": "other"}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }
            ],
        },
    }
    k8s("CustomObjectsApi", stack.admin).create_namespaced_custom_object(
        GROUP, VERSION, ns, "networkpolicies", ours
    )


def create_upstream_policy(stack: RbacStack, tag: str) -> None:
    """A Baseline upstream ClusterNetworkPolicy that accepts the workload namespace on the
    tag's port: it decides only for node 2's pods (web is isolated before the Baseline tier),
    where traffic is open anyway, so it changes no probe."""
    own = {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": stack.workload_namespace}}}
    rule = {
        "name": "own-namespace",
        "action": "Accept",
        "from": [own],
        "protocols": [{"tcp": {"destinationPort": {"number": tag_port(tag)}}}],
    }
    body = {
        "apiVersion": f"{UPSTREAM_GROUP}/{UPSTREAM_VERSION}",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": f"ucnp-{tag}"},
        "spec": {"tier": "Baseline", "priority": 50, "subject": own, "ingress": [rule]},
    }
    k8s("CustomObjectsApi", stack.admin).create_cluster_custom_object(
        UPSTREAM_GROUP, UPSTREAM_VERSION, "clusternetworkpolicies", body
    )


def published(stack: RbacStack, tag: str) -> set[str]:
    """Which of the tag's policies have rules in the published tables (np and snp select web
    on node 1; ucnp decides only for node 2's pods, which no namespaced policy isolates)."""
    names = {f"np-{tag}": NETPOL, f"snp-{tag}": SNP, f"ucnp-{tag}": UCNP}
    rules = stack.published_rules("node-1") | stack.published_rules("node-2")
    return {name for kind, name in rules if names.get(name) == kind}


def snp_conditions(stack: RbacStack, tag: str) -> dict[str, str]:
    return stack.conditions(GROUP, VERSION, "networkpolicies", f"snp-{tag}")


def ucnp_conditions(stack: RbacStack, tag: str) -> dict[str, str]:
    return stack.conditions(
        UPSTREAM_GROUP, UPSTREAM_VERSION, "clusternetworkpolicies", f"ucnp-{tag}"
    )


def programmed_event(stack: RbacStack, tag: str) -> bool:
    events = stack.events(stack.workload_namespace, f"np-{tag}")
    return ("Normal", "Programmed", "stockade-operator") in events


def ghost_event(stack: RbacStack) -> bool:
    events = stack.events(stack.workload_namespace, "ghost")
    return ("Warning", "InterfaceNotFound", "stockade-agent") in events


def ghost_reported(stack: RbacStack) -> bool:
    errors = stack.report("node-1").get("errors") or []
    return any(stack.pod_ip("ghost") in e for e in errors)


# -- the scenario with the chart's RBAC -----------------------------------------------------


def test_the_operator_and_agents_run_the_whole_scenario_as_the_charts_service_accounts(
    stack: RbacStack,
) -> None:
    operator = stack.start_operator()
    for node in ("node-1", "node-2"):
        stack.start_agent(node)
    wait_for("the operator to hold the Lease", lambda: stack.lease_holder() == operator.identity)
    create_policies(stack, BASE)
    # The upstream CRD arrives after the operator started: the operator notices it.
    install_upstream_crds(stack.admin, upstream_crd_manifests())
    create_upstream_policy(stack, BASE)

    want = {f"np-{BASE}", f"snp-{BASE}", f"ucnp-{BASE}"}
    wait_equal("every policy published", lambda: published(stack, BASE), want)
    wait_for("both agents to apply", lambda: all(stack.applied(n) for n in ("node-1", "node-2")))
    wait_for("snp programmed", lambda: snp_conditions(stack, BASE) == PROGRAMMED)
    wait_for("ucnp programmed", lambda: ucnp_conditions(stack, BASE) == PROGRAMMED)
    wait_for("the Programmed Event of np", lambda: programmed_event(stack, BASE))
    wait_for("the Event on the ghost pod", lambda: ghost_event(stack))

    report = stack.report("node-1")
    assert report["endpointsAttached"] == 1  # web; the ghost has no interface
    assert ghost_reported(stack)
    assert stack.report("node-2")["endpointsAttached"] == 2
    assert all(stack.programs_on("web").values())
    assert stack.probe() == ENFORCED
    assert stack.lease_holder() == operator.identity
    for process in (operator, *stack.agents.values()):
        assert FORBIDDEN not in process.text(), f"{process.identity} was refused something"


# -- each rule, removed ---------------------------------------------------------------------


def operator_never_publishes(needle: str) -> Callable[[RbacStack, str], None]:
    """The operator cannot prime (or cannot lead): new policies never reach the tables and no
    status is written."""

    def step(stack: RbacStack, tag: str) -> None:
        operator = stack.start_operator()
        create_policies(stack, tag)
        log = wait_logged(operator, needle, f"{operator.identity} to log {needle!r} twice", 2)
        assert FORBIDDEN in log
        assert published(stack, tag) == set()
        assert snp_conditions(stack, tag) == {}
        assert not programmed_event(stack, tag)

    return step


def operator_without_lease(needle: str) -> Callable[[RbacStack, str], None]:
    """No Lease, no leadership, nothing published (the Lease was deleted with the replica
    before: the new one must read, create and renew it)."""
    never = operator_never_publishes(needle)

    def step(stack: RbacStack, tag: str) -> None:
        never(stack, tag)
        assert stack.lease_holder() is None

    return step


def operator_writes_no_status(stack: RbacStack, tag: str) -> None:
    operator = stack.start_operator()
    create_policies(stack, tag)
    wait_for(
        "np and snp in node 1's tables",
        lambda: published(stack, tag) == {f"np-{tag}", f"snp-{tag}"},
    )
    wait_for("node 1's agent to apply them", lambda: stack.applied("node-1"))
    log = wait_logged(operator, "reconcile failed", "the status write to be refused twice", 2)
    assert FORBIDDEN in log
    assert snp_conditions(stack, tag) == {}


def operator_posts_no_event(stack: RbacStack, tag: str) -> None:
    operator = stack.start_operator()
    create_policies(stack, tag)
    wait_for(f"snp-{tag} programmed", lambda: snp_conditions(stack, tag) == PROGRAMMED)
    wait_logged(operator, f"'np-{tag}'): {FORBIDDEN}", "the Event on np to be refused")
    assert not programmed_event(stack, tag)
    assert published(stack, tag) == {f"np-{tag}", f"snp-{tag}"}


def operator_misses_the_upstream_crd(stack: RbacStack, tag: str) -> None:
    """kopf cannot watch CRDs: the upstream CRD installed after the start goes unnoticed."""
    remove_upstream_crd(stack.admin)
    operator = stack.start_operator()
    crds = "customresourcedefinitions -> APIForbiddenError"
    wait_logged(operator, crds, "kopf's watch of CRDs to be refused twice", 2)
    wait_for("the operator to hold the Lease", lambda: stack.lease_holder() == operator.identity)
    install_upstream_crds(stack.admin, upstream_crd_manifests())
    create_upstream_policy(stack, tag)
    create_policies(stack, tag)
    wait_for(f"snp-{tag} programmed", lambda: snp_conditions(stack, tag) == PROGRAMMED)
    # created before snp-{tag}, and the baseline saw it published before its status: not here
    assert published(stack, tag) == {f"np-{tag}", f"snp-{tag}"}
    assert ucnp_conditions(stack, tag) == {}


def operator_writes_no_upstream_status(stack: RbacStack, tag: str) -> None:
    operator = stack.start_operator()
    create_upstream_policy(stack, tag)
    create_policies(stack, tag)
    want = {f"np-{tag}", f"snp-{tag}", f"ucnp-{tag}"}
    wait_for("every policy in node 1's tables", lambda: published(stack, tag) == want)
    log = wait_logged(operator, "reconcile failed", "the status write to be refused twice", 2)
    assert FORBIDDEN in log
    assert ucnp_conditions(stack, tag) == {}


def agent_attaches_nothing(stack: RbacStack, tag: str) -> None:
    stack.clear_report("node-1")
    agent = stack.start_agent("node-1", fresh_pins=True)
    log = wait_logged(agent, "failed (retry in", "the agent's watch to be refused twice", 2)
    assert FORBIDDEN in log
    assert stack.programs_on("web") == {"ingress": [], "egress": []}
    assert stack.probe() == OPEN
    assert stack.report("node-1") == {}


def agent_reports_nothing(stack: RbacStack, tag: str) -> None:
    stack.clear_report("node-1")
    agent = stack.start_agent("node-1", fresh_pins=True)
    log = wait_logged(agent, "sync failed", "the agent's report to be refused twice", 2)
    assert FORBIDDEN in log
    assert all(stack.programs_on("web").values())
    assert stack.probe() == ENFORCED
    assert stack.report("node-1") == {}


def agent_posts_no_event(needle: str) -> Callable[[RbacStack, str], None]:
    """The ghost's failure is reported, web is enforced, but the ghost gets no Event."""

    def step(stack: RbacStack, tag: str) -> None:
        stack.stop_agent("node-1")  # before the Events go: it may be posting one
        stack.delete_events(stack.workload_namespace, "ghost")
        stack.clear_report("node-1")
        agent = stack.start_agent("node-1", fresh_pins=True)
        wait_for("node 1's report with the ghost's error", lambda: ghost_reported(stack))
        log = wait_logged(agent, needle, f"the agent to log {needle!r}")
        assert FORBIDDEN in log
        assert not ghost_event(stack)
        assert all(stack.programs_on("web").values())
        assert stack.probe() == ENFORCED

    return step


@dataclass(frozen=True)
class Rule:
    """One rule of the chart's roles and the scenario step that fails without it."""

    id: str
    component: str  # whose ServiceAccount the role is bound to
    role: tuple[str, str]  # (kind, name suffix)
    group: str
    resources: tuple[str, ...]
    step: Callable[[RbacStack, str], None]
    named: bool = False  # the rule has resourceNames

    def matches(self, rule: dict[str, Any]) -> bool:
        return (
            rule["apiGroups"] == [self.group]
            and sorted(rule["resources"]) == sorted(self.resources)
            and bool(rule.get("resourceNames")) == self.named
        )


OPERATOR_ROLE = ("ClusterRole", "-operator")
LEASE_ROLE = ("Role", "-operator-leader-election")
AGENT_ROLE = ("ClusterRole", "-agent")
RECONCILE = "reconcile failed"
RULES = [
    Rule(
        "operator-list-stockade-policies-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "stockade.io",
        ("networkpolicies", "clusternetworkpolicies"),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-patch-stockade-policy-status-or-no-status",
        "operator",
        OPERATOR_ROLE,
        "stockade.io",
        ("networkpolicies/status", "clusternetworkpolicies/status"),
        operator_writes_no_status,
    ),
    Rule(
        "operator-list-standard-networkpolicies-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "networking.k8s.io",
        ("networkpolicies",),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-list-upstream-policies-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "policy.networking.k8s.io",
        ("clusternetworkpolicies",),
        operator_never_publishes(RECONCILE),
    ),
    # The Service space (on by default): a new leader lists Services, EndpointSlices and
    # ServiceCIDRs before its first publish, so without any of them it never publishes.
    Rule(
        "operator-list-services-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "",
        ("services",),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-list-endpointslices-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "discovery.k8s.io",
        ("endpointslices",),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-list-servicecidrs-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "networking.k8s.io",
        ("servicecidrs",),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-patch-upstream-policy-status-or-no-status",
        "operator",
        OPERATOR_ROLE,
        "policy.networking.k8s.io",
        ("clusternetworkpolicies/status",),
        operator_writes_no_upstream_status,
    ),
    Rule(
        "operator-watch-crds-or-the-upstream-crd-goes-unnoticed",
        "operator",
        OPERATOR_ROLE,
        "apiextensions.k8s.io",
        ("customresourcedefinitions",),
        operator_misses_the_upstream_crd,
    ),
    Rule(
        "operator-list-pods-namespaces-nodes-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "",
        ("pods", "namespaces", "nodes"),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-write-datapathtables-or-it-never-publishes",
        "operator",
        OPERATOR_ROLE,
        "stockade.io",
        ("datapathtables",),
        operator_never_publishes(RECONCILE),
    ),
    Rule(
        "operator-create-events-or-the-programmed-event-is-missing",
        "operator",
        OPERATOR_ROLE,
        "",
        ("events",),
        operator_posts_no_event,
    ),
    Rule(
        "operator-create-leases-or-no-lease",
        "operator",
        LEASE_ROLE,
        "coordination.k8s.io",
        ("leases",),
        operator_without_lease("could not renew"),
    ),
    Rule(
        "operator-get-update-its-lease-or-no-lease",
        "operator",
        LEASE_ROLE,
        "coordination.k8s.io",
        ("leases",),
        operator_without_lease("could not renew"),
        named=True,
    ),
    Rule(
        "agent-watch-datapathtables-or-no-attach",
        "agent",
        AGENT_ROLE,
        "stockade.io",
        ("datapathtables",),
        agent_attaches_nothing,
    ),
    Rule(
        "agent-patch-datapathtable-status-or-no-report",
        "agent",
        AGENT_ROLE,
        "stockade.io",
        ("datapathtables/status",),
        agent_reports_nothing,
    ),
    Rule(
        "agent-list-pods-or-no-event",
        "agent",
        AGENT_ROLE,
        "",
        ("pods",),
        agent_posts_no_event("sync failed"),
    ),
    Rule(
        "agent-create-events-or-no-event",
        "agent",
        AGENT_ROLE,
        "",
        ("events",),
        agent_posts_no_event("could not post InterfaceNotFound"),
    ),
]


def test_every_rule_of_the_chart_has_a_step_that_needs_it(stack: RbacStack) -> None:
    rendered = [
        (role["kind"], role["metadata"]["name"], rule)
        for role in stack.roles
        for rule in role["rules"]
    ]
    unmatched = [
        f"{kind} {name}: {rule}"
        for kind, name, rule in rendered
        if not any(
            r.matches(rule) and kind == r.role[0] and name.endswith(r.role[1]) for r in RULES
        )
    ]
    assert not unmatched, f"rules without a scenario step: {unmatched}"
    assert len(RULES) == len(rendered)


def _rule_index(stack: RbacStack, case: Rule) -> tuple[dict[str, Any], int]:
    role = stack.role(*case.role)
    (index,) = [i for i, rule in enumerate(role["rules"]) if case.matches(rule)]
    return role, index


def _recover(stack: RbacStack, case: Rule, tag: str) -> None:
    """With the whole role back, a restarted component does what the step needed."""
    if case.component == "operator":
        operator = stack.start_operator()
        wait_for("the Lease", lambda: stack.lease_holder() == operator.identity)
        wait_for("the step's policies published", lambda: f"snp-{tag}" in published(stack, tag))
        wait_for(f"snp-{tag} programmed", lambda: snp_conditions(stack, tag) == PROGRAMMED)
    else:
        stack.start_agent("node-1")
        wait_for("node 1's agent to apply and report", lambda: stack.applied("node-1"))
        wait_for("web's programs attached", lambda: all(stack.programs_on("web").values()))
        wait_for("the Event on the ghost pod", lambda: ghost_event(stack))


@pytest.mark.parametrize("case", RULES, ids=[r.id for r in RULES])
def test_without_the_rule_the_step_that_needs_it_fails(stack: RbacStack, case: Rule) -> None:
    role, index = _rule_index(stack, case)
    rules = role["rules"]
    access = sample_access(role, rules[index], stack.release_namespace)
    tag = f"p{9100 + RULES.index(case)}"
    stack.put_rules(role, [r for i, r in enumerate(rules) if i != index])
    try:
        wait_for(f"RBAC to refuse {access}", lambda: not stack.may(case.component, access))
        case.step(stack, tag)
    finally:
        stack.put_rules(role, rules)
        wait_for(f"RBAC to allow {access}", lambda: stack.may(case.component, access))
    _recover(stack, case, tag)
    if case.step is operator_misses_the_upstream_crd:
        upstream = f"ucnp-{tag}"
        wait_for(
            "the upstream policy published after all", lambda: upstream in published(stack, tag)
        )
