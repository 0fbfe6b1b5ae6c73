"""What the policy models mean beyond accept/reject: CIDR parsing as the API server does it,
selector matching, the standard's policyTypes defaulting, every error reported at once."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.model.crd import parse_policy
from stockade.model.crd_common import LabelSelector, parse_cidr
from stockade.model.crd_scnp import ClusterNetworkPolicySpec
from stockade.model.crd_snp import NetworkPolicySpec, StockadeNetworkPolicy
from stockade.model.errors import PolicyParseError
from tests.unit.test_crd_cases import scnp, snp


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("192.0.2.7/32", "192.0.2.7/32"),
        ("fd00::/8", "fd00::/8"),
        ("::/0", "::/0"),
    ],
    ids=["ipv4", "ipv4-everything", "ipv4-host", "ipv6", "ipv6-everything"],
)
def test_a_network_address_with_a_prefix_length_is_a_cidr(text: str, network: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0",
        "10.0.0.0/",
        "10.0.0.0/8/8",
        "010.0.0.0/8",
        "fe80::%eth0/64",
        "::ffff:10.0.0.0/104",
        "",
    ],
    ids=[
        "no-length",
        "empty-length",
        "two-lengths",
        "leading-zero",
        "zone",
        "ipv4-mapped",
        "empty",
    ],
)
def test_a_string_the_api_server_would_not_parse_is_not_a_cidr(text: str) -> None:
    with pytest.raises(ValueError, match="valid CIDR"):
        parse_cidr(text)


def test_a_cidr_with_host_bits_names_the_network_it_meant() -> None:
    with pytest.raises(ValueError, match=r"did you mean 10\.1\.0\.0/16"):
        parse_cidr("10.1.2.3/16")


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({}, {}, True),
        ({"matchLabels": {"app": "web"}}, {"app": "web", "x": "y"}, True),
        ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
        (
            {"matchExpressions": [{"key": "env", "operator": "In", "values": ["a", "b"]}]},
            {"env": "b"},
            True,
        ),
        ({"matchExpressions": [{"key": "env", "operator": "In", "values": ["a"]}]}, {}, False),
        ({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["a"]}]},
            {"env": "a"},
            False,
        ),
        ({"matchExpressions": [{"key": "env", "operator": "Exists"}]}, {"env": ""}, True),
        ({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}, {"env": ""}, False),
    ],
    ids=[
        "empty",
        "labels",
        "labels-differ",
        "in",
        "in-absent",
        "notin-absent",
        "notin",
        "exists",
        "doesnotexist",
    ],
)
def test_a_label_selector_matches_as_kubernetes_does(
    selector: dict[str, object], labels: dict[str, str], matches: bool
) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is matches


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ({"podSelector": {}}, {"Ingress"}),
        ({"podSelector": {}, "egress": [{}]}, {"Ingress", "Egress"}),
        ({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}, {"Egress"}),
        ({"podSelector": {}, "policyTypes": []}, set()),
    ],
    ids=["default-ingress", "egress-rules-add-egress", "explicit", "explicit-empty"],
)
def test_policy_types_default_as_in_the_standard(spec: dict[str, object], types: set[str]) -> None:
    assert NetworkPolicySpec.model_validate(spec).effective_policy_types() == types


def test_every_problem_of_an_object_is_reported_with_its_path() -> None:
    obj = snp(
        mode="Sometimes",
        ingress=[
            {"from": [{"ipBlock": {"cidr": "10.0.0.1/8"}}], "ports": [{"port": 0}]},
            {"action": "Maybe", "ports": [{"port": 80, "endPort": 8}]},
        ],
    )
    with pytest.raises(PolicyParseError) as info:
        parse_policy(obj)
    assert sorted(e.path for e in info.value.problems) == [
        "spec.ingress[0].from[0].ipBlock.cidr",
        "spec.ingress[0].ports[0].port",
        "spec.ingress[1].action",
        "spec.ingress[1].ports[0].endPort",
        "spec.mode",
    ]
    assert "spec.ingress[1].ports[0].endPort: endPort must not be below port (80)" in str(
        info.value
    )


def test_an_object_of_another_kind_is_refused_by_name() -> None:
    obj = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"}}
    with pytest.raises(PolicyParseError, match="not a stockade policy"):
        parse_policy(obj)


def test_defaults_are_allow_and_enforce_and_tcp() -> None:
    policy = parse_policy(snp(ingress=[{"ports": [{"port": 80}, {"icmpv6": {"type": 128}}]}]))
    assert isinstance(policy, StockadeNetworkPolicy)
    assert policy.spec.mode == "Enforce"
    assert policy.spec.ingress is not None
    rule = policy.spec.ingress[0]
    assert rule.action == "Allow"
    assert [p.effective_protocol for p in rule.ports or ()] == ["TCP", "ICMPv6"]


def test_an_upstream_cluster_network_policy_spec_parses_unchanged() -> None:
    upstream = {
        "tier": "Admin",
        "priority": 3,
        "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "ns-a"}}},
        "ingress": [
            {
                "name": "allow-from-b",
                "action": "Accept",
                "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "ns-b"}}}],
            },
            {
                "name": "deny-from-c-at-80",
                "action": "Deny",
                "from": [
                    {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}}
                ],
                "protocols": [{"tcp": {"destinationPort": {"number": 80}}}],
            },
        ],
        "egress": [
            {"name": "to-net", "action": "Pass", "to": [{"networks": ["0.0.0.0/0"]}]},
        ],
    }
    spec = ClusterNetworkPolicySpec.model_validate(upstream)
    assert spec.model_dump(exclude_none=True, exclude_defaults=True) == upstream


def test_the_models_serialise_back_to_the_wire_names() -> None:
    policy = parse_policy(scnp(egress=[{"action": "Deny", "to": [{"networks": ["fd00::/8"]}]}]))
    dumped = policy.model_dump(exclude_none=True)
    assert dumped["apiVersion"] == "stockade.io/v1alpha1"
    assert dumped["spec"]["egress"][0]["to"] == [{"networks": ["fd00::/8"]}]
