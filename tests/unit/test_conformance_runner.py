"""Symbolic addresses, the world of a case, and the runner's report on the reference engine."""

from __future__ import annotations

import io
import ipaddress
from typing import Any

import pytest

from stockade.conformance.casefile import AddPodLabels, CreatePolicy, parse_case_file
from stockade.conformance.engine import ActionRejectedError, Addresses
from stockade.conformance.engines.reference import ReferenceEngine
from stockade.conformance.runner import Status, run_case, run_file
from stockade.conformance.symbols import resolve, resolve_string

V4 = Addresses(
    {"x/a": (ipaddress.ip_address("10.244.1.10"),), "x/b": (ipaddress.ip_address("10.244.2.11"),)},
    {"n1": (ipaddress.ip_address("172.18.0.2"),)},
)
V6 = Addresses({"x/a": (ipaddress.ip_address("fd00:10:244:1::a"),)}, {}, family=6)

SYMBOLS = [
    ("a pod address with a prefix length", V4, "podIP(x/a)/32", "10.244.1.10/32"),
    ("a canonical prefix around a pod", V4, "prefix(podIP(x/b),4)", "0.0.0.0/4"),
    ("a prefix with spaces", V4, "prefix( podIP(x/b) , 16 )", "10.244.0.0/16"),
    ("a bare node address", V4, "nodeIP(n1)", "172.18.0.2"),
    ("a node address with a prefix length", V4, "nodeIP(n1)/32", "172.18.0.2/32"),
    ("an IPv6 /32 means the single address", V6, "podIP(x/a)/32", "fd00:10:244:1::a/128"),
    ("an IPv6 prefix", V6, "prefix(podIP(x/a),48)", "fd00:10:244::/48"),
    ("plain text is left alone", V4, "10.0.0.0/8", "10.0.0.0/8"),
]


@pytest.mark.parametrize(
    ("addresses", "text", "expected"), [s[1:] for s in SYMBOLS], ids=[s[0] for s in SYMBOLS]
)
def test_symbolic_addresses_resolve_against_the_engine_addresses(
    addresses: Addresses, text: str, expected: str
) -> None:
    assert resolve_string(text, addresses) == expected


def test_symbols_resolve_anywhere_in_a_policy_object() -> None:
    obj = {
        "spec": {
            "egress": [
                {"to": [{"ipBlock": {"cidr": "prefix(podIP(x/a),8)", "except": ["podIP(x/a)/32"]}}]}
            ]
        }
    }
    assert resolve(obj, V4) == {
        "spec": {
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.1.10/32"]}}]}]
        }
    }


def test_a_symbol_naming_an_unknown_pod_is_rejected() -> None:
    with pytest.raises(ActionRejectedError, match="cannot resolve podIP"):
        resolve_string("podIP(x/zz)/32", V4)


MODEL = {
    "namespaces": {"x": {"labels": {"kubernetes.io/metadata.name": "x"}}},
    "pods": {"x/a": {"labels": {"pod": "a"}}, "x/b": {"labels": {"pod": "b"}}},
}
DENY_A = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "deny-a", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"pod": "a"}}},
}


def case_file(steps: list[dict[str, Any]]) -> Any:
    return parse_case_file(
        {
            "model": MODEL,
            "cases": [
                {"id": "c", "server_ports": [80], "server_protocols": ["TCP"], "steps": steps}
            ],
        }
    )


def test_a_case_passes_when_every_check_is_observed_as_expected() -> None:
    cf = case_file(
        [
            {
                "actions": [{"create_policy": DENY_A}],
                "probes": [{"protocol": "TCP", "port": 80, "denied": [["x/b", "x/a"]]}],
            }
        ]
    )
    assert run_case(ReferenceEngine(), cf, cf.cases[0]).status is Status.PASS


def test_a_connection_to_a_port_nobody_serves_is_refused_not_allowed() -> None:
    cf = case_file([{"probes": [{"protocol": "TCP", "port": 81, "denied": []}]}])
    result = run_case(ReferenceEngine(), cf, cf.cases[0])
    assert result.status is Status.FAIL
    assert result.problems == (
        "step 1: x/a -> x/b TCP/81 unexpectedly refused",
        "step 1: x/b -> x/a TCP/81 unexpectedly refused",
    )


def test_a_policy_the_api_would_reject_fails_the_case_with_the_field_named() -> None:
    bad = DENY_A | {"spec": {"podSelector": {"matchLabels": {"pod": 1}}}}
    cf = case_file([{"actions": [{"create_policy": bad}], "probes": []}])
    result = run_case(ReferenceEngine(), cf, cf.cases[0])
    assert result.status is Status.FAIL
    assert "spec.podSelector.matchLabels.pod: must be a string, got int" in result.problems[-1]


def test_creating_a_policy_twice_is_rejected_as_the_api_server_would() -> None:
    cf = case_file(
        [{"actions": [{"create_policy": DENY_A}, {"create_policy": DENY_A}], "probes": []}]
    )
    result = run_case(ReferenceEngine(), cf, cf.cases[0])
    assert result.status is Status.FAIL and "already exists" in result.problems[-1]


def test_the_report_has_one_line_per_case_and_a_closing_count() -> None:
    cf = case_file([{"probes": [{"protocol": "TCP", "port": 80, "denied": [["x/a", "x/b"]]}]}])
    out = io.StringIO()
    summary = run_file(ReferenceEngine(), cf, out)
    assert out.getvalue().splitlines() == [
        "FAIL c: step 1: x/a -> x/b TCP/80 unexpectedly allowed",
        "0 passed, 1 failed",
    ]
    assert not summary.ok


def test_the_world_adds_labels_without_dropping_others() -> None:
    cf = case_file([])
    engine = ReferenceEngine()
    engine.setup(cf.topology, cf.cases[0])
    engine.apply(AddPodLabels("x/a", {"extra": "1"}))
    engine.apply(CreatePolicy(DENY_A))
    assert engine.world is not None
    assert engine.world.pod_labels["x/a"] == {"pod": "a", "extra": "1"}
    assert len(engine.world.policies) == 1
    engine.teardown()
    assert engine.world is None


def test_the_reference_engine_keeps_every_pod_inside_one_slash_four() -> None:
    cf = case_file([])
    addresses = ReferenceEngine().setup(cf.topology, cf.cases[0])
    nets = {
        ipaddress.ip_network(f"{addresses.pod_ip(p.key)}/4", strict=False) for p in cf.topology.pods
    }
    assert len(nets) == 1
