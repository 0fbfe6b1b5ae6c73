"""The operator against a real API server: it publishes DatapathTables that decode to exactly the
lowering of the cluster state, rewrites only what a change touches, reports policy status, and
after a restart rewrites nothing.

The operator runs in-process (`OperatorThread`: kopf in a thread with its own event loop). Nodes
and pods are registered as the sandbox kubelet would; no network namespaces are needed. The
expected tables are `lower_node()` of the state read back from the API server; ids are compared
by meaning (endpoint id → its addresses, class id → its networks, rule id → its RuleInfo),
because ids depend on the history of lowerings, not only on the state.
"""

from __future__ import annotations

import dataclasses
import gc
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest

from stockade import handoff
from stockade.compiler import abi, ir
from stockade.compiler.lower import lower_node
from stockade.control.app import Operator
from stockade.control.config import OperatorConfig
from stockade.control.objects import namespace_from_api, node_from_api, pod_from_api
from stockade.control.policies import parse_record
from stockade.model.cluster import ClusterState
from stockade.model.crd_schema import GROUP, VERSION
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.node.registration import register_node, register_pod, set_pod_labels
from stockade.sandbox.topology import NodeNet, PodNet, node_net
from tests.fixtures.controlplane import no_namespace_terminating, wait_for

PLURAL = "datapathtables"


class OperatorThread:
    """One operator replica running in a thread until `stop()`."""

    def __init__(
        self, plane: ControlPlane, lease: str, identity: str, inline_entries: int = 0
    ) -> None:
        config = OperatorConfig(
            kubeconfig=str(plane.kubeconfig),
            identity=identity,
            lease_namespace="default",
            lease_name=lease,
            lease_duration=3.0,
            renew_period=0.5,
            inline_entries=inline_entries,
        )
        self.operator = Operator(config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.operator.run, args=(self._stop,), daemon=True)
        self._thread.start()

    @property
    def writes(self) -> int:
        return self.operator.reconciler.publisher.writes

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the operator did not stop"


@pytest.fixture
def operators(
    control_plane: ControlPlane, crds: None, api_client: Any
) -> Iterator[list[OperatorThread]]:
    """Start replicas with `start(identity)`; all are stopped after the test. Earlier tests'
    namespaces are gone first: their deletion would be writes of this test's operators."""
    no_namespace_terminating(api_client)
    started: list[OperatorThread] = []
    yield started
    for op in started:
        op.stop()
    # A connection the stopped operator left open would warn whenever the collector finds it,
    # in some later test; collect now so that the warning (an error here) names this test.
    gc.collect()


def start(
    plane: ControlPlane,
    started: list[OperatorThread],
    lease: str,
    identity: str,
    inline_entries: int = 0,
) -> Any:
    """A replica; with the default `inline_entries=0` it publishes every node in shards, as it
    does a large node."""
    op = OperatorThread(plane, lease, identity, inline_entries)
    started.append(op)
    return op


# --- cluster fixtures ------------------------------------------------------------------------


@dataclasses.dataclass
class Cluster:
    namespace: str
    nodes: list[NodeNet]
    pods: dict[str, PodNet]  # name -> pod


@pytest.fixture
def cluster(api_client: Any, k8s_namespace: str) -> Cluster:
    """Two fresh nodes (unique names and pod CIDRs) and four pods in the test's namespace."""
    base = 100 + secrets.randbelow(70) * 2
    tag = secrets.token_hex(3)
    nodes = [dataclasses.replace(node_net("op", base + i), name=f"op-{tag}-{i}") for i in range(2)]
    for node in nodes:
        register_node(api_client, node)
    pods = {}
    for i, (name, role) in enumerate([("a", "web"), ("b", "web"), ("c", "db"), ("d", "client")]):
        node = nodes[i % 2]
        pod = PodNet(
            key=f"{k8s_namespace}/{name}",
            node=node.name,
            netns="unused",
            ip_v4=f"10.244.{node.index}.{10 + i}",
            ip_v6=f"fd00:10:244:{node.index}::{10 + i:x}",
            host_ifname="unused",
            pod_ifname="eth0",
        )
        register_pod(api_client, k8s_namespace, name, pod, {"role": role}, [("http", 80, "TCP")])
        pods[name] = pod
    return Cluster(k8s_namespace, nodes, pods)


def snp(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply_snp(api: Any, obj: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, obj["metadata"]["namespace"], "networkpolicies", obj
    )


ALLOW_WEB_FROM_CLIENT = {
    "podSelector": {"matchLabels": {"role": "web"}},
    "ingress": [
        {
            "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
            "ports": [{"port": "http"}],
        }
    ],
}


def standard_deny_db(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny-db", "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"]},
    }


# --- reading back ----------------------------------------------------------------------------


def tables_of(api: Any, node: str) -> list[dict[str, Any]]:
    listed = kubernetes.client.CustomObjectsApi(api).list_cluster_custom_object(
        GROUP, VERSION, PLURAL, label_selector=f"{handoff.NODE_LABEL}={node}"
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


def decoded(api: Any, node: str) -> ir.NodeTables | None:
    """The node's tables, or None while the published set is incomplete (the manifest of
    program.0 names a shard that is missing or has another digest)."""
    items = tables_of(api, node)
    by_name = {i["metadata"]["name"]: i["spec"] for i in items}
    program = by_name.get(handoff.object_name(node, handoff.PROGRAM, 0))
    if program is None:
        return None
    decoded_program = handoff.decode_program(program["entries"])
    parts: dict[str, list[list[str]]] = {p: [list(e)] for p, e in decoded_program.inline.items()}
    for part, shards in decoded_program.manifest.items():
        for shard, digest in shards.items():
            spec = by_name.get(handoff.object_name(node, part, shard))
            if spec is None or spec["digest"] != digest:
                return None
            assert handoff.digest(spec["entries"]) == digest
            parts.setdefault(part, []).append(spec["entries"])
    return handoff.decode_tables(parts)


def state_from_api(api: Any) -> tuple[ClusterState, list[Any]]:
    """The cluster state and accepted policies, read from the API server."""
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    namespaces = [namespace_from_api(n.to_dict()) for n in core.list_namespace().items]
    nodes = [node_from_api(api.sanitize_for_serialization(n)) for n in core.list_node().items]
    pods = [
        pod_from_api(api.sanitize_for_serialization(p))
        for p in core.list_pod_for_all_namespaces().items
    ]
    raw = [
        api.sanitize_for_serialization(p) | {"apiVersion": "networking.k8s.io/v1"}
        for p in kubernetes.client.NetworkingV1Api(api)
        .list_network_policy_for_all_namespaces()
        .items
    ]
    for plural in ("networkpolicies", "clusternetworkpolicies"):
        raw += custom.list_cluster_custom_object(GROUP, VERSION, plural)["items"]
    records = [parse_record(r | {"kind": r.get("kind") or "NetworkPolicy"}) for r in raw]
    policies = [r.policy for r in sorted(filter(None, records), key=lambda r: r.key) if r.policy]
    state = ClusterState(namespaces, [p for p in pods if p is not None], nodes)
    return state, policies


def canonical(tables: ir.NodeTables) -> tuple[frozenset[Any], ...]:
    """The tables with every id replaced by what it stands for."""
    endpoints: dict[int, frozenset[Any]] = {}
    for e in tables.endpoints:
        endpoints[e.endpoint_id] = endpoints.get(e.endpoint_id, frozenset()) | {e.address}
    classes: dict[int, frozenset[Any]] = {}
    for c in tables.classes:
        classes[c.class_id] = classes.get(c.class_id, frozenset()) | {(c.network, c.flags)}
    rules = dict(tables.rules)
    policy = frozenset(
        (
            endpoints.get(p.endpoint_id),
            p.direction,
            p.prefixlen,
            classes.get(p.class_id) if p.prefixlen > abi.PREFIX_ENDPOINT else None,
            p.protocol,
            p.port,
            p.action,
            rules.get(p.rule_id),
            p.audit_action,
            rules.get(p.audit_rule_id),
        )
        for p in tables.policy
    )
    return frozenset(endpoints.values()), frozenset(classes.values()), policy


def expected(api: Any, node: str) -> tuple[frozenset[Any], ...]:
    state, policies = state_from_api(api)
    return canonical(lower_node(state, policies, node).tables)


def converged(api: Any, nodes: list[NodeNet]) -> bool:
    for node in nodes:
        got = decoded(api, node.name)
        if got is None or canonical(got) != expected(api, node.name):
            return False
    return True


def versions(api: Any, nodes: list[NodeNet]) -> dict[str, str]:
    return {
        i["metadata"]["name"]: i["metadata"]["resourceVersion"]
        for node in nodes
        for i in tables_of(api, node.name)
    }


def condition(api: Any, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    obj = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "networkpolicies", name
    )
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c["type"] == kind:
            found: dict[str, Any] = c
            return found
    return None


def report(api: Any, node: str) -> None:
    """Patch the node's program.0 status the way its agent does after applying it."""
    custom = kubernetes.client.CustomObjectsApi(api)
    name = handoff.object_name(node, handoff.PROGRAM, 0)
    program = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    status = {
        "appliedGeneration": program["spec"]["generation"],
        "endpointsAttached": 2,
        "errors": [],
        "compiledDigest": "0" * 64,
    }
    custom.patch_cluster_custom_object_status(
        GROUP,
        VERSION,
        PLURAL,
        name,
        {"status": status},
        _content_type="application/merge-patch+json",
    )


# --- tests -----------------------------------------------------------------------------------


def lease_name() -> str:
    return f"stockade-test-{secrets.token_hex(4)}"


@pytest.mark.parametrize("inline", [0, handoff.INLINE_ENTRIES], ids=["sharded", "inline"])
def test_published_tables_decode_to_exactly_the_lowering_of_the_cluster_state(
    control_plane: ControlPlane,
    operators: list[OperatorThread],
    cluster: Cluster,
    api_client: Any,
    inline: int,
) -> None:
    start(control_plane, operators, lease_name(), "one", inline)
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))
    kubernetes.client.NetworkingV1Api(api_client).create_namespaced_network_policy(
        cluster.namespace,
        kubernetes.client.V1NetworkPolicy.model_validate(standard_deny_db(cluster.namespace)),
    )
    wait_for("tables published for both nodes", lambda: converged(api_client, cluster.nodes))
    for node in cluster.nodes:
        tables = decoded(api_client, node.name)
        assert tables is not None and tables.policy, f"{node.name} has policy entries"
        kinds = {info.kind for info in tables.rules.values()}
        assert "NetworkPolicy.stockade.io" in kinds | {"NetworkPolicy.networking.k8s.io"}


def test_a_pod_label_change_rewrites_only_the_shards_it_affects(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    op = start(control_plane, operators, lease_name(), "one")
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))
    wait_for("tables published", lambda: converged(api_client, cluster.nodes))
    before = versions(api_client, cluster.nodes)
    writes = op.writes
    set_pod_labels(api_client, cluster.namespace, "c", {"role": "client"})  # c may now reach web
    wait_for("tables updated", lambda: converged(api_client, cluster.nodes))
    after = versions(api_client, cluster.nodes)
    rewritten = sorted(n for n in after if before.get(n) != after[n])
    assert rewritten, "the label change reached the published tables"
    assert len(rewritten) < len(after)
    # Only the classes (c's address changes class), the policy shards of the web pods and the
    # program manifests: the endpoints and rules parts are untouched.
    assert all(".endpoints." not in n and ".rules." not in n for n in rewritten), rewritten
    assert op.writes - writes == len(rewritten)


def test_a_small_node_publishes_one_object_and_a_label_change_rewrites_only_that(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    op = start(control_plane, operators, lease_name(), "one", handoff.INLINE_ENTRIES)
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))
    wait_for("tables published", lambda: converged(api_client, cluster.nodes))
    before = versions(api_client, cluster.nodes)
    programs = {handoff.object_name(n.name, handoff.PROGRAM, 0) for n in cluster.nodes}
    assert set(before) == programs  # the tables travel inside the program objects
    writes = op.writes
    set_pod_labels(api_client, cluster.namespace, "c", {"role": "client"})  # c may now reach web
    wait_for("tables updated", lambda: converged(api_client, cluster.nodes))
    after = versions(api_client, cluster.nodes)
    assert set(after) == programs
    rewritten = [n for n in after if before[n] != after[n]]
    assert rewritten, "the label change reached the published tables"
    assert op.writes - writes == len(rewritten)  # one write per node that changed


def test_an_invalid_stockade_policy_is_not_accepted_and_the_condition_names_the_field(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    start(control_plane, operators, lease_name(), "one")
    # A label key whose name part is longer than 63 characters: the CRD schema lets it through,
    # the operator's parser does not.
    bad = snp(cluster.namespace, "long-key", podSelector={"matchLabels": {"k" * 70: "v"}})
    apply_snp(api_client, bad)

    def rejected() -> dict[str, Any] | None:
        found = condition(api_client, cluster.namespace, "long-key", "Accepted")
        return found if found and found["status"] == "False" else None

    accepted = wait_for("Accepted=False", rejected)
    assert accepted["reason"] == "Invalid"
    assert "spec.podSelector.matchLabels" in accepted["message"]
    events = kubernetes.client.CoreV1Api(api_client).list_namespaced_event(cluster.namespace)
    assert any(e.reason == "Invalid" and e.involved_object.name == "long-key" for e in events.items)


def test_policies_found_at_start_each_get_their_own_status_and_event(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    # Created before the operator starts, so its first pass writes all of the statuses together.
    names = [f"p{i}" for i in range(12)]
    invalid = set(names[::3])
    for name in names:
        selector = {"k" * 70: "v"} if name in invalid else {"role": "web"}
        apply_snp(api_client, snp(cluster.namespace, name, podSelector={"matchLabels": selector}))
    op = start(control_plane, operators, lease_name(), "one")

    def accepted() -> dict[str, str] | None:
        found = {n: condition(api_client, cluster.namespace, n, "Accepted") for n in names}
        if any(c is None for c in found.values()):
            return None
        return {n: c["status"] for n, c in found.items() if c is not None}

    statuses = wait_for("every policy has Accepted", accepted)
    assert statuses == {n: "False" if n in invalid else "True" for n in names}
    assert op.operator.reconciler.reporter.status_writes >= len(names)
    for name in names:
        programmed = condition(api_client, cluster.namespace, name, "Programmed")
        assert programmed is not None
        assert programmed["message"] == ("not accepted" if name in invalid else "0/2 endpoints")
    events = kubernetes.client.CoreV1Api(api_client).list_namespaced_event(cluster.namespace)
    warned = {e.involved_object.name for e in events.items if e.reason == "Invalid"}
    assert warned == invalid


def test_programmed_counts_the_endpoints_whose_agent_applied_the_policy(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    start(control_plane, operators, lease_name(), "one")
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))

    def programmed(text: str) -> bool:
        found = condition(api_client, cluster.namespace, "allow-web", "Programmed")
        return found is not None and found["message"] == text

    wait_for("0/2 before any agent reports", lambda: programmed("0/2 endpoints"))
    wait_for("tables published", lambda: converged(api_client, cluster.nodes))
    report(api_client, cluster.nodes[0].name)
    wait_for("1/2 after one agent", lambda: programmed("1/2 endpoints"))
    report(api_client, cluster.nodes[1].name)
    wait_for("2/2 after both", lambda: programmed("2/2 endpoints"))
    found = condition(api_client, cluster.namespace, "allow-web", "Programmed")
    assert found is not None and found["status"] == "True"
    accepted = condition(api_client, cluster.namespace, "allow-web", "Accepted")
    assert accepted is not None and accepted["status"] == "True"


def test_a_restarted_operator_rewrites_nothing_when_nothing_changed(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    lease = lease_name()
    first = start(control_plane, operators, lease, "first")
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))
    wait_for("tables published", lambda: converged(api_client, cluster.nodes))
    first.stop()
    before = versions(api_client, cluster.nodes)
    second = start(control_plane, operators, lease, "second")
    wait_for("the new operator made a pass", lambda: second.operator.reconciler.stats.table_passes)
    assert second.writes == 0
    assert versions(api_client, cluster.nodes) == before


def test_only_the_leader_publishes_and_the_other_takes_over_when_it_stops(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    lease = lease_name()
    one = start(control_plane, operators, lease, "one")
    wait_for("one leads", one.operator.is_leader)
    two = start(control_plane, operators, lease, "two")
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))
    wait_for("tables published", lambda: converged(api_client, cluster.nodes))
    assert one.writes > 0 and two.writes == 0 and not two.operator.is_leader()
    one.stop()
    wait_for("two leads", two.operator.is_leader)
    set_pod_labels(api_client, cluster.namespace, "c", {"role": "client"})
    wait_for("two publishes the change", lambda: converged(api_client, cluster.nodes))
    assert two.writes > 0


def hand_edit(api: Any, node: str, recompute: bool) -> tuple[str, list[str]]:
    """Drop the last entry of one of the node's table shards, as someone with write access to
    DatapathTables might, recomputing the digest or not; the shard's name and its entries
    before the edit."""
    shard = next(
        i
        for i in tables_of(api, node)
        if i["spec"]["part"] != handoff.PROGRAM and len(i["spec"]["entries"]) > 1
    )
    name, entries = shard["metadata"]["name"], list(shard["spec"]["entries"])
    edited = entries[:-1]
    spec: dict[str, Any] = {"entries": edited}
    if recompute:
        spec["digest"] = handoff.digest(edited)
    kubernetes.client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
    )
    return name, entries


@pytest.mark.parametrize("recompute", [True, False], ids=["digest-recomputed", "digest-stale"])
def test_a_hand_edited_table_is_restored_on_the_next_pass(
    control_plane: ControlPlane,
    operators: list[OperatorThread],
    cluster: Cluster,
    api_client: Any,
    recompute: bool,
) -> None:
    op = start(control_plane, operators, lease_name(), "one")
    apply_snp(api_client, snp(cluster.namespace, "allow-web", **ALLOW_WEB_FROM_CLIENT))
    wait_for("tables published", lambda: converged(api_client, cluster.nodes))
    writes = op.writes
    name, entries = hand_edit(api_client, cluster.nodes[0].name, recompute)

    def restored() -> bool:
        obj = kubernetes.client.CustomObjectsApi(api_client).get_cluster_custom_object(
            GROUP, VERSION, PLURAL, name
        )
        return bool(obj["spec"]["entries"] == entries)

    wait_for(f"{name} restored", restored)
    wait_for("tables converged again", lambda: converged(api_client, cluster.nodes))
    assert op.writes > writes  # the operator wrote it back; nothing else changed
