"""The agent's flow log aggregates: a flood of one denied flow is one record whose count is the
number of packets, records are bounded (the evicted events are counted, not hidden), a reader
pages through changes with a cursor, per-policy counts feed the metrics, and log lines are
bounded per second with the rest counted."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.agent.flows import Flows, LogBudget
from stockade.agent.routes import flows_route, usage_body
from stockade.compiler import ir
from stockade.datapath.events import DropReason, Event, EventKind, RuleCounter

RULES = {
    7: ir.RuleInfo("NetworkPolicy.networking.k8s.io", "x", "deny-all", ir.Direction.INGRESS, -1),
    9: ir.RuleInfo("ClusterNetworkPolicy.stockade.io", "", "audit", ir.Direction.EGRESS, 0),
}


def event(
    src: str = "10.0.0.1",
    dst: str = "10.0.1.2",
    port: int = 80,
    rule: int = 7,
    kind: EventKind = EventKind.DROP,
    sport: int = 40000,
) -> Event:
    return Event(
        kind=kind,
        reason=DropReason.POLICY,
        rule_id=rule,
        endpoint_id=3,
        ifindex=12,
        direction=int(ir.Direction.INGRESS),
        protocol=ir.PROTO_TCP,
        src=ipaddress.ip_address(src),
        dst=ipaddress.ip_address(dst),
        sport=sport,
        dport=port,
        port=port,
        timestamp_ns=1,
    )


def test_a_flood_of_one_denied_flow_is_one_record_counting_every_packet() -> None:
    flows = Flows()
    for sport in range(10_000):
        flows.add(event(sport=1024 + sport), RULES)  # source ports do not split a record
    answer = flows.since(0)
    assert len(answer["flows"]) == 1
    record = answer["flows"][0]
    assert record["count"] == 10_000
    assert record["policy"] == {
        "kind": "NetworkPolicy.networking.k8s.io",
        "namespace": "x",
        "name": "deny-all",
        "direction": "Ingress",
        "index": -1,
    }
    assert (record["event"], record["src"], record["dst"], record["port"]) == (
        "drop",
        "10.0.0.1",
        "10.0.1.2",
        80,
    )
    assert flows.by_policy == {("drop", "NetworkPolicy.networking.k8s.io", "x", "deny-all"): 10_000}


def test_a_record_whose_first_event_came_before_its_rule_names_the_rule_later() -> None:
    flows = Flows()
    flows.add(event(), {})  # the rule was not known when the first event was read
    assert flows.since(0)["flows"][0]["policy"] is None
    flows.add(event(), RULES)
    (record,) = flows.since(0)["flows"]
    assert record["count"] == 2
    assert record["policy"] is not None and record["policy"]["name"] == "deny-all"
    flows.add(event(), {})  # once named, a later reading without the rule keeps the name
    assert flows.since(0)["flows"][0]["policy"]["name"] == "deny-all"


def test_records_are_bounded_and_the_evicted_events_are_counted() -> None:
    flows = Flows(capacity=3)
    for port in range(5):
        flows.add(event(port=port), RULES)
        flows.add(event(port=port), RULES)
    answer = flows.since(0)
    assert [r["port"] for r in answer["flows"]] == [2, 3, 4]
    assert answer["evicted"] == 4  # two records of two events each
    assert answer["events"] == 10


def test_a_reader_pages_through_changes_with_a_cursor() -> None:
    flows = Flows(limit=2)
    for port in (1, 2, 3):
        flows.add(event(port=port), RULES)
    first = flows.since(0)
    assert [r["port"] for r in first["flows"]] == [1, 2]
    assert first["pending"] == 1
    second = flows.since(int(first["cursor"]))
    assert [r["port"] for r in second["flows"]] == [3]
    assert flows.since(int(second["cursor"]))["flows"] == []
    flows.add(event(port=1), RULES)  # a record that changes comes back with its new count
    again = flows.since(int(second["cursor"]))
    assert [(r["port"], r["count"]) for r in again["flows"]] == [(1, 2)]


def test_audit_and_drop_of_one_pair_are_separate_records() -> None:
    flows = Flows()
    flows.add(event(rule=9, kind=EventKind.AUDIT), RULES)
    flows.add(event(), RULES)
    kinds = sorted(r["event"] for r in flows.since(0)["flows"])
    assert kinds == ["audit", "drop"]


def test_the_log_budget_allows_rate_lines_a_second_and_counts_the_rest() -> None:
    now = [100.0]
    budget = LogBudget(3, lambda: now[0])
    taken = [budget.take() for _ in range(10)]
    assert [allowed for allowed, _ in taken] == [True] * 3 + [False] * 7
    now[0] = 101.2
    assert budget.take() == (True, 7)  # the first line of the next second says what was lost
    assert budget.take() == (True, 0)


@pytest.mark.parametrize(
    ("query", "field"),
    [({"cursor": "x"}, "cursor"), ({"cursor": "-1"}, "cursor"), ({"limit": "1e9"}, "limit")],
    ids=["not-a-number", "negative", "not-an-integer"],
)
def test_a_bad_flows_parameter_is_refused_naming_it(query: dict[str, str], field: str) -> None:
    route = flows_route("n1", Flows, lambda: 0)
    with pytest.raises(ValueError, match=f"^{field}:"):
        route(query)


def test_usage_lists_every_rule_of_the_node_with_its_counters() -> None:
    body = usage_body("n1", RULES, {7: RuleCounter(5, 300)})
    assert body["node"] == "n1"
    assert [(r["ruleId"], r["packets"]) for r in body["rules"]] == [(7, 5), (9, 0)]
