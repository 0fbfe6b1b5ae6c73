"""`stockade explain --from A --to B --port P`: why a connection is allowed or denied.

Two answers, side by side, for each direction (the egress hook of the source pod, the ingress
hook of the destination pod):

- the reference evaluator's (`stockade.model.evaluator.evaluate`) on the cluster as the API
  server holds it now (`stockade.inspect.live`): the verdict, the tier, the deciding policy and
  rule, and its reasoning (which policies were met first and why they did not decide);
- the datapath's: each end's node agent runs a crafted first packet through the programs it
  has loaded, with its live maps (`/trace`, `stockade.agent.trace`).

They must agree on the verdict and the rule. When they do not (a stale or corrupted map, an
agent behind the operator, a bug), `explain` says so loudly and exits 2; an agent it could not
ask is an error too (exit 1), never a silent agreement.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stockade.inspect.agents import AgentError, Agents
from stockade.inspect.live import Live
from stockade.inspect.observe import identity, rule_text
from stockade.model.evaluator import Decision, DirectionDecision, evaluate
from stockade.model.flow import Flow
from stockade.model.policy import IPAddress, Protocol

EXIT_DISAGREE = 2
ICMP = (Protocol.ICMP, Protocol.ICMPV6)


@dataclass(frozen=True)
class Endpoint:
    text: str  # as given: NS/POD or an address
    address: IPAddress
    pod: str | None  # namespace/name
    node: str | None


def resolve(live: Live, text: str, family: int | None = None) -> Endpoint:
    """`NS/POD` (its address of `family`, IPv4 first) or an address; ValueError names it."""
    if "/" not in text:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"{text!r}: neither NAMESPACE/POD nor an IP address") from None
        pod = live.state.pod_at(address)
        return Endpoint(text, address, pod.key if pod else None, pod.node if pod else None)
    pod = live.pod(text)
    ips = sorted(pod.ips, key=lambda ip: ip.version)
    chosen = [ip for ip in ips if family is None or ip.version == family]
    if not chosen:
        raise ValueError(f"{text}: no IPv{family} address")
    return Endpoint(text, chosen[0], pod.key, pod.node)


def flow_of(src: Endpoint, dst: Endpoint, protocol: Protocol, port: int, code: int) -> Flow:
    if protocol in ICMP:
        return Flow(src.address, dst.address, protocol, None, port, code)
    return Flow(src.address, dst.address, protocol, port)


@dataclass
class Hop:
    """One direction: the reference's judgement and the datapath's, where it was asked."""

    direction: str  # egress | ingress
    node: str | None
    reference: DirectionDecision
    datapath: Mapping[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    def body(self) -> dict[str, object]:
        ref = self.reference
        return {
            "direction": self.direction,
            "pod": ref.pod,
            "node": self.node,
            "reference": {
                "verdict": ref.verdict.value,
                "tier": ref.tier.value if ref.tier else None,
                "rule": identity(ref.rule),
                "reason": ref.reason,
            },
            "datapath": dict(self.datapath) if self.datapath is not None else None,
            "agree": not self.problems,
            "problems": self.problems,
        }


def compare(ref: DirectionDecision, datapath: Mapping[str, Any] | None) -> list[str]:
    """What the datapath's answer disagrees with in the reference's (empty: they agree)."""
    if datapath is None:
        return ["the node's datapath has no answer for this endpoint (not attached?)"]
    problems = []
    if datapath.get("verdict") != ref.verdict.value:
        problems.append(
            f"verdict: reference {ref.verdict.value}, datapath {datapath.get('verdict')}"
        )
    if datapath.get("rule") != identity(ref.rule):
        problems.append(
            f"rule: reference {rule_text(identity(ref.rule))}, "
            f"datapath {rule_text(datapath.get('rule'))} (rule id {datapath.get('ruleId')})"
        )
    return problems


@dataclass
class Explanation:
    src: Endpoint
    dst: Endpoint
    flow: Flow
    decision: Decision
    hops: list[Hop]

    @property
    def agree(self) -> bool:
        return all(not hop.problems for hop in self.hops)

    def body(self) -> dict[str, object]:
        return {
            "from": {"address": str(self.src.address), "pod": self.src.pod, "node": self.src.node},
            "to": {"address": str(self.dst.address), "pod": self.dst.pod, "node": self.dst.node},
            "flow": str(self.flow),
            "verdict": self.decision.verdict.value,
            "tier": self.decision.tier.value if self.decision.tier else None,
            "rule": identity(self.decision.rule),
            "reason": self.decision.reason,
            "agree": self.agree,
            "hops": [hop.body() for hop in self.hops],
        }


def policy_port(flow: Flow) -> int:
    """The datapath's port of `flow`: the destination port, or ICMP type << 8 | code."""
    if flow.dst_port is not None:
        return flow.dst_port
    return ((flow.icmp_type or 0) << 8) | (flow.icmp_code or 0)


def explain(
    live: Live, agents: Agents | None, src: Endpoint, dst: Endpoint, flow: Flow
) -> Explanation:
    """The reference's decision and, when `agents` is given, each hop's datapath answer."""
    decision = evaluate(live.state, live.policies, flow)
    hops = []
    for ref in decision.directions:
        egress = ref.direction.value == "Egress"
        node = (src if egress else dst).node
        hops.append(Hop("egress" if egress else "ingress", node, ref))
    if agents is not None:
        for hop in hops:
            answer = ask(agents, hop, flow)
            hop.datapath = answer
            hop.problems = compare(hop.reference, answer)
    return Explanation(src, dst, flow, decision, hops)


def ask(agents: Agents, hop: Hop, flow: Flow) -> Mapping[str, Any] | None:
    """The answer of the agent of `hop`'s node for `hop`'s direction (None: it has none)."""
    if hop.node is None:
        raise AgentError(f"pod {hop.reference.pod} is on no node yet")
    query = {
        "src": str(flow.src_ip),
        "dst": str(flow.dst_ip),
        "protocol": flow.protocol.value,
        "port": policy_port(flow),
    }
    answer = agents.get(hop.node, "/trace", query)
    found: Sequence[Mapping[str, Any]] = answer.get("hooks") or []
    return next((h for h in found if h.get("direction") == hop.direction), None)


def render(explanation: Explanation) -> str:
    e = explanation
    lines = [
        f"{e.src.pod or e.src.address} ({e.src.address}) -> {e.dst.pod or e.dst.address} "
        f"({e.dst.address}): {e.flow}",
        f"verdict: {e.decision.verdict.value.upper()}"
        + (f" by {rule_text(identity(e.decision.rule))}" if e.decision.rule else ""),
    ]
    if e.decision.audit is not None:
        lines.append(
            f"audit: enforcing the Audit-mode policies would {e.decision.audit.verdict.value} it"
            + (f" ({rule_text(identity(e.decision.audit.rule))})" if e.decision.audit.rule else "")
        )
    for hop in e.hops:
        ref = hop.reference
        lines.append(f"  {hop.direction} of {ref.pod} (node {hop.node or '-'}):")
        tier = f", tier {ref.tier.value}" if ref.tier else ""
        lines.append(f"    reference: {ref.verdict.value}{tier}, {rule_text(identity(ref.rule))}")
        lines.append(f"      why: {ref.reason}")
        if hop.datapath is not None:
            dp = hop.datapath
            lines.append(
                f"    datapath:  {dp.get('verdict')}, {rule_text(dp.get('rule'))} "
                f"(rule id {dp.get('ruleId')}, program test run on the node)"
            )
        for problem in hop.problems:
            lines.append(f"    !!! DISAGREEMENT: {problem}")
    if not e.hops:
        lines.append("  neither end is a pod: no policy applies")
    if not e.agree:
        lines.append(
            "!!! the datapath disagrees with the reference evaluator: the node's tables are "
            "stale or corrupt, or this is a bug (see `stockade status`)"
        )
    return "\n".join(lines)
