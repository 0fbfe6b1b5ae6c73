"""Policy conditions: Accepted names the field, Programmed counts endpoints whose agent applied
the generation that carries the policy, and an unchanged status is not rewritten."""

from __future__ import annotations

from stockade.control.policies import parse_record
from stockade.control.status import Progress, desired_status, progress, status_differs
from stockade.model.admission import POLICY_SIZE_LIMIT

GOOD = {
    "apiVersion": "stockade.io/v1alpha1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "p", "namespace": "x", "generation": 3, "uid": "u"},
    "spec": {"podSelector": {}},
}
BAD = {**GOOD, "spec": {"podSelector": {"matchLabels": {"k" * 70: "v"}}}}
NOW = "2026-01-01T00:00:00Z"


def test_a_valid_policy_is_accepted_at_its_generation() -> None:
    record = parse_record(GOOD)
    assert record is not None and record.accepted
    status = desired_status(record, Progress(1, 2), NOW)
    accepted, programmed = status["conditions"]
    assert (accepted["status"], status["observedGeneration"]) == ("True", 3)
    assert (programmed["status"], programmed["message"]) == ("False", "1/2 endpoints")


def test_an_invalid_policy_says_which_field_is_wrong() -> None:
    record = parse_record(BAD)
    assert record is not None and not record.accepted
    accepted, programmed = desired_status(record, None, NOW)["conditions"]
    assert accepted["status"] == "False" and accepted["reason"] == "Invalid"
    assert accepted["message"].startswith("spec.podSelector.matchLabels")
    assert programmed["reason"] == "NotAccepted"


def _sized(peers: int, ports: int) -> dict[str, object]:
    rule = {
        "from": [{"ipBlock": {"cidr": f"10.{i >> 8 & 255}.{i & 255}.1/32"}} for i in range(peers)],
        "ports": [{"port": 1 + i} for i in range(ports)],
    }
    # The standard NetworkPolicy: stockade's own kinds bound their lists in the schema.
    return {
        **GOOD,
        "apiVersion": "networking.k8s.io/v1",
        "spec": {"podSelector": {}, "ingress": [rule]},
    }


def test_a_policy_past_the_size_limit_is_not_accepted_with_a_reason_naming_the_limit() -> None:
    at_limit = parse_record(_sized(POLICY_SIZE_LIMIT - 100, 100))
    assert at_limit is not None and at_limit.accepted
    record = parse_record(_sized(POLICY_SIZE_LIMIT - 100, 101))
    assert record is not None and not record.accepted
    accepted, programmed = desired_status(record, None, NOW)["conditions"]
    assert (accepted["status"], accepted["reason"]) == ("False", "TooLarge")
    assert f"policy size limit of {POLICY_SIZE_LIMIT}" in accepted["message"]
    assert f"{POLICY_SIZE_LIMIT + 1} peers" in accepted["message"]
    assert programmed["reason"] == "NotAccepted"


def test_a_policy_parser_never_raises_on_garbage() -> None:
    record = parse_record(
        {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "NetworkPolicy",
            "metadata": "nope",
            "spec": [1, 2],
        }
    )
    assert record is not None and not record.accepted and record.problems


def test_endpoints_count_once_their_agent_reports_the_required_generation() -> None:
    selected = {"a": 2, "b": 1}  # node -> the policy's endpoints there
    reports = {"a": {"appliedGeneration": 7}, "b": {"appliedGeneration": 4}}
    assert progress(selected, {"a": 7, "b": 5}, reports) == Progress(2, 3)
    assert progress(selected, {"a": 7, "b": 4}, reports) == Progress(3, 3)
    assert progress(selected, {"a": 8, "b": 5}, {}) == Progress(0, 3)


def test_a_status_that_only_differs_in_transition_times_is_not_rewritten() -> None:
    record = parse_record(GOOD)
    assert record is not None
    first = desired_status(record, Progress(2, 2), NOW)
    again = desired_status(record, Progress(2, 2), "2030-01-01T00:00:00Z")
    assert not status_differs(first, again)
    assert status_differs(first, desired_status(record, Progress(1, 2), NOW))


def test_a_status_only_update_reuses_the_parsed_spec_and_takes_the_new_status() -> None:
    first = parse_record(GOOD)
    assert first is not None
    echoed = {**GOOD, "status": {"observedGeneration": 1}}
    again = parse_record(echoed, {first.key: first}.get)
    assert again is not None
    assert again.policy is first.policy  # not parsed a second time
    assert again.status == {"observedGeneration": 1}
    assert again.same_content(first)


def test_a_new_generation_is_parsed_again_even_when_a_record_is_known() -> None:
    known = parse_record(GOOD)
    assert known is not None
    changed = {**BAD, "metadata": {**BAD["metadata"], "generation": 2}}
    record = parse_record(changed, {known.key: known}.get)
    assert record is not None
    assert record.policy is None and record.problems
    assert record.generation == 2
