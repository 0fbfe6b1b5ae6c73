"""`stockade status`: each node's agent as `cilium status` shows it: the generation the
operator published for the node and the one its agent applied (from `<node>.program.0`, the
agent's report), the endpoints attached, the programs in force, and its errors; with agents to
ask (`stockade.inspect.agents`), also its mode (conntrack on policy change, the clock conntrack
reads, the program and shape digests), its rules and the events the flow log lost.

Exits non-zero when a node is behind, reports errors, or its agent could not be asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes.client

from stockade import handoff
from stockade.inspect.agents import AgentError, Agents
from stockade.model.crd import DATAPATH_TABLE
from stockade.model.crd_schema import GROUP, VERSION


def node_reports(api: Any) -> dict[str, dict[str, Any]]:
    """node -> {published, applied, attached, digest, errors} from every `<node>.program.0`."""
    listed: Any = kubernetes.client.CustomObjectsApi(api).list_cluster_custom_object(
        GROUP, VERSION, DATAPATH_TABLE.plural
    )
    out: dict[str, dict[str, Any]] = {}
    for obj in listed.get("items") or []:
        found = handoff.program_report(obj)
        if found is None:
            continue
        node, status = found
        status = status or {}
        out[node] = {
            "published": (obj.get("spec") or {}).get("generation"),
            "applied": status.get("appliedGeneration"),
            "attached": status.get("endpointsAttached"),
            "digest": status.get("compiledDigest"),
            "errors": list(status.get("errors") or []),
        }
    return out


def status(api: Any, agents: Agents | None) -> dict[str, Any]:
    nodes = node_reports(api)
    for node, report in nodes.items():
        report["healthy"] = report["applied"] == report["published"] and not report["errors"]
        if agents is None:
            continue
        try:
            report["agent"] = agents.get(node, "/status", {})
        except AgentError as exc:
            report["agent"] = None
            report["errors"] = [*report["errors"], str(exc)]
            report["healthy"] = False
    return {"nodes": nodes, "healthy": all(r["healthy"] for r in nodes.values())}


def render(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for node, r in sorted(report["nodes"].items()):
        state = "OK" if r["healthy"] else "NOT OK"
        lines.append(
            f"{node}: {state}  generation {r['applied'] if r['applied'] is not None else '-'}"
            f"/{r['published']} applied, {r['attached'] or 0} endpoint(s) attached, "
            f"programs {str(r['digest'] or '-')[:12]}"
        )
        agent = r.get("agent")
        if agent:
            mode = agent.get("mode") or {}
            lines.append(
                f"  mode: conntrack on policy change {mode.get('conntrackOnPolicyChange')}, "
                f"conntrack clock {mode.get('conntrackClock')}, "
                f"shape {mode.get('shape')}; {agent.get('rules')} rule(s); "
                f"{agent.get('flowEvents')} drop/audit event(s), {agent.get('eventsLost')} lost"
            )
        lines.extend(f"  error: {e}" for e in r["errors"])
    if not report["nodes"]:
        lines.append("no node has DatapathTables yet (is the operator running?)")
    return lines
