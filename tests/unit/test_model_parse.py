"""Parsing every policy kind into the one internal representation, and rejecting bad objects."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.model.errors import PolicyParseError
from stockade.model.parse import parse_policy
from stockade.model.policy import (
    AnyPeer,
    AnyPort,
    CidrPeer,
    Direction,
    IcmpMatch,
    Mode,
    NamedPort,
    NodePeer,
    PodPeer,
    PodSet,
    Policy,
    PolicyKind,
    PortRange,
    Protocol,
    RuleAction,
    RuleRef,
    Tier,
)
from stockade.model.selectors import EVERYTHING, LabelSelector

NP = ("networking.k8s.io/v1", "NetworkPolicy")
SNP = ("stockade.io/v1alpha1", "NetworkPolicy")
SCNP = ("stockade.io/v1alpha1", "ClusterNetworkPolicy")
CNP = ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy")


def obj(kind: tuple[str, str], spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind[1] == "NetworkPolicy":
        meta["namespace"] = "x"
    if kind == SNP:  # the CRD requires podSelector (the standard kind defaults it)
        spec = {"podSelector": {}} | spec
    return {"apiVersion": kind[0], "kind": kind[1], "metadata": meta, "spec": spec}


def np_(spec: dict[str, Any], kind: tuple[str, str] = NP) -> Policy:
    return parse_policy(obj(kind, spec))


def cnp(spec: dict[str, Any], kind: tuple[str, str] = CNP) -> Policy:
    base = {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}}
    return parse_policy(obj(kind, base | spec))


def errors(o: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyParseError) as info:
        parse_policy(o)
    return [str(p) for p in info.value.problems]


POLICY_TYPES = [
    ("absent policyTypes and no egress mean ingress only", {}, {Direction.INGRESS}),
    (
        "absent policyTypes with an empty egress list mean ingress only",
        {"egress": []},
        {Direction.INGRESS},
    ),
    (
        "absent policyTypes with egress rules mean both",
        {"egress": [{}]},
        {Direction.INGRESS, Direction.EGRESS},
    ),
    (
        "absent policyTypes with only ingress rules mean ingress",
        {"ingress": [{}]},
        {Direction.INGRESS},
    ),
    ("explicit Egress alone is egress only", {"policyTypes": ["Egress"]}, {Direction.EGRESS}),
    (
        "explicit both",
        {"policyTypes": ["Ingress", "Egress"]},
        {Direction.INGRESS, Direction.EGRESS},
    ),
]


@pytest.mark.parametrize(
    ("spec", "expected"), [p[1:] for p in POLICY_TYPES], ids=[p[0] for p in POLICY_TYPES]
)
def test_policy_types_default_as_the_standard_defines(
    spec: dict[str, Any], expected: set[Direction]
) -> None:
    assert np_({"podSelector": {}} | spec).directions == expected


def test_rules_of_a_direction_left_out_of_policy_types_are_dropped() -> None:
    policy = np_({"policyTypes": ["Ingress"], "egress": [{"to": [{"podSelector": {}}]}]})
    assert policy.egress == ()


def test_an_absent_pod_selector_selects_every_pod_of_the_namespace() -> None:
    assert np_({}).subject == PodSet(EVERYTHING, namespace="x")


def test_a_rule_without_peers_or_ports_matches_every_peer_and_port() -> None:
    rule = np_({"ingress": [{}]}).ingress[0]
    assert (rule.peers, rule.ports, rule.action) == ((AnyPeer(),), (AnyPort(),), RuleAction.ALLOW)


def test_empty_peer_and_port_lists_mean_every_peer_and_port_too() -> None:
    rule = np_({"ingress": [{"from": [], "ports": []}]}).ingress[0]
    assert (rule.peers, rule.ports) == ((AnyPeer(),), (AnyPort(),))


SEL_A = LabelSelector.of({"pod": "a"})
SEL_Y = LabelSelector.of({"ns": "y"})
PEERS = [
    (
        "podSelector alone is the policy's own namespace",
        {"podSelector": {"matchLabels": {"pod": "a"}}},
        PodPeer(PodSet(SEL_A, namespace="x")),
    ),
    (
        "empty podSelector alone is every pod of the own namespace",
        {"podSelector": {}},
        PodPeer(PodSet(EVERYTHING, namespace="x")),
    ),
    (
        "namespaceSelector alone is every pod of those namespaces",
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        PodPeer(PodSet(EVERYTHING, SEL_Y)),
    ),
    (
        "empty namespaceSelector is every namespace",
        {"namespaceSelector": {}},
        PodPeer(PodSet(EVERYTHING, EVERYTHING)),
    ),
    (
        "both selectors in one peer are ANDed",
        {
            "namespaceSelector": {"matchLabels": {"ns": "y"}},
            "podSelector": {"matchLabels": {"pod": "a"}},
        },
        PodPeer(PodSet(SEL_A, SEL_Y)),
    ),
    (
        "ipBlock with except",
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
        CidrPeer(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.1.0.0/16"),)),
    ),
    (
        "ipBlock with host bits set is normalised",
        {"ipBlock": {"cidr": "10.244.1.10/4"}},
        CidrPeer(ipaddress.ip_network("0.0.0.0/4")),
    ),
    (
        "IPv6 ipBlock",
        {"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::1/128"]}},
        CidrPeer(ipaddress.ip_network("fd00::/64"), (ipaddress.ip_network("fd00::1/128"),)),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [p[1:] for p in PEERS], ids=[p[0] for p in PEERS])
def test_network_policy_peers_parse_to_their_meaning(raw: dict[str, Any], expected: object) -> None:
    assert np_({"ingress": [{"from": [raw]}]}).ingress[0].peers == (expected,)


def test_separate_peers_are_alternatives() -> None:
    peers = (
        np_({"ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {}}]}]})
        .ingress[0]
        .peers
    )
    assert len(peers) == 2


PORTS = [
    ("protocol defaults to TCP", {"port": 80}, PortRange(Protocol.TCP, 80, 80)),
    ("protocol without port is every port", {"protocol": "UDP"}, PortRange(Protocol.UDP)),
    (
        "endPort makes a range",
        {"protocol": "SCTP", "port": 1000, "endPort": 2000},
        PortRange(Protocol.SCTP, 1000, 2000),
    ),
    (
        "a string port is a named port",
        {"port": "serve-80-tcp"},
        NamedPort("serve-80-tcp", Protocol.TCP),
    ),
    (
        "a named UDP port keeps its protocol",
        {"protocol": "UDP", "port": "dns"},
        NamedPort("dns", Protocol.UDP),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [p[1:] for p in PORTS], ids=[p[0] for p in PORTS])
def test_network_policy_ports_parse_to_their_meaning(raw: dict[str, Any], expected: object) -> None:
    assert np_({"ingress": [{"ports": [raw]}]}).ingress[0].ports == (expected,)


STOCKADE_PORTS = [
    ("icmp type and code", {"icmp": {"type": 3, "code": 4}}, IcmpMatch(Protocol.ICMP, 3, 4)),
    (
        "icmp type alone matches every code",
        {"icmp": {"type": 8}},
        IcmpMatch(Protocol.ICMP, 8, None),
    ),
    ("icmpv6", {"icmpv6": {"type": 128}}, IcmpMatch(Protocol.ICMPV6, 128, None)),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [p[1:] for p in STOCKADE_PORTS], ids=[p[0] for p in STOCKADE_PORTS]
)
def test_stockade_network_policy_ports_take_icmp_matches(
    raw: dict[str, Any], expected: object
) -> None:
    assert np_({"ingress": [{"ports": [raw]}]}, SNP).ingress[0].ports == (expected,)


def test_stockade_network_policy_rules_carry_actions_and_the_policy_a_mode() -> None:
    policy = np_({"mode": "Audit", "ingress": [{"action": "Deny"}, {}]}, SNP)
    assert policy.mode is Mode.AUDIT
    assert [r.action for r in policy.ingress] == [RuleAction.DENY, RuleAction.ALLOW]
    assert policy.kind is PolicyKind.STOCKADE_NETWORK_POLICY


def test_every_rule_has_a_stable_identity_and_the_isolation_default_its_own() -> None:
    policy = np_({"podSelector": {}, "egress": [{}, {}], "policyTypes": ["Egress"]})
    assert policy.egress[1].ref == RuleRef(PolicyKind.NETWORK_POLICY, "x", "p", Direction.EGRESS, 1)
    iso = policy.isolation_ref(Direction.EGRESS)
    assert iso.is_isolation and iso not in {r.ref for r in policy.egress}


def test_an_upstream_cluster_network_policy_parses_every_peer_and_protocol_shape() -> None:
    policy = cnp(
        {
            "tier": "Baseline",
            "priority": 1000,
            "subject": {
                "pods": {
                    "namespaceSelector": {"matchLabels": {"ns": "y"}},
                    "podSelector": {"matchLabels": {"pod": "a"}},
                }
            },
            "ingress": [
                {
                    "name": "in",
                    "action": "Pass",
                    "from": [{"namespaces": {}}, {"pods": {"podSelector": {}}}],
                }
            ],
            "egress": [
                {
                    "name": "out",
                    "action": "Accept",
                    "to": [
                        {"networks": ["10.0.0.0/8", "::/0"]},
                        {"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}},
                    ],
                    "protocols": [
                        {"tcp": {"destinationPort": {"number": 80}}},
                        {"udp": {"destinationPort": {"range": {"start": 5000, "end": 6000}}}},
                        {"sctp": {"destinationPort": {"number": 9003}}},
                    ],
                },
                {
                    "action": "Deny",
                    "to": [{"pods": {"podSelector": {}}}],
                    "protocols": [{"destinationNamedPort": "web"}],
                },
            ],
        }
    )
    assert (policy.tier, policy.priority, policy.namespace) == (Tier.BASELINE, 1000, "")
    assert policy.subject == PodSet(SEL_A, SEL_Y)
    assert policy.ingress[0].action is RuleAction.PASS
    assert policy.ingress[0].peers == (PodPeer(PodSet(EVERYTHING, EVERYTHING)),)
    out = policy.egress[0]
    assert out.action is RuleAction.ALLOW and out.name == "out"
    assert out.peers == (
        CidrPeer(ipaddress.ip_network("10.0.0.0/8")),
        CidrPeer(ipaddress.ip_network("::/0")),
        NodePeer(LabelSelector.of({"kubernetes.io/os": "linux"})),
    )
    assert out.ports == (
        PortRange(Protocol.TCP, 80, 80),
        PortRange(Protocol.UDP, 5000, 6000),
        PortRange(Protocol.SCTP, 9003, 9003),
    )
    assert policy.egress[1].ports == (NamedPort("web", None),)
    assert policy.directions == {Direction.INGRESS, Direction.EGRESS}


def test_stockade_and_upstream_cluster_network_policies_parse_alike() -> None:
    spec = {
        "ingress": [
            {
                "action": "Deny",
                "from": [{"namespaces": {}}],
                "protocols": [{"tcp": {"destinationPort": {"number": 22}}}],
            }
        ]
    }
    upstream, ours = cnp(spec, CNP), cnp(spec, SCNP)
    assert upstream.ingress[0].action == ours.ingress[0].action
    assert upstream.ingress[0].peers == ours.ingress[0].peers
    assert upstream.ingress[0].ports == ours.ingress[0].ports
    assert ours.kind is PolicyKind.STOCKADE_CLUSTER_NETWORK_POLICY


def test_a_cluster_network_policy_without_egress_rules_does_not_affect_egress() -> None:
    assert cnp({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}).directions == {
        Direction.INGRESS
    }


def test_stockade_cluster_network_policies_take_icmp_and_mode() -> None:
    policy = cnp(
        {
            "mode": "Audit",
            "egress": [
                {
                    "action": "Deny",
                    "to": [{"networks": ["0.0.0.0/0"]}],
                    "protocols": [{"icmp": {"type": 8, "code": 0}}],
                }
            ],
        },
        SCNP,
    )
    assert policy.mode is Mode.AUDIT
    assert policy.egress[0].ports == (IcmpMatch(Protocol.ICMP, 8, 0),)


INVALID = [
    (
        "endPort below port",
        obj(NP, {"ingress": [{"ports": [{"port": 80}, {"port": 90, "endPort": 89}]}]}),
        "spec.ingress[0].ports[1].endPort: must be >= port (90), got 89",
    ),
    (
        "endPort with a named port",
        obj(NP, {"ingress": [{"ports": [{"port": "web", "endPort": 90}]}]}),
        "spec.ingress[0].ports[0].endPort: may not be set when port is a named port",
    ),
    (
        "endPort without port",
        obj(NP, {"egress": [{"ports": [{"endPort": 90}]}]}),
        "spec.egress[0].ports[0].endPort: may not be set without port",
    ),
    (
        "port out of range",
        obj(NP, {"ingress": [{"ports": [{"port": 70000}]}]}),
        "spec.ingress[0].ports[0].port: must be between 1 and 65535, got 70000",
    ),
    (
        "unknown protocol",
        obj(NP, {"ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
        "spec.ingress[0].ports[0].protocol: must be one of TCP, UDP, SCTP, got 'ICMP'",
    ),
    (
        "invalid port name",
        obj(NP, {"ingress": [{"ports": [{"port": "Web_Port"}]}]}),
        "spec.ingress[0].ports[0].port: 'Web_Port' is not a valid port name (IANA_SVC_NAME: 1-15 "
        "lowercase a-z0-9 and -)",
    ),
    (
        "bad CIDR",
        obj(NP, {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
        "spec.egress[0].to[0].ipBlock.cidr: '10.0.0.0/33' is not a valid CIDR",
    ),
    (
        "except outside its CIDR",
        obj(
            NP,
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
        ),
        "spec.egress[0].to[0].ipBlock.except[0]: 11.0.0.0/16 must be strictly within cidr "
        "10.0.0.0/8",
    ),
    (
        "ipBlock with a selector",
        obj(NP, {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
        "spec.ingress[0].from[0]: ipBlock may not be combined with podSelector or "
        "namespaceSelector",
    ),
    (
        "empty peer",
        obj(NP, {"ingress": [{"from": [{}]}]}),
        "spec.ingress[0].from[0]: must specify at least one of podSelector, namespaceSelector, "
        "ipBlock",
    ),
    (
        "action on a standard policy",
        obj(NP, {"ingress": [{"action": "Deny"}]}),
        "spec.ingress[0].action: unknown field",
    ),
    (
        "unknown stockade action",
        obj(SNP, {"ingress": [{"action": "Accept"}]}),
        "spec.ingress[0].action: must be one of Allow, Deny, got 'Accept'",
    ),
    (
        "icmp with a port",
        obj(SNP, {"ingress": [{"ports": [{"icmp": {"type": 8}, "port": 80}]}]}),
        "spec.ingress[0].ports[0].icmp: icmp and icmpv6 cannot be combined with protocol, port "
        "or endPort",
    ),
    (
        "icmp type out of range",
        obj(SNP, {"ingress": [{"ports": [{"icmp": {"type": 256}}]}]}),
        "spec.ingress[0].ports[0].icmp.type: must be between 0 and 255, got 256",
    ),
    (
        "unknown mode",
        obj(SNP, {"mode": "Dry"}),
        "spec.mode: must be one of Enforce, Audit, got 'Dry'",
    ),
    ("mode on a standard policy", obj(NP, {"mode": "Audit"}), "spec.mode: unknown field"),
    (
        "bad policy type",
        obj(NP, {"policyTypes": ["Both"]}),
        "spec.policyTypes[0]: must be one of Ingress, Egress, got 'Both'",
    ),
    (
        "missing namespace",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p"},
            "spec": {},
        },
        "metadata.namespace: required",
    ),
    (
        "unknown kind",
        {"apiVersion": "v1", "kind": "Pod"},
        "kind: unsupported apiVersion/kind 'v1'/'Pod'; expected one of "
        "networking.k8s.io/v1/NetworkPolicy, stockade.io/v1alpha1/NetworkPolicy, "
        "stockade.io/v1alpha1/ClusterNetworkPolicy, "
        "policy.networking.k8s.io/v1alpha2/ClusterNetworkPolicy",
    ),
    (
        "priority out of range",
        obj(CNP, {"tier": "Admin", "priority": 1001, "subject": {"namespaces": {}}}),
        "spec.priority: must be between 0 and 1000, got 1001",
    ),
    (
        "unknown tier",
        obj(CNP, {"tier": "Namespace", "priority": 1, "subject": {"namespaces": {}}}),
        "spec.tier: must be one of Admin, Baseline, got 'Namespace'",
    ),
    (
        "subject with both fields",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}, "pods": {"podSelector": {}}},
            },
        ),
        "spec.subject: exactly one of namespaces, pods must be set, got 2",
    ),
    (
        "unknown cnp action",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}},
                "ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}],
            },
        ),
        "spec.ingress[0].action: must be one of Accept, Deny, Pass, got 'Allow'",
    ),
    (
        "cnp rule without peers",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}},
                "egress": [{"action": "Deny", "to": []}],
            },
        ),
        "spec.egress[0].to: must have 1 to 25 peers",
    ),
    (
        "networks peer on ingress",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}},
                "ingress": [{"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}],
            },
        ),
        "spec.ingress[0].from[0].networks: unknown field",
    ),
    (
        "range end below start",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}},
                "egress": [
                    {
                        "action": "Deny",
                        "to": [{"namespaces": {}}],
                        "protocols": [
                            {"tcp": {"destinationPort": {"range": {"start": 80, "end": 79}}}}
                        ],
                    }
                ],
            },
        ),
        "spec.egress[0].protocols[0].tcp.destinationPort.range.end: must be at least start "
        "(80), got 79",
    ),
    (
        "named port with a networks peer",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}},
                "egress": [
                    {
                        "action": "Deny",
                        "to": [{"networks": ["10.0.0.0/8"]}],
                        "protocols": [{"destinationNamedPort": "web"}],
                    }
                ],
            },
        ),
        "spec.egress[0].protocols: destinationNamedPort cannot be used with networks or nodes "
        "peers (they have no named ports)",
    ),
    (
        "icmp on the upstream kind",
        obj(
            CNP,
            {
                "tier": "Admin",
                "priority": 1,
                "subject": {"namespaces": {}},
                "egress": [
                    {
                        "action": "Deny",
                        "to": [{"namespaces": {}}],
                        "protocols": [{"icmp": {"type": 8}}],
                    }
                ],
            },
        ),
        "spec.egress[0].protocols[0].icmp: unknown field",
    ),
]


@pytest.mark.parametrize(("raw", "message"), [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_an_invalid_policy_is_rejected_with_a_message_naming_the_field(
    raw: dict[str, Any], message: str
) -> None:
    assert message in errors(raw)


def test_every_problem_is_reported_not_only_the_first() -> None:
    raw = obj(
        NP,
        {
            "podSelector": {"matchLabels": {"a": 1}},
            "ingress": [{"ports": [{"port": 0}]}],
            "egress": [{"to": [{}]}],
        },
    )
    assert errors(raw) == [
        "spec.podSelector.matchLabels.a: must be a string, got int",
        "spec.ingress[0].ports[0].port: must be between 1 and 65535, got 0",
        "spec.egress[0].to[0]: must specify at least one of podSelector, namespaceSelector, "
        "ipBlock",
    ]


def test_a_domain_names_peer_is_reported_as_unsupported_rather_than_malformed() -> None:
    raw = obj(
        CNP,
        {
            "tier": "Admin",
            "priority": 1,
            "subject": {"namespaces": {}},
            "egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}],
        },
    )
    with pytest.raises(PolicyParseError) as info:
        parse_policy(raw)
    assert info.value.only_unsupported


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.sampled_from(["", "TCP", "Deny", "Accept", "10.0.0.0/8", "web", "In", "x"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "spec",
                    "podSelector",
                    "ingress",
                    "egress",
                    "from",
                    "to",
                    "ports",
                    "port",
                    "endPort",
                    "protocol",
                    "ipBlock",
                    "cidr",
                    "except",
                    "namespaces",
                    "pods",
                    "networks",
                    "tier",
                    "priority",
                    "subject",
                    "action",
                    "matchLabels",
                    "matchExpressions",
                    "icmp",
                    "type",
                    "protocols",
                    "tcp",
                    "destinationPort",
                    "number",
                    "range",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.sampled_from([NP, SNP, SCNP, CNP]), JSON)
def test_the_parser_never_crashes_on_an_arbitrary_object(
    kind: tuple[str, str], spec: object
) -> None:
    raw = {
        "apiVersion": kind[0],
        "kind": kind[1],
        "metadata": {"name": "p", "namespace": "x"},
        "spec": spec,
    }
    try:
        policy = parse_policy(raw)
    except PolicyParseError as err:
        assert err.problems
    else:
        assert isinstance(policy, Policy)


@given(JSON)
def test_the_parser_never_crashes_on_an_arbitrary_top_level_value(value: object) -> None:
    with pytest.raises(PolicyParseError):
        parse_policy(value)
