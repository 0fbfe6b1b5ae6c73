"""The pending state's fast path against the reference evaluator: every pod of a namespace that
`fast_open_namespaces` names is judged, in each direction of every flow, exactly as with no
policy at all (so opening its interface at once changes no verdict), over generated clusters
and policy mixes; and the namespaces a policy could select are never named."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.model.cluster import ClusterState, Namespace, Pod, ip
from stockade.model.evaluator import evaluate
from stockade.model.fastopen import fast_open_namespaces
from stockade.model.flow import Flow
from stockade.model.parse import parse_policy
from stockade.model.policy import Direction, Policy

NAMES = ("a", "b", "c")
TEAMS = st.sampled_from(["red", "blue", None])
ROLES = st.sampled_from(["web", "db"])
OUTSIDE = "192.0.2.9"
SELECTOR = st.sampled_from([{}, {"matchLabels": {"role": "web"}}, {"matchLabels": {"role": "db"}}])
NS_SELECTOR = st.sampled_from(
    [{}, {"matchLabels": {"team": "red"}}, {"matchLabels": {"team": "blue"}}]
)


@st.composite
def clusters(draw: st.DrawFn) -> ClusterState:
    namespaces, pods = [], []
    for k, name in enumerate(NAMES):
        team = draw(TEAMS)
        labels = {"kubernetes.io/metadata.name": name} | ({"team": team} if team else {})
        namespaces.append(Namespace(name, labels))
        for j in range(draw(st.integers(1, 2))):
            role = draw(ROLES)
            pods.append(Pod(name, f"p{j}", {"role": role}, (ip(f"10.1.{k}.{j + 1}"),), "n1"))
    return ClusterState(namespaces, pods)


@st.composite
def peers(draw: st.DrawFn, cluster: bool, egress: bool = False) -> dict[str, Any]:
    if cluster:
        pods = {"namespaceSelector": draw(NS_SELECTOR), "podSelector": draw(SELECTOR)}
        return draw(
            st.sampled_from(
                [
                    {"namespaces": draw(NS_SELECTOR)},
                    {"pods": pods},
                    *([{"networks": ["192.0.2.0/24"]}] if egress else []),
                ]
            )
        )
    return draw(
        st.sampled_from(
            [
                {"podSelector": draw(SELECTOR)},
                {"namespaceSelector": draw(NS_SELECTOR)},
                {"ipBlock": {"cidr": "192.0.2.0/24"}},
            ]
        )
    )


@st.composite
def network_policy(draw: st.DrawFn, i: int) -> dict[str, Any]:
    types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    spec: dict[str, Any] = {"podSelector": draw(SELECTOR), "policyTypes": types}
    for t in types:
        key, side = ("ingress", "from") if t == "Ingress" else ("egress", "to")
        spec[key] = [{side: [draw(peers(False))]} for _ in range(draw(st.integers(0, 2)))]
    ns = draw(st.sampled_from(NAMES))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np{i}", "namespace": ns},
        "spec": spec,
    }


@st.composite
def cluster_policy(draw: st.DrawFn, i: int) -> dict[str, Any]:
    subject = draw(
        st.sampled_from(
            [
                {"namespaces": draw(NS_SELECTOR)},
                {"pods": {"namespaceSelector": draw(NS_SELECTOR), "podSelector": draw(SELECTOR)}},
            ]
        )
    )
    spec: dict[str, Any] = {
        "tier": draw(st.sampled_from(["Admin", "Baseline"])),
        "priority": draw(st.integers(0, 3)),
        "mode": draw(st.sampled_from(["Enforce", "Audit"])),
        "subject": subject,
    }
    for key, side in draw(st.sampled_from([[("ingress", "from")], [("egress", "to")]])):
        action = draw(st.sampled_from(["Accept", "Deny", "Pass"]))
        spec[key] = [{"action": action, side: [draw(peers(True, key == "egress"))]}]
    return {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": f"cnp{i}"},
        "spec": spec,
    }


@st.composite
def policy_mixes(draw: st.DrawFn) -> list[Policy]:
    out = []
    for i in range(draw(st.integers(0, 4))):
        make = network_policy if draw(st.booleans()) else cluster_policy
        out.append(parse_policy(draw(make(i))))
    return out


def own_judgements(state: ClusterState, policies: list[Policy], pod: Pod) -> list[Any]:
    """The verdicts of `pod`'s own directions over flows to and from every other end."""
    mine = str(pod.ips[0])
    others = [str(p.ips[0]) for p in state.pods if p is not pod] + [OUTSIDE]
    out = []
    for other in others:
        for proto, port in (("TCP", 80), ("UDP", 53)):
            for flow, direction in (
                (Flow.of(mine, other, proto, port), Direction.EGRESS),
                (Flow.of(other, mine, proto, port), Direction.INGRESS),
            ):
                for d in evaluate(state, policies, flow).directions:
                    if d.pod == pod.key and d.direction is direction:
                        out.append((str(flow), direction, d.verdict))
    return out


@settings(max_examples=300, deadline=None)
@given(clusters(), policy_mixes())
def test_a_pod_the_fast_path_opens_is_judged_as_with_no_policy(
    state: ClusterState, policies: list[Policy]
) -> None:
    opened = fast_open_namespaces(state, policies)
    for pod in state.pods:
        if pod.namespace in opened:
            judged = own_judgements(state, policies, pod)
            assert judged == own_judgements(state, [], pod), pod.key


@settings(max_examples=300, deadline=None)
@given(clusters(), policy_mixes())
def test_a_namespace_some_policy_could_select_is_never_fast_open(
    state: ClusterState, policies: list[Policy]
) -> None:
    opened = fast_open_namespaces(state, policies)
    for policy in policies:
        for pod in state.pods:
            if state.holds(policy.subject, pod):
                assert pod.namespace not in opened, (policy.name, pod.key)


def test_the_rule_on_a_fixed_cluster() -> None:
    state = ClusterState(
        [Namespace("a", {"team": "red"}), Namespace("b", {}), Namespace("c", {"team": "blue"})],
        [Pod(n, "p", {"role": "web"}, (ip(f"10.1.{k}.1"),), "n1") for k, n in enumerate("abc")],
    )
    np = parse_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "b"},
            "spec": {"podSelector": {"matchLabels": {"role": "nothing"}}},
        }
    )
    cnp = parse_policy(
        {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "red"},
            "spec": {
                "tier": "Admin",
                "priority": 1,
                "subject": {
                    "pods": {
                        "namespaceSelector": {"matchLabels": {"team": "red"}},
                        "podSelector": {"matchLabels": {"role": "nothing"}},
                    }
                },
                "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}],
            },
        }
    )
    assert fast_open_namespaces(state, []) == {"a", "b", "c"}
    # a policy in b, and one whose subject's namespace part holds a, close them, even though
    # neither selects a pod there now: the new pod's labels are not known
    assert fast_open_namespaces(state, [np, cnp]) == {"c"}
