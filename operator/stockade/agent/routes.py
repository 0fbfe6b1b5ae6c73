"""The agent's JSON routes, served beside `/metrics` (`stockade.agent.app`) and read by
`stockade observe`, `usage` and `explain` (`stockade.inspect.agents`):

- `/flows?cursor=N&limit=M`: the aggregated drop and audit records changed after `cursor`
  (`stockade.agent.flows.Flows.since`) and the events the ring buffer had no room for;
- `/usage`: every rule of this node's tables with its packet and byte counts since the maps
  were created (the per-rule `counters` map);
- `/trace?src=IP&dst=IP&protocol=P&port=N`: the datapath's own verdict on a connection's first
  packet (`stockade.agent.trace`).

Every parameter is checked here, and a bad one is a 400 naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from stockade.agent.flows import Flows, rule_identity
from stockade.agent.trace import Probe
from stockade.compiler import ir
from stockade.datapath.events import RuleCounter
from stockade.runtime import JsonRoute


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} is not within {low}-{high}")
    return value


def flows_route(node: str, flows: Callable[[], Flows | None], lost: Callable[[], int]) -> JsonRoute:
    def route(query: Mapping[str, str]) -> object:
        cursor = _int(query, "cursor", 0, 0, 2**63)
        limit = _int(query, "limit", 0, 0, 100_000) or None
        current = flows()
        if current is None:  # no events map yet: nothing applied
            body: dict[str, object] = {"cursor": cursor, "head": 0, "pending": 0, "events": 0}
            body.update(evicted=0, flows=[])
        else:
            body = current.since(cursor, limit)
        body["node"] = node
        body["lost"] = lost()
        return body

    return route


def usage_body(
    node: str, rules: Mapping[int, ir.RuleInfo], counters: Mapping[int, RuleCounter]
) -> dict[str, object]:
    entries = []
    for rule_id, info in sorted(rules.items()):
        counter = counters.get(rule_id, RuleCounter(0, 0))
        entries.append(
            {
                "ruleId": rule_id,
                "rule": rule_identity(info),
                "packets": counter.packets,
                "bytes": counter.bytes,
            }
        )
    return {"node": node, "rules": entries}


def usage_route(
    node: str,
    rules: Callable[[], Mapping[int, ir.RuleInfo]],
    counters: Callable[[list[int]], Mapping[int, RuleCounter]],
) -> JsonRoute:
    def route(query: Mapping[str, str]) -> object:
        current = dict(rules())
        return usage_body(node, current, counters(sorted(current)) if current else {})

    return route


def trace_route(node: str, trace: Callable[[Probe], list[dict[str, object]]]) -> JsonRoute:
    def route(query: Mapping[str, str]) -> object:
        probe = Probe.parse(query)
        return {"node": node, "hooks": trace(probe)}

    return route
