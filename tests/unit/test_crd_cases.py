"""Bad and good policy objects, and the pydantic models' verdict on each.

The same tables drive tests/apiserver/test_crd_validation.py, which applies every object to a
real API server with the generated CRDs installed: a bad object must be rejected by both, each
naming the same field, and a good one accepted by both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.model.crd import parse_policy
from stockade.model.errors import PolicyParseError

Obj = dict[str, Any]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def snp(**spec: Any) -> Obj:
    body: Obj = {"podSelector": {}}
    body.update(spec)
    return {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "case"},
        "spec": body,
    }


def snp_peer(peer: Obj) -> Obj:
    return snp(ingress=[{"from": [peer]}])


def snp_block(cidr: str, *excepted: str) -> Obj:
    block: Obj = {"cidr": cidr}
    if excepted:
        block["except"] = list(excepted)
    return snp_peer({"ipBlock": block})


def snp_port(port: Obj) -> Obj:
    return snp(ingress=[{"ports": [port]}])


def snp_selector(selector: Obj) -> Obj:
    return snp(podSelector=selector)


def scnp(**spec: Any) -> Obj:
    body: Obj = {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}}
    body.update(spec)
    return {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "case"},
        "spec": body,
    }


def scnp_in(**rule: Any) -> Obj:
    body: Obj = {"action": "Deny", "from": [{"namespaces": {}}]}
    body.update(rule)
    return scnp(ingress=[body])


def scnp_out(**rule: Any) -> Obj:
    body: Obj = {"action": "Deny", "to": [{"namespaces": {}}]}
    body.update(rule)
    return scnp(egress=[body])


def scnp_proto(proto: Obj) -> Obj:
    return scnp_in(protocols=[proto])


def without(obj: Obj, field: str) -> Obj:
    """`obj` with `field` removed from its spec."""
    spec = {k: v for k, v in obj["spec"].items() if k != field}
    return {**obj, "spec": spec}


@dataclass(frozen=True)
class Bad:
    id: str
    obj: Obj
    path: str  # the field the error must name, as the API server writes it


P0 = "spec.ingress[0].ports[0]"
B0 = "spec.ingress[0].from[0].ipBlock"
SEL = "spec.podSelector.matchExpressions[0]"
TCP_PORT = "spec.ingress[0].protocols[0].tcp.destinationPort"

BAD: list[Bad] = [
    # stockade NetworkPolicy: CIDRs
    Bad("snp-cidr-malformed", snp_block("10.0.0.300/24"), f"{B0}.cidr"),
    Bad("snp-cidr-without-length", snp_block("10.0.0.0"), f"{B0}.cidr"),
    Bad("snp-cidr-prefix-too-long", snp_block("10.0.0.0/33"), f"{B0}.cidr"),
    Bad("snp-cidr-host-bits", snp_block("10.0.0.1/8"), f"{B0}.cidr"),
    Bad("snp-except-equals-cidr", snp_block("10.0.0.0/8", "10.0.0.0/8"), f"{B0}.except"),
    Bad("snp-cidr-leading-zero", snp_block("010.0.0.0/8"), f"{B0}.cidr"),
    Bad("snp-cidr-ipv4-mapped-ipv6", snp_block("::ffff:10.0.0.0/104"), f"{B0}.cidr"),
    Bad("snp-cidr-ipv6-zone", snp_block("fe80::%eth0/64"), f"{B0}.cidr"),
    Bad("snp-cidr-ipv6-host-bits", snp_block("fd00::1/64"), f"{B0}.cidr"),
    Bad("snp-except-outside-cidr", snp_block("10.0.0.0/8", "192.168.0.0/16"), f"{B0}.except"),
    Bad("snp-except-wider-than-cidr", snp_block("10.1.0.0/16", "10.0.0.0/8"), f"{B0}.except"),
    Bad("snp-except-other-family", snp_block("10.0.0.0/8", "fd00::/64"), f"{B0}.except"),
    Bad("snp-except-host-bits", snp_block("10.0.0.0/8", "10.1.0.1/16"), f"{B0}.except[0]"),
    Bad(
        "snp-egress-cidr-malformed",
        snp(egress=[{"to": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]),
        "spec.egress[0].to[0].ipBlock.cidr",
    ),
    # ports
    Bad("snp-endport-below-port", snp_port({"port": 80, "endPort": 79}), f"{P0}.endPort"),
    Bad("snp-endport-with-named-port", snp_port({"port": "http", "endPort": 90}), f"{P0}.endPort"),
    Bad("snp-endport-without-port", snp_port({"endPort": 90}), f"{P0}.endPort"),
    Bad("snp-endport-65536", snp_port({"port": 80, "endPort": 65536}), f"{P0}.endPort"),
    Bad("snp-port-0", snp_port({"port": 0}), f"{P0}.port"),
    Bad("snp-port-65536", snp_port({"port": 65536}), f"{P0}.port"),
    Bad("snp-port-name-upper-case", snp_port({"port": "HTTP"}), f"{P0}.port"),
    Bad("snp-port-name-too-long", snp_port({"port": "a-very-long-port-name"}), f"{P0}.port"),
    Bad("snp-port-name-digits-only", snp_port({"port": "8080"}), f"{P0}.port"),
    Bad("snp-protocol-unknown", snp_port({"protocol": "ICMP", "port": 80}), f"{P0}.protocol"),
    Bad("snp-icmp-with-port", snp_port({"port": 80, "icmp": {"type": 8}}), f"{P0}.icmp"),
    Bad("snp-icmp-with-protocol", snp_port({"protocol": "UDP", "icmp": {"type": 8}}), f"{P0}.icmp"),
    Bad(
        "snp-icmp-and-icmpv6",
        snp_port({"icmp": {"type": 8}, "icmpv6": {"type": 128}}),
        f"{P0}.icmpv6",
    ),
    Bad("snp-icmp-type-256", snp_port({"icmp": {"type": 256}}), f"{P0}.icmp.type"),
    Bad(
        "snp-icmpv6-code-negative",
        snp_port({"icmpv6": {"type": 1, "code": -1}}),
        f"{P0}.icmpv6.code",
    ),
    # rules, peers, selectors
    Bad("snp-action-unknown", snp(ingress=[{"action": "Reject"}]), "spec.ingress[0].action"),
    Bad("snp-mode-unknown", snp(mode="DryRun"), "spec.mode"),
    Bad("snp-policy-type-unknown", snp(policyTypes=["Both"]), "spec.policyTypes[0]"),
    Bad("snp-policy-type-duplicate", snp(policyTypes=["Ingress", "Ingress"]), "spec.policyTypes"),
    Bad("snp-pod-selector-missing", without(snp(), "podSelector"), "spec.podSelector"),
    Bad(
        "snp-peer-ipblock-and-selector",
        snp_peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}),
        "spec.ingress[0].from[0]",
    ),
    Bad("snp-peer-empty", snp_peer({}), "spec.ingress[0].from[0]"),
    Bad(
        "snp-selector-operator-unknown",
        snp_selector({"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}),
        f"{SEL}.operator",
    ),
    Bad(
        "snp-selector-exists-with-values",
        snp_selector({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}),
        f"{SEL}.values",
    ),
    Bad(
        "snp-selector-in-without-values",
        snp_selector({"matchExpressions": [{"key": "app", "operator": "In"}]}),
        f"{SEL}.values",
    ),
    Bad(
        "snp-selector-key-malformed",
        snp_selector({"matchExpressions": [{"key": "-app", "operator": "Exists"}]}),
        f"{SEL}.key",
    ),
    Bad(
        "snp-selector-label-value-malformed",
        snp_selector({"matchLabels": {"app": "-web-"}}),
        "spec.podSelector.matchLabels.app",
    ),
    Bad("snp-too-many-rules", snp(ingress=[{}] * 65), "spec.ingress"),
    Bad(
        "snp-too-many-peers",
        snp(ingress=[{"from": [{"podSelector": {}}] * 65}]),
        "spec.ingress[0].from",
    ),
    Bad(
        "snp-too-many-ports", snp(ingress=[{"ports": [{"port": 80}] * 65}]), "spec.ingress[0].ports"
    ),
    Bad("snp-too-many-excepts", snp_block("10.0.0.0/8", *(["10.1.0.0/16"] * 33)), f"{B0}.except"),
    # stockade ClusterNetworkPolicy
    Bad("scnp-tier-unknown", scnp(tier="Platform"), "spec.tier"),
    Bad("scnp-tier-missing", without(scnp(), "tier"), "spec.tier"),
    Bad("scnp-priority-above-1000", scnp(priority=1001), "spec.priority"),
    Bad("scnp-priority-negative", scnp(priority=-1), "spec.priority"),
    Bad("scnp-mode-unknown", scnp(mode="Monitor"), "spec.mode"),
    Bad(
        "scnp-subject-two-kinds",
        scnp(subject={"namespaces": {}, "pods": {"podSelector": {}}}),
        "spec.subject",
    ),
    Bad("scnp-subject-empty", scnp(subject={}), "spec.subject"),
    Bad("scnp-action-unknown", scnp_in(action="Allow"), "spec.ingress[0].action"),
    Bad("scnp-rule-name-too-long", scnp_in(name="r" * 101), "spec.ingress[0].name"),
    Bad("scnp-from-empty", scnp_in(**{"from": []}), "spec.ingress[0].from"),
    Bad(
        "scnp-ingress-peer-two-kinds",
        scnp_in(**{"from": [{"namespaces": {}, "pods": {"podSelector": {}}}]}),
        "spec.ingress[0].from[0]",
    ),
    Bad(
        "scnp-ingress-peer-networks",
        scnp_in(**{"from": [{"networks": ["10.0.0.0/8"]}]}),
        "spec.ingress[0].from[0]",
    ),
    Bad(
        "scnp-egress-peer-two-kinds",
        scnp_out(to=[{"networks": ["10.0.0.0/8"], "nodes": {}}]),
        "spec.egress[0].to[0]",
    ),
    Bad(
        "scnp-networks-malformed",
        scnp_out(to=[{"networks": ["10.0.0.0/33"]}]),
        "spec.egress[0].to[0].networks[0]",
    ),
    Bad(
        "scnp-networks-host-bits",
        scnp_out(to=[{"networks": ["10.0.0.0/8", "192.168.1.1/24"]}]),
        "spec.egress[0].to[0].networks[1]",
    ),
    Bad("scnp-networks-empty", scnp_out(to=[{"networks": []}]), "spec.egress[0].to[0].networks"),
    Bad(
        "scnp-too-many-rules", scnp(ingress=[scnp_in()["spec"]["ingress"][0]] * 26), "spec.ingress"
    ),
    Bad(
        "scnp-too-many-peers",
        scnp_in(**{"from": [{"namespaces": {}}] * 26}),
        "spec.ingress[0].from",
    ),
    Bad(
        "scnp-too-many-networks",
        scnp_out(to=[{"networks": [f"10.{i}.0.0/16" for i in range(26)]}]),
        "spec.egress[0].to[0].networks",
    ),
    Bad(
        "scnp-port-number-0",
        scnp_proto({"tcp": {"destinationPort": {"number": 0}}}),
        f"{TCP_PORT}.number",
    ),
    Bad(
        "scnp-port-number-65536",
        scnp_proto({"tcp": {"destinationPort": {"number": 65536}}}),
        f"{TCP_PORT}.number",
    ),
    Bad(
        "scnp-port-range-reversed",
        scnp_proto({"tcp": {"destinationPort": {"range": {"start": 90, "end": 80}}}}),
        f"{TCP_PORT}.range.start",
    ),
    Bad(
        "scnp-port-number-and-range",
        scnp_proto({"tcp": {"destinationPort": {"number": 80, "range": {"start": 1, "end": 2}}}}),
        TCP_PORT,
    ),
    Bad(
        "scnp-protocol-two-kinds",
        scnp_proto(
            {"tcp": {"destinationPort": {"number": 80}}, "udp": {"destinationPort": {"number": 53}}}
        ),
        "spec.ingress[0].protocols[0]",
    ),
    Bad(
        "scnp-protocol-icmp-and-tcp",
        scnp_proto({"icmp": {"type": 8}, "tcp": {"destinationPort": {"number": 80}}}),
        "spec.ingress[0].protocols[0]",
    ),
    Bad("scnp-protocol-unknown", scnp_proto({"gre": {}}), "spec.ingress[0].protocols[0]"),
    Bad(
        "scnp-named-port-malformed",
        scnp_proto({"destinationNamedPort": "Web_Port"}),
        "spec.ingress[0].protocols[0].destinationNamedPort",
    ),
    Bad(
        "scnp-named-port-with-networks",
        scnp_out(to=[{"networks": ["10.0.0.0/8"]}], protocols=[{"destinationNamedPort": "web"}]),
        "spec.egress[0].protocols",
    ),
]

GOOD: list[tuple[str, Obj]] = [
    ("snp-empty-pod-selector", snp()),
    ("snp-port-range", snp_port({"protocol": "UDP", "port": 1000, "endPort": 2000})),
    ("snp-port-range-of-one", snp_port({"port": 443, "endPort": 443})),
    ("snp-named-port", snp_port({"protocol": "TCP", "port": "http-alt"})),
    ("snp-port-extremes", snp(ingress=[{"ports": [{"port": 1}, {"port": 65535}]}])),
    ("snp-icmp-without-code", snp_port({"icmp": {"type": 8}})),
    ("snp-icmpv6-with-code", snp_port({"icmpv6": {"type": 1, "code": 4}})),
    ("snp-ipv6-block", snp_block("fd00::/8", "fd00:1::/32")),
    ("snp-all-addresses", snp_block("0.0.0.0/0", "10.0.0.0/8", "192.168.0.0/16")),
    ("snp-host-route", snp_block("10.1.2.3/32")),
    (
        "snp-deny-egress-both-selectors",
        snp(
            policyTypes=["Egress"],
            egress=[
                {
                    "action": "Deny",
                    "to": [{"namespaceSelector": {"matchLabels": {"a": "b"}}, "podSelector": {}}],
                }
            ],
        ),
    ),
    (
        "snp-selector-expressions",
        snp_selector(
            {
                "matchLabels": {"app.kubernetes.io/name": "web", "tier": ""},
                "matchExpressions": [
                    {"key": "env", "operator": "NotIn", "values": ["dev", "test"]},
                    {"key": "example.com/owner", "operator": "DoesNotExist"},
                ],
            }
        ),
    ),
    ("snp-max-rules", snp(ingress=[{}] * 64, egress=[{}] * 64)),
    (
        "scnp-baseline-pods-subject",
        scnp(tier="Baseline", priority=0, subject={"pods": {"podSelector": {}}}),
    ),
    ("scnp-priority-1000", scnp(priority=1000, mode="Audit")),
    (
        "scnp-every-protocol",
        scnp_in(
            action="Pass",
            protocols=[
                {"tcp": {"destinationPort": {"number": 80}}},
                {"udp": {"destinationPort": {"range": {"start": 53, "end": 53}}}},
                {"sctp": {"destinationPort": {"number": 9003}}},
                {"destinationNamedPort": "web"},
                {"icmp": {"type": 8, "code": 0}},
                {"icmpv6": {"type": 128}},
            ],
        ),
    ),
    (
        "scnp-every-egress-peer",
        scnp_out(
            action="Accept",
            to=[
                {"namespaces": {"matchLabels": {"team": "a"}}},
                {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}},
                {"networks": ["0.0.0.0/0", "::/0", "192.0.2.0/24"]},
                {"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}},
            ],
        ),
    ),
    ("scnp-max-rules", scnp(ingress=[scnp_in()["spec"]["ingress"][0]] * 25)),
]


def example_objects() -> list[tuple[str, Obj]]:
    """Every object of every file in examples/, with an id."""
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            out.append((f"{path.stem}-{i}", doc))
    return out


def names_field(path: str, text: str) -> bool:
    """Whether `text` names the field at `path` (or an element or sub-field of it)."""
    return re.search(re.escape(path) + r"($|[\[.:\s])", text) is not None


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_the_models_reject_a_bad_object_naming_the_field(case: Bad) -> None:
    with pytest.raises(PolicyParseError) as info:
        parse_policy(case.obj)
    paths = [e.path for e in info.value.problems]
    assert any(names_field(case.path, p) for p in paths), paths


@pytest.mark.parametrize(("case_id", "obj"), GOOD, ids=[g[0] for g in GOOD])
def test_the_models_accept_a_good_object(case_id: str, obj: Obj) -> None:
    parse_policy(obj)


@pytest.mark.parametrize(
    ("case_id", "obj"), example_objects(), ids=[e[0] for e in example_objects()]
)
def test_every_example_is_a_valid_policy(case_id: str, obj: Obj) -> None:
    parse_policy(obj)


def test_the_case_tables_have_unique_ids() -> None:
    ids = [c.id for c in BAD] + [g[0] for g in GOOD]
    assert len(ids) == len(set(ids))
