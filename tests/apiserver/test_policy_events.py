"""Drops as Kubernetes Events on the deciding policy, on a real API server: a flood of 10,000
denied packets from one source in one minute is one Event with count 10,000 on that policy
(`kubectl describe` finds it through involvedObject), a second source is a second Event, an
audit hit is a Normal PolicyAudited Event, nothing is posted before the minute is over, and past
MAX_EVENTS a minute the rest are counted as suppressed, not posted."""

from __future__ import annotations

import ipaddress
from typing import Any

import kubernetes.client

from stockade.agent import policy_events
from stockade.agent.policy_events import PolicyEvents
from stockade.compiler import ir
from stockade.datapath.events import DropReason, Event, EventKind

NETPOL = "NetworkPolicy.networking.k8s.io"


def drop(src: str, rule: int = 1, kind: EventKind = EventKind.DROP) -> Event:
    return Event(
        kind=kind,
        reason=DropReason.POLICY,
        rule_id=rule,
        endpoint_id=1,
        ifindex=5,
        direction=int(ir.Direction.INGRESS),
        protocol=ir.PROTO_TCP,
        src=ipaddress.ip_address(src),
        dst=ipaddress.ip_address("10.0.0.9"),
        sport=40000,
        dport=80,
        port=80,
        timestamp_ns=1,
    )


def events_on(api_client: Any, namespace: str, name: str) -> list[Any]:
    listed = kubernetes.client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return sorted(listed.items, key=lambda e: -e.count)


def test_a_flood_of_denied_packets_is_one_event_per_source_and_minute(
    api_client: Any, k8s_namespace: str
) -> None:
    rules = {
        1: ir.RuleInfo(NETPOL, k8s_namespace, "deny-web", ir.Direction.INGRESS, -1),
        2: ir.RuleInfo(NETPOL, k8s_namespace, "deny-web", ir.Direction.INGRESS, 0),
    }
    now = [6000.0]  # minute 100
    tally = PolicyEvents.through(api_client, "node-1")
    tally._clock = lambda: now[0]
    for _ in range(10_000):
        tally.add(drop("10.0.1.1"), rules)
    for _ in range(3):
        tally.add(drop("10.0.1.2"), rules)
    tally.add(drop("10.0.1.3", rule=2, kind=EventKind.AUDIT), rules)
    tally.add(drop("10.0.1.4", rule=99), rules)  # no rule of a policy: no Event
    assert tally.flush() == 0  # the minute is not over
    now[0] = 6061.0
    assert tally.flush() == 3
    found = events_on(api_client, k8s_namespace, "deny-web")
    assert [(e.reason, e.type, e.count) for e in found] == [
        ("PolicyDenied", "Warning", 10_000),
        ("PolicyDenied", "Warning", 3),
        ("PolicyAudited", "Normal", 1),
    ]
    first = found[0]
    assert first.message.startswith("10000 packet(s) from 10.0.1.1 to 10.0.0.9 TCP/80 denied")
    assert "by ingress isolation default on node node-1" in first.message
    assert first.involved_object.kind == "NetworkPolicy"
    assert first.involved_object.api_version == "networking.k8s.io/v1"
    assert first.involved_object.namespace == k8s_namespace
    assert first.source.component == "stockade-agent"
    assert tally.flush() == 0  # posted once


def test_past_the_bound_a_minute_the_rest_are_suppressed_not_posted(
    api_client: Any, k8s_namespace: str
) -> None:
    rules = {1: ir.RuleInfo(NETPOL, k8s_namespace, "many", ir.Direction.INGRESS, 0)}
    now = [120.0]
    tally = PolicyEvents.through(api_client, "node-1")
    tally._clock = lambda: now[0]
    sources = policy_events.MAX_EVENTS + 5
    for host in range(sources):
        tally.add(drop(f"10.0.2.{host + 1}"), rules)
    now[0] = 180.0
    assert tally.flush() == policy_events.MAX_EVENTS
    assert tally.suppressed == 5
    assert len(events_on(api_client, k8s_namespace, "many")) == policy_events.MAX_EVENTS
