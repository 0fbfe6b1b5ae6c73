"""Case files load into typed cases; both probe layouts and every action verb are understood."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.conformance.casefile import (
    AddNamespaceLabels,
    AddPodLabels,
    CaseFileError,
    CreatePolicy,
    DeleteAllPolicies,
    DeletePolicy,
    Expect,
    Serve,
    UpdatePolicy,
    parse_case_file,
)
from stockade.model.policy import Protocol

MODEL = {
    "namespaces": {"x": {"labels": {"ns": "x"}}},
    "pods": {"x/a": {"labels": {"pod": "a"}}, "x/b": {"labels": {"pod": "b"}}, "x/c": {}},
}


def one_case(case: dict[str, Any], model: dict[str, Any] = MODEL) -> Any:
    return parse_case_file({"model": model, "cases": [{"id": "c", **case}]}).cases[0]


def test_a_denied_probe_expands_to_every_ordered_pair_of_distinct_pods() -> None:
    case = one_case(
        {"steps": [{"probes": [{"protocol": "UDP", "port": 81, "denied": [["x/b", "x/a"]]}]}]}
    )
    checks = case.steps[0].checks
    assert len(checks) == 6
    assert {(c.src, c.dst) for c in checks if c.expect is Expect.DENIED} == {("x/b", "x/a")}
    assert all(c.protocol is Protocol.UDP and c.port == 81 for c in checks)


def test_a_checks_probe_judges_only_the_listed_connections() -> None:
    check = {"from": "x/a", "to": "x/b", "protocol": "SCTP", "port": 9003, "expect": "denied"}
    case = one_case({"steps": [{"probes": [{"checks": [check]}]}]})
    assert [str(c) for c in case.steps[0].checks] == ["x/a -> x/b SCTP/9003"]


def test_server_ports_become_named_container_ports() -> None:
    case = one_case({"server_ports": [80, 81], "server_protocols": ["TCP", "UDP"], "steps": []})
    pod = parse_case_file({"model": MODEL, "cases": []}).topology.pods[0]
    assert case.serves(pod) == (
        Serve(80, Protocol.TCP, "serve-80-tcp"),
        Serve(80, Protocol.UDP, "serve-80-udp"),
        Serve(81, Protocol.TCP, "serve-81-tcp"),
        Serve(81, Protocol.UDP, "serve-81-udp"),
    )


def test_every_action_verb_is_understood() -> None:
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
    }
    actions = [
        {"create_policy": policy},
        {"update_policy": policy},
        {
            "delete_policy": {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "namespace": "x",
                "name": "p",
            }
        },
        {"add_pod_labels": {"pod": "x/a", "labels": {"k": "v"}}},
        {"add_namespace_labels": {"namespace": "x", "labels": {"k": "v"}}},
        {"delete_all_policies": ["x"]},
    ]
    case = one_case({"steps": [{"actions": actions, "probes": []}]})
    assert [type(a) for a in case.steps[0].actions] == [
        CreatePolicy,
        UpdatePolicy,
        DeletePolicy,
        AddPodLabels,
        AddNamespaceLabels,
        DeleteAllPolicies,
    ]


BAD = [
    (
        "a denied pair of unknown pods",
        {"steps": [{"probes": [{"protocol": "TCP", "port": 80, "denied": [["x/a", "y/a"]]}]}]},
        "cases[0].steps[0].probes[0].denied[0]: must be [from, to] of model pods",
    ),
    (
        "an unknown protocol",
        {"steps": [{"probes": [{"protocol": "GRE", "port": 80, "denied": []}]}]},
        "cases[0].steps[0].probes[0].protocol: unknown protocol 'GRE'",
    ),
    (
        "an unknown action",
        {"steps": [{"actions": [{"reboot": {}}]}]},
        "cases[0].steps[0].actions[0]: unknown action 'reboot'",
    ),
    (
        "a bad expectation",
        {
            "steps": [
                {
                    "probes": [
                        {
                            "checks": [
                                {
                                    "from": "x/a",
                                    "to": "x/b",
                                    "protocol": "TCP",
                                    "port": 80,
                                    "expect": "maybe",
                                }
                            ]
                        }
                    ]
                }
            ]
        },
        "cases[0].steps[0].probes[0].checks[0].expect: must be allowed or denied, got 'maybe'",
    ),
    (
        "a port out of range",
        {"server_ports": [0], "steps": []},
        "cases[0].server_ports[0]: must be a port number 1-65535, got 0",
    ),
]


@pytest.mark.parametrize(("case", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_malformed_case_file_is_rejected_with_the_field_named(
    case: dict[str, Any], message: str
) -> None:
    with pytest.raises(CaseFileError) as info:
        one_case(case)
    assert str(info.value) == message


def test_duplicate_case_ids_are_rejected() -> None:
    with pytest.raises(CaseFileError, match="duplicate ids"):
        parse_case_file(
            {"model": MODEL, "cases": [{"id": "a", "steps": []}, {"id": "a", "steps": []}]}
        )


def test_a_host_network_pod_must_name_its_node() -> None:
    model = {"namespaces": {"x": {}}, "pods": {"x/h": {"host_network": True}}}
    with pytest.raises(CaseFileError, match="host-network pod needs a node"):
        parse_case_file({"model": model, "cases": []})
