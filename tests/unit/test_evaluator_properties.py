"""Properties of the reference evaluator: CIDR arithmetic, tier order, audit and ordering."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from stockade.model.cluster import ClusterState, Namespace, Pod, ip
from stockade.model.evaluator import evaluate
from stockade.model.flow import Flow
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy

STATE = ClusterState(
    [Namespace("x", {"kubernetes.io/metadata.name": "x"})],
    [
        Pod("x", "client", {"role": "client"}, (ip("10.1.0.1"),), "n1"),
        Pod("x", "server", {"role": "server"}, (ip("10.1.0.2"),), "n1"),
    ],
)
FLOW = Flow.of("10.1.0.1", "10.1.0.2", "TCP", 80)


def _in(address: int, network: tuple[int, int]) -> bool:
    """Independent arithmetic: the top `length` bits agree."""
    base, length = network
    shift = 32 - length
    return address >> shift == base >> shift


def _text(network: tuple[int, int]) -> str:
    base, length = network
    return str(ipaddress.ip_network((base, length), strict=False))


NETWORKS = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32))


@st.composite
def blocks(draw: st.DrawFn) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    cidr = draw(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 31)))
    base, length = cidr
    excepts = []
    for _ in range(draw(st.integers(0, 3))):
        sub_len = draw(st.integers(length + 1, 32))
        inside = draw(st.integers(0, 2 ** (32 - length) - 1))
        sub_base = (base >> (32 - length) << (32 - length) if length else 0) | inside
        excepts.append((sub_base, sub_len))
    return cidr, excepts


@given(blocks(), st.integers(0, 2**32 - 1))
def test_an_ip_block_allows_exactly_its_cidr_minus_its_excepts(
    block: tuple[tuple[int, int], list[tuple[int, int]]], address: int
) -> None:
    cidr, excepts = block
    policy = parse_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "egress", "namespace": "x"},
            "spec": {
                "podSelector": {"matchLabels": {"role": "client"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {
                                "ipBlock": {
                                    "cidr": _text(cidr),
                                    "except": [_text(e) for e in excepts],
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    flow = Flow(ip("10.1.0.1"), ipaddress.IPv4Address(address), FLOW.protocol, 443)
    expected = _in(address, cidr) and not any(_in(address, e) for e in excepts)
    assert evaluate(STATE, [policy], flow).allowed is expected


ADMIN_OR_BASELINE = st.sampled_from([None, "Accept", "Deny", "Pass"])
NAMESPACE = st.sampled_from([None, "allow", "isolate"])


def _cnp(name: str, tier: str, priority: int, action: str, mode: str = "Enforce") -> dict[str, Any]:
    return {
        "apiVersion": "stockade.io/v1alpha1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": tier,
            "priority": priority,
            "mode": mode,
            "subject": {"namespaces": {}},
            "ingress": [{"action": action, "from": [{"namespaces": {}}]}],
        },
    }


def _np(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": {}, "policyTypes": ["Ingress"]}
    if kind == "allow":
        spec["ingress"] = [{}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": kind, "namespace": "x"},
        "spec": spec,
    }


@given(ADMIN_OR_BASELINE, NAMESPACE, ADMIN_OR_BASELINE)
def test_the_first_tier_that_decides_wins(
    admin: str | None, namespace: str | None, baseline: str | None
) -> None:
    objs = []
    if admin:
        objs.append(_cnp("admin", "Admin", 1, admin))
    if namespace:
        objs.append(_np(namespace))
    if baseline:
        objs.append(_cnp("baseline", "Baseline", 1, baseline))
    if admin in ("Accept", "Deny"):
        expected = admin == "Accept"
    elif namespace is not None:
        expected = namespace == "allow"
    elif baseline in ("Accept", "Deny"):
        expected = baseline == "Accept"
    else:
        expected = True
    decision = evaluate(STATE, [parse_policy(o) for o in objs], FLOW)
    assert decision.allowed is expected, decision.reason


ADMIN_POLICIES = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["Accept", "Deny", "Pass"])),
    min_size=1,
    max_size=6,
)


@given(ADMIN_POLICIES)
def test_the_admin_policy_with_the_lowest_priority_then_name_decides(
    specs: list[tuple[int, str]],
) -> None:
    objs = [_cnp(f"p{i}", "Admin", prio, action) for i, (prio, action) in enumerate(specs)]
    first = min(range(len(specs)), key=lambda i: (specs[i][0], f"p{i}"))
    expected = specs[first][1] != "Deny"  # Pass ends in the default allow here
    decision = evaluate(STATE, [parse_policy(o) for o in objs], FLOW)
    assert decision.allowed is expected
    if specs[first][1] != "Pass":
        assert decision.rule is not None and decision.rule.name == f"p{first}"


POLICY_MIX = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["Admin", "Baseline"]),
            st.integers(0, 3),
            st.sampled_from(["Accept", "Deny", "Pass"]),
            st.sampled_from(["Enforce", "Audit"]),
        ).map(lambda t: ("cnp", t)),
        NAMESPACE.filter(lambda n: n is not None).map(lambda n: ("np", n)),
    ),
    max_size=6,
)


def _build(mix: list[tuple[str, Any]]) -> list[Policy]:
    seen: dict[str, Policy] = {}
    for i, (what, args) in enumerate(mix):
        obj = _cnp(f"c{i}", *args) if what == "cnp" else _np(args)
        policy = parse_policy(obj)
        seen[f"{policy.kind}/{policy.namespace}/{policy.name}"] = policy
    return list(seen.values())


@given(POLICY_MIX)
def test_audit_mode_policies_never_change_the_verdict(mix: list[tuple[str, Any]]) -> None:
    policies = _build(mix)
    enforced = [p for p in policies if p.mode.value == "Enforce"]
    assert evaluate(STATE, policies, FLOW).verdict is evaluate(STATE, enforced, FLOW).verdict


@given(POLICY_MIX, st.randoms())
def test_the_order_policies_are_given_in_does_not_matter(
    mix: list[tuple[str, Any]], rnd: Any
) -> None:
    policies = _build(mix)
    shuffled = list(policies)
    rnd.shuffle(shuffled)
    assert evaluate(STATE, policies, FLOW) == evaluate(STATE, shuffled, FLOW)
