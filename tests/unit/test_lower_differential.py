"""The lowering is exact: for generated clusters, policies and flows, the tables it builds, read
the way the datapath reads them (`ir.lookup`), give the reference evaluator's verdict for each
direction, the deciding rule, and what Audit mode would report.

This is the pure half of the datapath's differential test; tests/bpf checks the kernel against
`ir.lookup` on the same kind of tables.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.lower import VERDICTS_LIMIT, Ids, Lowering, Verdicts, lower_node
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.evaluator import judge
from stockade.model.flow import Flow
from stockade.model.parse import parse_policy
from stockade.model.policy import Direction, Policy, Protocol

NODES = (
    Node("n0", (ipaddress.ip_address("172.18.0.10"), ipaddress.ip_address("fc00::10"))),
    Node("n1", (ipaddress.ip_address("172.18.0.11"), ipaddress.ip_address("fc00::11"))),
)
EXTERNAL = ("192.0.2.7", "10.245.0.9", "2001:db8::7")
CIDRS = [
    ("10.244.0.0/16", ["10.244.1.0/24"]),
    ("10.244.1.0/24", []),
    ("0.0.0.0/0", ["10.244.0.0/16"]),
    ("10.244.0.2/32", []),
    ("fd00::/8", ["fd00:0:0:1::/64"]),
    ("::/0", []),
    ("192.0.2.0/24", []),
]
LABEL_VALUES = ("web", "db", "api")
PORTS = (53, 80, 443, 8080, 9000)

labels = st.dictionaries(
    st.sampled_from(("app", "tier")), st.sampled_from(LABEL_VALUES), max_size=2
)
selector = st.one_of(
    st.builds(lambda m: {"matchLabels": m}, labels),
    st.builds(
        lambda k, op, vs: {"matchExpressions": [{"key": k, "operator": op, "values": vs}]},
        st.sampled_from(("app", "tier")),
        st.sampled_from(("In", "NotIn")),
        st.lists(st.sampled_from(LABEL_VALUES), min_size=1, max_size=2, unique=True),
    ),
)


@st.composite
def netpol_peer(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(("pod", "ns", "both", "ip")))
    if kind == "ip":
        cidr, excepts = draw(st.sampled_from(CIDRS))
        block: dict[str, Any] = {"cidr": cidr}
        if excepts:
            block["except"] = excepts
        return {"ipBlock": block}
    peer: dict[str, Any] = {}
    if kind in ("pod", "both"):
        peer["podSelector"] = draw(selector)
    if kind in ("ns", "both"):
        peer["namespaceSelector"] = draw(st.one_of(st.just({}), selector))
    return peer


@st.composite
def netpol_port(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(("num", "range", "named", "proto", "icmp")))
    proto = draw(st.sampled_from(("TCP", "UDP", "SCTP")))
    if kind == "num":
        return {"protocol": proto, "port": draw(st.sampled_from(PORTS))}
    if kind == "range":
        start = draw(st.integers(1, 9000))
        return {"protocol": proto, "port": start, "endPort": start + draw(st.integers(0, 200))}
    if kind == "named":
        return {"protocol": "TCP", "port": draw(st.sampled_from(("http", "dns")))}
    if kind == "icmp":
        return {"icmp": {"type": 8}} if draw(st.booleans()) else {"icmp": {"type": 3, "code": 1}}
    return {"protocol": proto}


@st.composite
def netpol(draw: Any, index: int) -> dict[str, Any]:
    stockade = draw(st.booleans())
    types = draw(st.sampled_from((["Ingress"], ["Egress"], ["Ingress", "Egress"])))
    spec: dict[str, Any] = {"podSelector": draw(st.one_of(st.just({}), selector))}
    spec["policyTypes"] = types
    for direction, peer_key in (("ingress", "from"), ("egress", "to")):
        rules = []
        for _ in range(draw(st.integers(0, 2))):
            rule: dict[str, Any] = {}
            if draw(st.booleans()):
                rule[peer_key] = draw(st.lists(netpol_peer(), min_size=1, max_size=2))
            if draw(st.booleans()):
                ports = st.lists(netpol_port(), min_size=1, max_size=2)
                rule["ports"] = draw(ports)
                if not stockade:
                    rule["ports"] = [p for p in rule["ports"] if "icmp" not in p] or [
                        {"protocol": "TCP", "port": 80}
                    ]
            if stockade and draw(st.booleans()):
                rule["action"] = "Deny"
            rules.append(rule)
        spec[direction] = rules
    api = "stockade.io/v1alpha1" if stockade else "networking.k8s.io/v1"
    if stockade and draw(st.integers(0, 4)) == 0:
        spec["mode"] = "Audit"
    ns = draw(st.sampled_from(("a", "b")))
    return {
        "apiVersion": api,
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np{index}", "namespace": ns},
        "spec": spec,
    }


@st.composite
def cnp(draw: Any, index: int) -> dict[str, Any]:
    subject: dict[str, Any] = draw(
        st.one_of(
            st.builds(lambda s: {"namespaces": s}, st.one_of(st.just({}), selector)),
            st.builds(
                lambda n, p: {"pods": {"namespaceSelector": n, "podSelector": p}},
                st.just({}),
                selector,
            ),
        )
    )
    spec: dict[str, Any] = {
        "tier": draw(st.sampled_from(("Admin", "Baseline"))),
        "priority": draw(st.integers(0, 3)),
        "subject": subject,
    }
    for direction, peer_key in (("ingress", "from"), ("egress", "to")):
        rules = []
        for r in range(draw(st.integers(0, 2))):
            peers: list[dict[str, Any]] = [
                draw(
                    st.one_of(
                        st.builds(lambda s: {"namespaces": s}, st.one_of(st.just({}), selector)),
                        st.builds(
                            lambda p: {"pods": {"namespaceSelector": {}, "podSelector": p}},
                            selector,
                        ),
                    )
                )
            ]
            if direction == "egress" and draw(st.booleans()):
                peers = [{"networks": [draw(st.sampled_from(CIDRS))[0]]}]
            rule: dict[str, Any] = {
                "name": f"r{r}",
                "action": draw(st.sampled_from(("Accept", "Deny", "Pass"))),
                peer_key: peers,
            }
            if draw(st.booleans()):
                port = draw(st.sampled_from(PORTS))
                rule["protocols"] = [{"tcp": {"destinationPort": {"number": port}}}]
            rules.append(rule)
        if rules:
            spec[direction] = rules
    return {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": f"cnp{index}"},
        "spec": spec,
    }


@st.composite
def cluster(draw: Any) -> ClusterState:
    namespaces = [Namespace(n, {"kubernetes.io/metadata.name": n, **draw(labels)}) for n in "ab"]
    pods = []
    for i in range(draw(st.integers(2, 5))):
        node = i % 2
        named = (
            {"http": (draw(st.sampled_from((80, 8080))), Protocol.TCP)}
            if draw(st.booleans())
            else {}
        )
        pods.append(
            Pod(
                draw(st.sampled_from(("a", "b"))),
                f"p{i}",
                draw(labels),
                (
                    ipaddress.ip_address(f"10.244.{node}.{i + 2}"),
                    ipaddress.ip_address(f"fd00:0:0:{node}::{i + 2}"),
                ),
                f"n{node}",
                named,
            )
        )
    return ClusterState(namespaces, pods, NODES)


@st.composite
def scenario(draw: Any) -> tuple[ClusterState, list[Policy]]:
    state = draw(cluster())
    objects = [draw(netpol(i)) for i in range(draw(st.integers(0, 3)))]
    objects += [draw(cnp(i)) for i in range(draw(st.integers(0, 2)))]
    return state, [parse_policy(o) for o in objects]


@st.composite
def flow(draw: Any, state: ClusterState) -> Flow:
    family = draw(st.sampled_from((4, 6)))
    addresses = [ip for pod in state.pods for ip in pod.ips if ip.version == family]
    addresses += [ip for node in NODES for ip in node.ips if ip.version == family]
    addresses += [
        ipaddress.ip_address(e) for e in EXTERNAL if ipaddress.ip_address(e).version == family
    ]
    src = draw(st.sampled_from(addresses))
    pod_ips = [ip for pod in state.pods for ip in pod.ips if ip.version == family]
    dst = draw(st.sampled_from(pod_ips))
    proto = draw(st.sampled_from(("TCP", "UDP", "SCTP", "ICMP")))
    if proto == "ICMP":
        return Flow.icmp(
            str(src),
            str(dst),
            draw(st.sampled_from((8, 3, 0, 128, 135))),
            draw(st.sampled_from((0, 1))),
        )
    port = draw(st.one_of(st.sampled_from(PORTS), st.integers(1, 65535)))
    return Flow(src, dst, Protocol(proto), port)


def _packet(f: Flow) -> ir.Packet:
    port = (
        f.dst_port if f.dst_port is not None else ir.icmp_port(f.icmp_type or 0, f.icmp_code or 0)
    )
    return ir.Packet(f.src_ip, f.dst_ip, f.protocol.number, port)


def _check(state: ClusterState, policies: list[Policy], f: Flow) -> None:
    tables = {n.name: lower_node(state, policies, n.name).tables for n in NODES}
    for direction, address in ((Direction.EGRESS, f.src_ip), (Direction.INGRESS, f.dst_ip)):
        pod = state.pod_at(address)
        if pod is None:
            continue
        want = judge(state, policies, f, direction)
        t = tables[pod.node or ""]
        got = ir.lookup(t, _packet(f), ir.Direction[direction.name])
        assert (got.action is ir.Action.ALLOW) == want.allowed, (direction, f)
        rule = t.rules[got.rule_id] if got.rule_id else None
        got_rule = (rule.kind, rule.namespace, rule.name, rule.index) if rule else None
        want_rule = (
            (want.rule.kind.value, want.rule.namespace, want.rule.name, want.rule.index)
            if want.rule
            else None
        )
        assert got_rule == want_rule, (direction, f)
        if want.audit_allowed is not None and want.audit_allowed != want.allowed:
            assert got.audit_action is (ir.Action.ALLOW if want.audit_allowed else ir.Action.DENY)
        else:
            assert got.audit_action is ir.Action.NONE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_lowered_tables_decide_every_flow_as_the_reference_evaluator(data: st.DataObject) -> None:
    state, policies = data.draw(scenario())
    for _ in range(5):
        _check(state, policies, data.draw(flow(state)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_verdicts_and_results_kept_from_other_cluster_states_lower_exactly_as_a_cold_lowering(
    data: st.DataObject,
) -> None:
    """The operator keeps verdicts and each node's last result across passes while pods and
    labels change; what it reuses must never differ from what a lowering from nothing would
    decide (with the same ids carried in)."""
    first, policies = data.draw(scenario())
    # The pods of n1 relabelled: n0's endpoints stay as they were, its peers may not.
    second = ClusterState(
        first.namespaces.values(),
        [replace(pod, labels=data.draw(labels)) if pod.node == "n1" else pod for pod in first.pods],
        NODES,
    )
    # A small limit turns the verdicts' generations over within a pass.
    verdicts = Verdicts(limit=data.draw(st.sampled_from([VERDICTS_LIMIT, 3, 1])))
    previous = {}  # type: ignore[var-annotated]
    ids: dict[str, Ids | None] = {n.name: None for n in NODES}
    for state in (first, second, second, first):
        warm = Lowering(state, policies, verdicts, previous)
        for node in NODES:
            cold = lower_node(state, policies, node.name, ids[node.name])
            got = warm.node(node.name, ids[node.name])
            assert got.tables == cold.tables, node.name
            assert dict(got.ids.classes) == dict(cold.ids.classes), node.name
            ids[node.name] = got.ids


def test_verdicts_keep_at_most_two_generations_and_what_is_used_stays() -> None:
    verdicts = Verdicts(limit=2)
    policy = parse_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}},
        }
    )

    def key(n: int) -> Any:
        return (((), (id(policy),)), n)

    for n in range(10):
        verdicts.put(key(n), [policy], ())
        assert verdicts.get(key(0)) == ()  # used on every turn: it moves back each time
        assert len(verdicts) <= 4
    assert verdicts.get(key(1)) is None  # not asked for through a whole generation
    verdicts.retain([])
    assert len(verdicts) == 0
