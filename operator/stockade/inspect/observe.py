"""`stockade observe` (the merged flow log) and `stockade usage` (rule hit counts and the
unused-rule report), from every node's agent (`stockade.inspect.agents`).

observe asks each agent for the aggregated records changed since its cursor (`/flows`): one
record per (verdict, direction, source, destination, protocol, port, rule) with a count, so a
flood is one line whose count grows. Records are merged over nodes, filtered (namespace, pod,
policy, verdict), named with pod names from the API server, and printed; with `--follow` it asks
again every `interval` seconds and prints only what changed. Events lost (the ring buffer was
full, or records evicted to bound the agent's memory) are said, never hidden.

usage sums each rule's packet counter over the nodes (a rule is on every node with a pod its
policy selects) and lists the rules, and the policies, that matched nothing since the maps were
created.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stockade import handoff
from stockade.inspect.agents import AgentError, Agents
from stockade.inspect.live import Live
from stockade.model.policy import Direction, Policy, RuleRef, Tier

PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


@dataclass(frozen=True)
class Filter:
    namespace: str | None = None
    pod: str | None = None
    policy: str | None = None
    verdict: str = "all"  # drop | audit | all

    def keeps(self, record: Mapping[str, Any]) -> bool:
        if self.verdict != "all" and record.get("event") != self.verdict:
            return False
        policy = record.get("policy") or {}
        if self.policy is not None and policy.get("name") != self.policy:
            return False
        ends: list[Any] = [record.get("srcPod"), record.get("dstPod")]
        if self.namespace is not None:
            in_ns = [e for e in ends if isinstance(e, str) and e.startswith(f"{self.namespace}/")]
            if not in_ns and policy.get("namespace") != self.namespace:
                return False
            ends = in_ns or ends
        return self.pod is None or any(
            isinstance(e, str) and e.split("/", 1)[-1] == self.pod for e in ends
        )


def port_text(protocol: int, port: int) -> str:
    name = PROTOCOL_NAMES.get(protocol, str(protocol))
    if protocol in (1, 58):
        return f"{name} type {port >> 8} code {port & 0xFF}"
    return f"{name}/{port}"


def identity(rule: RuleRef | None) -> dict[str, object] | None:
    """A model rule in the agents' spelling (`stockade.agent.flows.rule_identity`)."""
    if rule is None:
        return None
    return {
        "kind": rule.kind.value,
        "namespace": rule.namespace or handoff.NO_NAMESPACE,
        "name": rule.name,
        "direction": rule.direction.value,
        "index": rule.index,
    }


def policy_rules(policy: Policy) -> list[tuple[dict[str, object], str]]:
    """Every rule of `policy` with its name (ClusterNetworkPolicy rules have one), and the
    isolation default of each direction a namespace-tier policy selects for."""
    out = []
    for direction in (Direction.INGRESS, Direction.EGRESS):
        for rule in policy.rules(direction):
            ident = identity(rule.ref)
            assert ident is not None
            out.append((ident, rule.name))
        if policy.tier is Tier.NAMESPACE and direction in policy.directions:
            isolation = identity(policy.isolation_ref(direction))
            assert isolation is not None
            out.append((isolation, ""))
    return out


def where(obj: Mapping[str, Any]) -> str:
    """`namespace/name`, or `name` for a cluster-scoped policy."""
    ns = obj.get("namespace")
    return str(obj.get("name")) if ns == handoff.NO_NAMESPACE else f"{ns}/{obj.get('name')}"


def rule_text(rule: Any) -> str:
    """A rule identity (`stockade.agent.flows.rule_identity`) as a person reads it."""
    if not isinstance(rule, Mapping):
        return "no policy rule (default)"
    index = rule.get("index")
    which = "isolation default" if index == -1 else f"rule {index}"
    return f"{rule.get('kind')} {where(rule)} {rule.get('direction')} {which}"


@dataclass
class Observer:
    """Cursors per node; `poll()` returns the new and changed records of every node."""

    agents: Agents
    names: Callable[[str], str]  # address -> namespace/name (or the address)
    flt: Filter = field(default_factory=Filter)
    cursors: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)  # node -> ring buffer losses
    evicted: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def poll(self) -> list[dict[str, Any]]:
        out = []
        self.errors = []
        for node in self.agents.nodes():
            try:
                answer = self.agents.get(node, "/flows", {"cursor": self.cursors.get(node, 0)})
            except AgentError as exc:
                self.errors.append(str(exc))
                continue
            self.cursors[node] = int(answer.get("cursor", 0))
            self.lost[node] = int(answer.get("lost", 0))
            self.evicted[node] = int(answer.get("evicted", 0))
            for raw in answer.get("flows") or []:
                record = dict(raw, node=node)
                record["srcPod"] = self.names(str(record.get("src")))
                record["dstPod"] = self.names(str(record.get("dst")))
                if self.flt.keeps(record):
                    out.append(record)
        out.sort(key=lambda r: (r.get("lastSeen", 0), r.get("node", "")))
        return out

    @property
    def events_lost(self) -> int:
        return sum(self.lost.values()) + sum(self.evicted.values())


def flow_line(record: Mapping[str, Any]) -> str:
    verdict = str(record.get("event", "")).upper()
    return (
        f"{verdict:<5} {record.get('srcPod')} -> {record.get('dstPod')} "
        f"{port_text(int(record.get('protocol', 0)), int(record.get('port', 0)))} "
        f"{record.get('direction')} on {record.get('node')}: {rule_text(record.get('policy'))}"
        f" x{record.get('count')}"
        + ("" if record.get("reason") == "policy" else f" ({record.get('reason')})")
    )


def render_flows(records: Iterable[Mapping[str, Any]], output: str) -> list[str]:
    if output == "json":
        return [json.dumps(dict(r), sort_keys=True) for r in records]
    return [flow_line(r) for r in records]


# --- usage ---------------------------------------------------------------------------------------


def usage(live: Live, agents: Agents, namespace: str | None = None) -> dict[str, Any]:
    """Per-rule hits over every node, the unused rules and the policies that matched nothing
    (including those no node has tables for: they select no pod)."""
    hits: dict[tuple[object, ...], dict[str, Any]] = {}
    errors = []
    for node in agents.nodes():
        try:
            answer = agents.get(node, "/usage", {})
        except AgentError as exc:
            errors.append(str(exc))
            continue
        for entry in answer.get("rules") or []:
            rule = entry.get("rule")
            if not isinstance(rule, Mapping):
                continue
            if namespace is not None and rule.get("namespace") not in (
                namespace,
                handoff.NO_NAMESPACE,
            ):
                continue
            key = tuple(rule.get(k) for k in ("kind", "namespace", "name", "direction", "index"))
            slot = hits.setdefault(key, {"rule": dict(rule), "packets": 0, "nodes": []})
            slot["packets"] += int(entry.get("packets", 0))
            slot["nodes"].append(node)
    for record in live.records:  # rules no node has tables for (they select no pod, or
        if record.policy is None:  # their peers are nobody) matched nothing either
            continue
        for rule, name in policy_rules(record.policy):
            key = tuple(rule.get(k) for k in ("kind", "namespace", "name", "direction", "index"))
            slot = hits.setdefault(key, {"rule": rule, "packets": 0, "nodes": []})
            if name:
                slot["ruleName"] = name
    rules = sorted(hits.values(), key=lambda s: tuple(str(v) for v in s["rule"].values()))
    used_policies = {
        (r["rule"]["kind"], r["rule"]["namespace"], r["rule"]["name"])
        for r in rules
        if r["packets"] > 0
    }
    unused_policies = []
    for record in live.records:
        ns = record.namespace or handoff.NO_NAMESPACE
        if (record.kind.value, ns, record.name) not in used_policies:
            unused_policies.append(
                {"kind": record.kind.value, "namespace": ns, "name": record.name}
            )
    return {
        "rules": rules,
        "unusedRules": [r["rule"] for r in rules if r["packets"] == 0],
        "unusedPolicies": sorted(unused_policies, key=lambda p: tuple(p.values())),
        "errors": errors,
    }


def render_usage(report: Mapping[str, Any]) -> list[str]:
    lines = [f"{'PACKETS':>10}  RULE"]
    for slot in report["rules"]:
        lines.append(f"{slot['packets']:>10}  {rule_text(slot['rule'])}")
    lines.append("")
    lines.append(f"unused rules ({len(report['unusedRules'])}):")
    lines.extend(f"  {rule_text(r)}" for r in report["unusedRules"])
    lines.append(f"policies that matched nothing ({len(report['unusedPolicies'])}):")
    for p in report["unusedPolicies"]:
        where = (
            p["name"] if p["namespace"] == handoff.NO_NAMESPACE else f"{p['namespace']}/{p['name']}"
        )
        lines.append(f"  {p['kind']} {where}")
    lines.extend(f"error: {e}" for e in report["errors"])
    return lines
