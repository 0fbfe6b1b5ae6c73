"""The reference evaluator decides each edge case of the policy API as DESIGN.md §2 says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from stockade.model.cluster import ClusterState, Namespace, Node, Pod, ip
from stockade.model.evaluator import Decision, Verdict, evaluate
from stockade.model.flow import Flow
from stockade.model.parse import parse_policy
from stockade.model.policy import Direction, PolicyKind, Protocol, RuleRef, Tier

STATE = ClusterState(
    namespaces=[
        Namespace("x", {"kubernetes.io/metadata.name": "x", "team": "blue"}),
        Namespace("y", {"kubernetes.io/metadata.name": "y", "team": "red"}),
    ],
    pods=[
        Pod(
            "x",
            "a",
            {"pod": "a"},
            (ip("10.0.1.1"), ip("fd00:1::1")),
            "n1",
            {"web": (80, Protocol.TCP), "dns": (53, Protocol.UDP)},
        ),
        Pod("x", "b", {"pod": "b"}, (ip("10.0.1.2"), ip("fd00:1::2")), "n1"),
        Pod(
            "y",
            "a",
            {"pod": "a"},
            (ip("10.0.2.1"), ip("fd00:2::1")),
            "n2",
            {"web": (8080, Protocol.TCP)},
        ),
        Pod(
            "y",
            "host",
            {"pod": "host"},
            (ip("192.168.0.2"),),
            "n2",
            {"web": (80, Protocol.TCP)},
            host_network=True,
        ),
    ],
    nodes=[
        Node("n1", (ip("192.168.0.1"),), {"kubernetes.io/os": "linux", "zone": "1"}),
        Node("n2", (ip("192.168.0.2"),), {"kubernetes.io/os": "linux", "zone": "2"}),
    ],
)
ADDR = {
    "x/a": "10.0.1.1",
    "x/b": "10.0.1.2",
    "y/a": "10.0.2.1",
    "y/host": "192.168.0.2",
    "n1": "192.168.0.1",
    "n2": "192.168.0.2",
    "ext": "8.8.8.8",
    "x/a6": "fd00:1::1",
    "x/b6": "fd00:1::2",
    "y/a6": "fd00:2::1",
}


def np_(name: str, spec: dict[str, Any], ns: str = "x", stockade: bool = False) -> dict[str, Any]:
    api = "stockade.io/v1alpha1" if stockade else "networking.k8s.io/v1"
    return {
        "apiVersion": api,
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def cnp(
    name: str, tier: str, priority: int, spec: dict[str, Any], stockade: bool = False
) -> dict[str, Any]:
    api = "stockade.io/v1alpha1" if stockade else "policy.networking.k8s.io/v1alpha2"
    body = {"tier": tier, "priority": priority, "subject": {"namespaces": {}}} | spec
    return {
        "apiVersion": api,
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": body,
    }


def decide(
    objs: list[dict[str, Any]],
    src: str,
    dst: str,
    proto: str = "TCP",
    port: int | None = 80,
    icmp: tuple[int, int] | None = None,
) -> Decision:
    policies = [parse_policy(o) for o in objs]
    if icmp is not None:
        flow = Flow.icmp(ADDR[src], ADDR[dst], *icmp)
    else:
        flow = Flow.of(ADDR[src], ADDR[dst], proto, port)
    return evaluate(STATE, policies, flow)


@dataclass(frozen=True)
class Case:
    id: str
    policies: list[dict[str, Any]]
    src: str
    dst: str
    allowed: bool
    proto: str = "TCP"
    port: int | None = 80
    icmp: tuple[int, int] | None = None


DENY_INGRESS_X = np_("deny-in", {"podSelector": {}, "policyTypes": ["Ingress"]})
DENY_EGRESS_X = np_("deny-out", {"podSelector": {}, "policyTypes": ["Egress"]})


def allow_in(
    *rules: dict[str, Any], stockade: bool = False, name: str = "allow-in"
) -> dict[str, Any]:
    return np_(
        name,
        {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": list(rules),
            "policyTypes": ["Ingress"],
        },
        stockade=stockade,
    )


def allow_out(*rules: dict[str, Any], stockade: bool = False) -> dict[str, Any]:
    return np_(
        "allow-out",
        {
            "podSelector": {"matchLabels": {"pod": "b"}},
            "egress": list(rules),
            "policyTypes": ["Egress"],
        },
        stockade=stockade,
    )


CASES = [
    Case("no policy allows everything", [], "x/b", "x/a", True),
    Case("a default-deny ingress policy isolates the pod", [DENY_INGRESS_X], "x/b", "x/a", False),
    Case("ingress isolation does not touch egress", [DENY_INGRESS_X], "x/a", "y/a", True),
    Case("traffic from the pod's own node is always allowed", [DENY_INGRESS_X], "n1", "x/a", True),
    Case(
        "traffic from another node is judged like any address", [DENY_INGRESS_X], "n2", "x/a", False
    ),
    Case(
        "an allow rule opens an isolated pod",
        [DENY_INGRESS_X, allow_in({"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]})],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "a podSelector peer is limited to the policy's namespace",
        [allow_in({"from": [{"podSelector": {}}]})],
        "y/a",
        "x/a",
        False,
    ),
    Case(
        "a namespaceSelector peer admits every pod of the namespace",
        [allow_in({"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]})],
        "y/a",
        "x/a",
        True,
    ),
    Case(
        "namespace and pod selectors in one peer are ANDed",
        [
            allow_in(
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": "red"}},
                            "podSelector": {"matchLabels": {"pod": "b"}},
                        }
                    ]
                }
            )
        ],
        "y/a",
        "x/a",
        False,
    ),
    Case(
        "namespace and pod selectors in separate peers are ORed",
        [
            allow_in(
                {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"team": "red"}}},
                        {"podSelector": {"matchLabels": {"pod": "b"}}},
                    ]
                }
            )
        ],
        "y/a",
        "x/a",
        True,
    ),
    Case(
        "matchExpressions NotIn admits a pod whose namespace lacks the label value",
        [
            allow_in(
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [
                                    {"key": "team", "operator": "NotIn", "values": ["blue"]}
                                ]
                            }
                        }
                    ]
                }
            )
        ],
        "y/a",
        "x/a",
        True,
    ),
    Case(
        "matchExpressions DoesNotExist rejects a labelled pod",
        [
            allow_in(
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]
                            }
                        }
                    ]
                }
            )
        ],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a named ingress port resolves on the destination pod",
        [allow_in({"ports": [{"port": "web"}]})],
        "x/b",
        "x/a",
        True,
        port=80,
    ),
    Case(
        "a named ingress port does not match another number",
        [allow_in({"ports": [{"port": "web"}]})],
        "x/b",
        "x/a",
        False,
        port=8080,
    ),
    Case(
        "a named port must match its protocol",
        [allow_in({"ports": [{"protocol": "UDP", "port": "web"}]})],
        "x/b",
        "x/a",
        False,
        port=80,
    ),
    Case(
        "a named UDP port matches its UDP number",
        [allow_in({"ports": [{"protocol": "UDP", "port": "dns"}]})],
        "x/b",
        "x/a",
        True,
        proto="UDP",
        port=53,
    ),
    Case(
        "a named egress port resolves on each destination pod",
        [allow_out({"ports": [{"port": "web"}]})],
        "x/b",
        "y/a",
        True,
        port=8080,
    ),
    Case(
        "a named egress port is not the source pod's number",
        [allow_out({"ports": [{"port": "web"}]})],
        "x/b",
        "y/a",
        False,
        port=80,
    ),
    Case(
        "a named port never matches an address that is not a pod",
        [allow_out({"ports": [{"port": "web"}]})],
        "x/b",
        "ext",
        False,
        port=80,
    ),
    Case(
        "endPort includes its lower bound",
        [allow_in({"ports": [{"port": 1000, "endPort": 2000}]})],
        "x/b",
        "x/a",
        True,
        port=1000,
    ),
    Case(
        "endPort includes its upper bound",
        [allow_in({"ports": [{"port": 1000, "endPort": 2000}]})],
        "x/b",
        "x/a",
        True,
        port=2000,
    ),
    Case(
        "endPort excludes the next port",
        [allow_in({"ports": [{"port": 1000, "endPort": 2000}]})],
        "x/b",
        "x/a",
        False,
        port=2001,
    ),
    Case(
        "ipBlock matches pod addresses",
        [allow_out({"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]})],
        "x/b",
        "y/a",
        True,
    ),
    Case(
        "ipBlock except removes a pod address",
        [allow_out({"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.1/32"]}}]})],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "ipBlock matches external addresses",
        [allow_out({"to": [{"ipBlock": {"cidr": "8.0.0.0/8"}}]})],
        "x/b",
        "ext",
        True,
    ),
    Case(
        "an IPv4 ipBlock never matches IPv6 traffic",
        [allow_out({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})],
        "x/b6",
        "y/a6",
        False,
    ),
    Case(
        "an IPv6 ipBlock matches IPv6 traffic",
        [allow_out({"to": [{"ipBlock": {"cidr": "fd00:2::/64"}}]})],
        "x/b6",
        "y/a6",
        True,
    ),
    Case(
        "pod peers match a pod's IPv6 address too",
        [allow_in({"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]})],
        "x/b6",
        "x/a6",
        True,
    ),
    Case(
        "an SCTP port matches SCTP",
        [allow_in({"ports": [{"protocol": "SCTP", "port": 9003}]})],
        "x/b",
        "x/a",
        True,
        proto="SCTP",
        port=9003,
    ),
    Case(
        "an SCTP port does not match TCP",
        [allow_in({"ports": [{"protocol": "SCTP", "port": 9003}]})],
        "x/b",
        "x/a",
        False,
        port=9003,
    ),
    Case(
        "a UDP port does not match TCP",
        [allow_in({"ports": [{"protocol": "UDP", "port": 80}]})],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a port rule does not match ICMP",
        [allow_in({"ports": [{"port": 80}]})],
        "x/b",
        "x/a",
        False,
        icmp=(8, 0),
    ),
    Case("a rule without ports matches ICMP", [allow_in({})], "x/b", "x/a", True, icmp=(8, 0)),
    Case(
        "an ICMP type match admits that type",
        [allow_in({"ports": [{"icmp": {"type": 8}}]}, stockade=True)],
        "x/b",
        "x/a",
        True,
        icmp=(8, 0),
    ),
    Case(
        "an ICMP type match rejects another type",
        [allow_in({"ports": [{"icmp": {"type": 8}}]}, stockade=True)],
        "x/b",
        "x/a",
        False,
        icmp=(13, 0),
    ),
    Case(
        "an ICMP code match rejects another code",
        [allow_in({"ports": [{"icmp": {"type": 3, "code": 4}}]}, stockade=True)],
        "x/b",
        "x/a",
        False,
        icmp=(3, 3),
    ),
    Case(
        "an ICMPv4 match does not match ICMPv6",
        [allow_in({"ports": [{"icmp": {"type": 128}}]}, stockade=True)],
        "x/b6",
        "x/a6",
        False,
        icmp=(128, 0),
    ),
    Case(
        "an ICMPv6 match admits ICMPv6",
        [allow_in({"ports": [{"icmpv6": {"type": 128}}]}, stockade=True)],
        "x/b6",
        "x/a6",
        True,
        icmp=(128, 0),
    ),
    Case(
        "a stockade Deny rule beats an Allow rule of another policy",
        [
            allow_in({}),
            allow_in(
                {"action": "Deny", "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]},
                stockade=True,
                name="deny",
            ),
        ],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a stockade Deny rule leaves other sources to the Allow rule",
        [
            allow_in({}),
            allow_in(
                {"action": "Deny", "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]},
                stockade=True,
                name="deny",
            ),
        ],
        "y/a",
        "x/a",
        True,
    ),
    Case(
        "egress is judged at the source even when ingress allows",
        [DENY_EGRESS_X],
        "x/b",
        "y/a",
        False,
    ),
    Case(
        "a host-network destination is never isolated by ingress policy",
        [np_("deny-y", {"podSelector": {}, "policyTypes": ["Ingress"]}, ns="y")],
        "x/b",
        "y/host",
        True,
    ),
    Case(
        "pod peers never match a host-network pod",
        [allow_out({"to": [{"namespaceSelector": {}}]})],
        "x/b",
        "y/host",
        False,
    ),
    Case(
        "ipBlock peers match a host-network pod's node address",
        [allow_out({"to": [{"ipBlock": {"cidr": "192.168.0.0/24"}}]})],
        "x/b",
        "y/host",
        True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_namespace_tier_decides_each_edge_case(case: Case) -> None:
    decision = decide(case.policies, case.src, case.dst, case.proto, case.port, case.icmp)
    assert decision.allowed is case.allowed, decision.reason


ACCEPT_ALL_IN = {"ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}]}
DENY_ALL_IN = {"ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
PASS_ALL_IN = {"ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}

TIERS = [
    Case(
        "an Admin Deny beats a NetworkPolicy allow",
        [cnp("a", "Admin", 1, DENY_ALL_IN), allow_in({})],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "an Admin Accept overrides NetworkPolicy isolation",
        [cnp("a", "Admin", 1, ACCEPT_ALL_IN), DENY_INGRESS_X],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "an Admin Pass hands the decision to the NetworkPolicies",
        [cnp("a", "Admin", 1, PASS_ALL_IN), DENY_INGRESS_X],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "an Admin Pass skips the rest of the Admin tier",
        [cnp("a", "Admin", 1, PASS_ALL_IN), cnp("b", "Admin", 2, DENY_ALL_IN)],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "a lower Admin priority number is evaluated first",
        [cnp("late", "Admin", 20, ACCEPT_ALL_IN), cnp("early", "Admin", 10, DENY_ALL_IN)],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "equal Admin priorities are ordered by name",
        [cnp("b-accept", "Admin", 5, ACCEPT_ALL_IN), cnp("a-deny", "Admin", 5, DENY_ALL_IN)],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "rules of one policy are evaluated in order",
        [cnp("a", "Admin", 1, {"ingress": ACCEPT_ALL_IN["ingress"] + DENY_ALL_IN["ingress"]})],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "a Baseline Deny applies when no NetworkPolicy selects the pod",
        [cnp("b", "Baseline", 1, DENY_ALL_IN)],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a NetworkPolicy allow beats a Baseline Deny",
        [cnp("b", "Baseline", 1, DENY_ALL_IN), allow_in({})],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "NetworkPolicy isolation beats a Baseline Accept",
        [cnp("b", "Baseline", 1, ACCEPT_ALL_IN), DENY_INGRESS_X],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a Baseline Pass ends in the default allow",
        [cnp("b", "Baseline", 1, PASS_ALL_IN), cnp("c", "Baseline", 2, DENY_ALL_IN)],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "an Admin Pass reaches the Baseline tier when no NetworkPolicy selects the pod",
        [cnp("a", "Admin", 1, PASS_ALL_IN), cnp("b", "Baseline", 1, DENY_ALL_IN)],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a cluster policy's namespaces subject skips other namespaces",
        [
            cnp(
                "a",
                "Admin",
                1,
                DENY_ALL_IN | {"subject": {"namespaces": {"matchLabels": {"team": "red"}}}},
            )
        ],
        "x/b",
        "x/a",
        True,
    ),
    Case(
        "a cluster policy's pods subject selects by namespace and pod labels",
        [
            cnp(
                "a",
                "Admin",
                1,
                DENY_ALL_IN
                | {
                    "subject": {
                        "pods": {
                            "namespaceSelector": {"matchLabels": {"team": "blue"}},
                            "podSelector": {"matchLabels": {"pod": "a"}},
                        }
                    }
                },
            )
        ],
        "x/b",
        "x/a",
        False,
    ),
    Case(
        "a cluster policy never selects a host-network pod",
        [cnp("a", "Admin", 1, DENY_ALL_IN)],
        "x/b",
        "y/host",
        True,
    ),
    Case(
        "a nodes peer matches a node address",
        [
            cnp(
                "a",
                "Admin",
                1,
                {"egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"zone": "2"}}}]}]},
            )
        ],
        "x/b",
        "n2",
        False,
    ),
    Case(
        "a nodes peer does not match another node",
        [
            cnp(
                "a",
                "Admin",
                1,
                {"egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"zone": "2"}}}]}]},
            )
        ],
        "x/b",
        "n1",
        True,
    ),
    Case(
        "a networks peer matches pod addresses",
        [
            cnp(
                "a",
                "Admin",
                1,
                {"egress": [{"action": "Deny", "to": [{"networks": ["10.0.2.0/24"]}]}]},
            )
        ],
        "x/b",
        "y/a",
        False,
    ),
    Case(
        "a port range in a cluster policy is inclusive",
        [
            cnp(
                "a",
                "Admin",
                1,
                {
                    "ingress": [
                        {
                            "action": "Deny",
                            "from": [{"namespaces": {}}],
                            "protocols": [
                                {"tcp": {"destinationPort": {"range": {"start": 80, "end": 90}}}}
                            ],
                        }
                    ]
                },
            )
        ],
        "x/b",
        "x/a",
        False,
        port=90,
    ),
    Case(
        "a destinationNamedPort takes the container port's protocol",
        [
            cnp(
                "a",
                "Admin",
                1,
                {
                    "ingress": [
                        {
                            "action": "Deny",
                            "from": [{"namespaces": {}}],
                            "protocols": [{"destinationNamedPort": "dns"}],
                        }
                    ]
                },
            )
        ],
        "x/b",
        "x/a",
        False,
        proto="UDP",
        port=53,
    ),
    Case(
        "a destinationNamedPort does not match another protocol",
        [
            cnp(
                "a",
                "Admin",
                1,
                {
                    "ingress": [
                        {
                            "action": "Deny",
                            "from": [{"namespaces": {}}],
                            "protocols": [{"destinationNamedPort": "dns"}],
                        }
                    ]
                },
            )
        ],
        "x/b",
        "x/a",
        True,
        proto="TCP",
        port=53,
    ),
]


@pytest.mark.parametrize("case", TIERS, ids=[c.id for c in TIERS])
def test_tiers_are_evaluated_in_the_documented_order(case: Case) -> None:
    decision = decide(case.policies, case.src, case.dst, case.proto, case.port, case.icmp)
    assert decision.allowed is case.allowed, decision.reason


def test_a_decision_names_the_deciding_rule_and_tier() -> None:
    decision = decide(
        [
            cnp("p", "Admin", 3, {"ingress": PASS_ALL_IN["ingress"] + DENY_ALL_IN["ingress"]}),
            allow_in({}),
        ],
        "x/b",
        "x/a",
    )
    assert decision.verdict is Verdict.ALLOW
    assert decision.tier is Tier.NAMESPACE
    assert decision.rule == RuleRef(
        PolicyKind.NETWORK_POLICY, "x", "allow-in", Direction.INGRESS, 0
    )
    assert "Pass" in decision.reason


def test_an_isolating_policy_is_named_by_its_isolation_identity() -> None:
    decision = decide([DENY_INGRESS_X], "x/b", "x/a")
    assert decision.rule == RuleRef(
        PolicyKind.NETWORK_POLICY, "x", "deny-in", Direction.INGRESS, -1
    )
    assert decision.rule.is_isolation


def test_the_default_allow_names_no_rule_and_no_tier() -> None:
    decision = decide([], "x/b", "x/a")
    assert (decision.verdict, decision.tier, decision.rule) == (Verdict.ALLOW, None, None)
    assert [d.direction for d in decision.directions] == [Direction.EGRESS, Direction.INGRESS]


def test_an_egress_denial_is_the_deciding_direction() -> None:
    decision = decide([DENY_EGRESS_X, DENY_INGRESS_X], "x/b", "x/a")
    assert decision.rule is not None and decision.rule.direction is Direction.EGRESS


def test_traffic_between_addresses_that_are_not_pods_is_not_judged() -> None:
    decision = evaluate(
        STATE, [parse_policy(DENY_INGRESS_X)], Flow.of("8.8.8.8", "192.168.0.1", "TCP", 22)
    )
    assert decision.allowed and decision.directions == ()


def test_an_audit_mode_policy_never_drops_but_reports_what_it_would_do() -> None:
    audit = cnp("watch", "Admin", 1, DENY_ALL_IN | {"mode": "Audit"}, stockade=True)
    decision = decide([audit], "x/b", "x/a")
    assert decision.allowed
    assert decision.would_deny_in_audit
    assert decision.audit is not None
    assert decision.audit.rule == RuleRef(
        PolicyKind.STOCKADE_CLUSTER_NETWORK_POLICY, "", "watch", Direction.INGRESS, 0
    )


def test_an_audit_mode_network_policy_reports_its_isolation() -> None:
    audit = np_(
        "watch", {"mode": "Audit", "podSelector": {}, "policyTypes": ["Ingress"]}, stockade=True
    )
    decision = decide([audit], "x/b", "x/a")
    assert decision.allowed and decision.would_deny_in_audit
    assert (
        decision.audit is not None
        and decision.audit.rule is not None
        and decision.audit.rule.is_isolation
    )


def test_an_audit_mode_policy_does_not_open_what_an_enforced_policy_denies() -> None:
    audit = cnp("open", "Admin", 1, ACCEPT_ALL_IN | {"mode": "Audit"}, stockade=True)
    decision = decide([audit, DENY_INGRESS_X], "x/b", "x/a")
    assert not decision.allowed
    assert decision.audit is not None and decision.audit.verdict is Verdict.ALLOW
    assert not decision.would_deny_in_audit


def test_no_audit_finding_when_audit_policies_agree() -> None:
    audit = cnp("watch", "Admin", 1, DENY_ALL_IN | {"mode": "Audit"}, stockade=True)
    decision = decide([audit, DENY_INGRESS_X], "x/b", "x/a")
    assert not decision.allowed and decision.audit is None


def test_a_flow_rejects_mixed_address_families() -> None:
    with pytest.raises(ValueError, match="mixes address families"):
        Flow.of("10.0.0.1", "fd00::1", "TCP", 80)


def test_a_flow_rejects_icmp_over_ipv6() -> None:
    with pytest.raises(ValueError, match="IPv6 flows use ICMPv6"):
        Flow(ip("fd00::1"), ip("fd00::2"), Protocol.ICMP, None, 8, 0)


def test_link_control_follows_the_on_link_rules() -> None:
    import ipaddress

    from stockade.model.evaluator import LinkControl, link_control

    ll, glob, unspec = (ipaddress.ip_address(a) for a in ("fe80::1", "fd00::1", "::"))
    assert link_control(135, glob, 255, True) is LinkControl.OK
    assert link_control(135, glob, 254, False) is LinkControl.NOT_ON_LINK  # routed
    assert link_control(134, ll, 255, True) is LinkControl.NOT_A_ROUTER
    assert link_control(137, ll, 255, False) is LinkControl.OK
    assert link_control(134, glob, 255, False) is LinkControl.NOT_ON_LINK
    assert link_control(143, unspec, 1, True) is LinkControl.OK
    assert link_control(143, ll, 2, True) is LinkControl.NOT_ON_LINK
    assert link_control(130, glob, 1, False) is LinkControl.NOT_ON_LINK
