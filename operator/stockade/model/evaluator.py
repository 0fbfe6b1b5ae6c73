"""The reference evaluator: what stockade decides for a new connection, in plain Python.

It is the oracle for the compiled datapath (differential tests compare them) and the `reference`
engine of the conformance runner. It favours being obviously right over being fast: each step of
DESIGN.md §2's order is one stage of a pipeline, a stage returns ALLOW, DENY or NEXT ("no
decision, ask the next stage"), and the first stage that decides wins.

    evaluate(state, policies, flow) -> Decision

For a flow from A to B, the egress of A (when A is a pod) and the ingress of B (when B is a pod)
are judged separately; the connection is allowed only when both allow it. Host-network pods are
not pods for this purpose: they are judged by address only.

Audit mode: an Audit-mode policy never changes what happens. The decision is computed from the
Enforce-mode policies alone; when enforcing the Audit-mode policies as well would change the
verdict, `Decision.audit` says what it would have been and which rule would have decided.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from stockade.model.cluster import ClusterState, Pod
from stockade.model.flow import Flow
from stockade.model.matching import rule_matches, selects
from stockade.model.policy import (
    Direction,
    IPAddress,
    Mode,
    Policy,
    Protocol,
    RuleAction,
    RuleRef,
    Tier,
)


class Verdict(Enum):
    ALLOW = "allow"
    DENY = "deny"
    NEXT = "next"  # no decision: the next stage of the pipeline decides


@dataclass(frozen=True)
class StageResult:
    verdict: Verdict
    reason: str
    tier: Tier | None = None
    rule: RuleRef | None = None


@dataclass(frozen=True)
class DirectionDecision:
    """The verdict for one direction: egress of the source pod or ingress of the destination."""

    direction: Direction
    pod: str  # "namespace/name" of the pod whose policies were judged
    verdict: Verdict  # ALLOW or DENY
    tier: Tier | None  # None: no tier decided (node traffic, or nothing matched)
    rule: RuleRef | None  # None: allowed by default or as node traffic
    reason: str


@dataclass(frozen=True)
class AuditFinding:
    """What would happen if the Audit-mode policies were enforced too."""

    verdict: Verdict
    tier: Tier | None
    rule: RuleRef | None
    reason: str


@dataclass(frozen=True)
class Decision:
    verdict: Verdict  # ALLOW or DENY
    tier: Tier | None
    rule: RuleRef | None
    reason: str
    directions: tuple[DirectionDecision, ...] = ()
    audit: AuditFinding | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def would_deny_in_audit(self) -> bool:
        """Allowed now, but an Audit-mode policy would drop it if it were enforced."""
        return self.audit is not None and self.audit.verdict is Verdict.DENY


@dataclass(frozen=True)
class _Context:
    state: ClusterState
    policies: tuple[Policy, ...]  # the policies that take part (sorted by precedence)
    flow: Flow
    direction: Direction
    pod: Pod  # the pod whose policies are judged
    remote: IPAddress  # the other end of the connection
    dst_pod: Pod | None  # where named ports resolve
    from_node: bool = True  # a flow from a node address was sent by that node's own stack

    def selecting(self, tier: Tier) -> list[Policy]:
        """Policies of `tier` that select the pod and affect this direction, by precedence."""
        return [
            p
            for p in self.policies
            if p.tier is tier
            and self.direction in p.directions
            and selects(p, self.pod, self.state)
        ]


Stage = Callable[[_Context], StageResult]


# ICMPv6 link control, never judged by policies: multicast listener discovery (130-132, 143),
# router and neighbour discovery and redirect (133-137). What the on-link rules let through
# (`link_control`) passes; the rest is dropped. The datapath applies the same rules.
ICMPV6_CONTROL_TYPES = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})
ICMPV6_ND_TYPES = frozenset({133, 134, 135, 136, 137})
# Only routers send these (RFC 4861 §6, §8): a router advertisement and a redirect.
ICMPV6_ROUTER_TYPES = frozenset({134, 137})
ND_HOP_LIMIT, MLD_HOP_LIMIT = 255, 1


def on_link_hop_limit(icmp_type: int) -> int:
    """The hop limit an on-link sender gives ICMPv6 control of `icmp_type`: 255 for router and
    neighbour discovery (RFC 4861), 1 for MLD (RFC 3810)."""
    return ND_HOP_LIMIT if icmp_type in ICMPV6_ND_TYPES else MLD_HOP_LIMIT


class LinkControl(Enum):
    OK = "ok"
    NOT_A_ROUTER = "not_a_router"
    NOT_ON_LINK = "not_on_link"


def link_control(icmp_type: int, src: IPAddress, hop_limit: int, from_pod: bool) -> LinkControl:
    """The on-link rules for ICMPv6 control of `icmp_type` (in ICMPV6_CONTROL_TYPES), as
    `icmpv6_control_check` in bpf/parse.h: ND needs hop limit 255 (no router forwards it, so it
    can only come from the link), and a router advertisement or redirect toward a pod needs a
    link-local source; a pod sending one is no router. MLD needs hop limit 1 and a link-local
    (or the unspecified) source."""
    if icmp_type in ICMPV6_ND_TYPES:
        if from_pod and icmp_type in ICMPV6_ROUTER_TYPES:
            return LinkControl.NOT_A_ROUTER
        if hop_limit != ND_HOP_LIMIT:
            return LinkControl.NOT_ON_LINK
        if icmp_type in ICMPV6_ROUTER_TYPES and not src.is_link_local:
            return LinkControl.NOT_ON_LINK
        return LinkControl.OK
    if hop_limit != MLD_HOP_LIMIT or not (src.is_link_local or src.is_unspecified):
        return LinkControl.NOT_ON_LINK
    return LinkControl.OK


# Redirects, by protocol: ICMP type 5, ICMPv6 type 137. Only a router sends one (RFC 1122
# §3.2.2.2, RFC 4861 §8); a pod is none.
REDIRECT_TYPES = {Protocol.ICMP: 5, Protocol.ICMPV6: 137}


def _not_a_router(ctx: _Context) -> StageResult:
    """A redirect sent by a pod is dropped whatever the policies: a pod is no router, and a
    redirect from one can only steer its neighbours' traffic (the datapath's reason
    not_a_router)."""
    redirect = REDIRECT_TYPES.get(ctx.flow.protocol)
    if (
        ctx.direction is Direction.EGRESS
        and redirect is not None
        and ctx.flow.icmp_type == redirect
    ):
        return StageResult(Verdict.DENY, f"{ctx.pod.key} sent an ICMP redirect: not a router")
    return StageResult(Verdict.NEXT, "")


def _link_control(ctx: _Context) -> StageResult:
    """DESIGN.md §2: "Always allowed, whatever the policies: ... ARP and IPv6 neighbour
    discovery", as far as it is valid on-link (`link_control`; a flow's first packet is taken
    to carry the on-link hop limit of its type)."""
    icmp_type = ctx.flow.icmp_type
    if ctx.flow.protocol is not Protocol.ICMPV6 or icmp_type not in ICMPV6_CONTROL_TYPES:
        return StageResult(Verdict.NEXT, "")
    check = link_control(
        icmp_type, ctx.flow.src_ip, on_link_hop_limit(icmp_type), ctx.direction is Direction.EGRESS
    )
    if check is LinkControl.OK:
        return StageResult(Verdict.ALLOW, f"ICMPv6 type {icmp_type} is link control")
    return StageResult(Verdict.DENY, f"ICMPv6 type {icmp_type} is link control: {check.value}")


def _node_traffic(ctx: _Context) -> StageResult:
    """DESIGN.md §2: "Always allowed ... traffic from the node the pod runs on (kubelet probes)":
    what that node's own stack sends from one of its addresses, not what it forwards with one
    (SNAT, masquerade) (`from_node`)."""
    if (
        ctx.from_node
        and ctx.direction is Direction.INGRESS
        and ctx.remote in ctx.state.node_ips(ctx.pod.node)
    ):
        return StageResult(Verdict.ALLOW, f"from {ctx.pod.key}'s own node {ctx.pod.node}")
    return StageResult(Verdict.NEXT, "")


def _cluster_tier(tier: Tier) -> Stage:
    """Admin (step 1) and Baseline (step 3): "by ascending priority, rules in order. The first
    matching rule decides: Accept allows, Deny drops, Pass skips to" the next tier."""

    def stage(ctx: _Context) -> StageResult:
        for policy in ctx.selecting(tier):
            for rule in policy.rules(ctx.direction):
                if not rule_matches(rule, ctx.remote, ctx.flow, ctx.dst_pod, ctx.state):
                    continue
                label = f"{tier.value} {rule.ref}" + (f" '{rule.name}'" if rule.name else "")
                if rule.action is RuleAction.PASS:
                    return StageResult(Verdict.NEXT, f"{label} -> Pass", tier, rule.ref)
                verdict = Verdict.ALLOW if rule.action is RuleAction.ALLOW else Verdict.DENY
                word = "Accept" if verdict is Verdict.ALLOW else "Deny"
                return StageResult(verdict, f"{label} -> {word}", tier, rule.ref)
        return StageResult(Verdict.NEXT, "")

    stage.__name__ = f"_{tier.value.lower()}_tier"
    return stage


def _namespace_tier(ctx: _Context) -> StageResult:
    """Step 2: "A matching Deny rule drops; otherwise a matching Allow rule allows; otherwise, if
    any of them selects the pod for that direction, the packet is dropped (the pod is isolated)."
    """
    selecting = ctx.selecting(Tier.NAMESPACE)
    if not selecting:
        return StageResult(Verdict.NEXT, "")
    for action, verdict in ((RuleAction.DENY, Verdict.DENY), (RuleAction.ALLOW, Verdict.ALLOW)):
        for policy in selecting:
            for rule in policy.rules(ctx.direction):
                if rule.action is action and rule_matches(
                    rule, ctx.remote, ctx.flow, ctx.dst_pod, ctx.state
                ):
                    return StageResult(
                        verdict, f"{rule.ref} -> {action.value}", Tier.NAMESPACE, rule.ref
                    )
    first = selecting[0]
    ref = first.isolation_ref(ctx.direction)
    names = ", ".join(f"{p.namespace}/{p.name}" for p in selecting)
    reason = (
        f"{ctx.pod.key} is isolated for {ctx.direction.value.lower()} by {names}; no rule allows"
    )
    return StageResult(Verdict.DENY, reason, Tier.NAMESPACE, ref)


def _default_allow(ctx: _Context) -> StageResult:
    """Step 4: "Nothing matched: allowed."."""
    return StageResult(Verdict.ALLOW, "no policy decided: allowed by default")


PIPELINE: tuple[Stage, ...] = (
    _not_a_router,
    _link_control,
    _node_traffic,
    _cluster_tier(Tier.ADMIN),
    _namespace_tier,
    _cluster_tier(Tier.BASELINE),
    _default_allow,
)


def _judge(ctx: _Context) -> DirectionDecision:
    trail: list[str] = []
    for stage in PIPELINE:
        result = stage(ctx)
        if result.reason:
            trail.append(result.reason)
        if result.verdict is not Verdict.NEXT:
            reason = f"{ctx.direction.value.lower()} of {ctx.pod.key}: " + "; ".join(trail)
            return DirectionDecision(
                ctx.direction, ctx.pod.key, result.verdict, result.tier, result.rule, reason
            )
    raise AssertionError("the pipeline ends with a stage that always decides")


def _precedence(policies: Iterable[Policy]) -> tuple[Policy, ...]:
    return tuple(sorted(policies, key=lambda p: p.sort_key))


def _decide(state: ClusterState, policies: Sequence[Policy], flow: Flow) -> Decision:
    ordered = _precedence(policies)
    src_pod, dst_pod = state.pod_at(flow.src_ip), state.pod_at(flow.dst_ip)
    judged: list[DirectionDecision] = []
    if src_pod is not None:
        judged.append(
            _judge(_Context(state, ordered, flow, Direction.EGRESS, src_pod, flow.dst_ip, dst_pod))
        )
    if dst_pod is not None:
        judged.append(
            _judge(_Context(state, ordered, flow, Direction.INGRESS, dst_pod, flow.src_ip, dst_pod))
        )
    if not judged:
        return Decision(Verdict.ALLOW, None, None, "neither end is a pod: no policy applies")
    # Allowed only when every judged direction allows; the first denial (egress is met first)
    # is the deciding one, otherwise the last allowing direction speaks for the decision.
    deciding = next((d for d in judged if d.verdict is Verdict.DENY), judged[-1])
    reason = " | ".join(d.reason for d in judged)
    return Decision(deciding.verdict, deciding.tier, deciding.rule, reason, tuple(judged))


def evaluate(state: ClusterState, policies: Iterable[Policy], flow: Flow) -> Decision:
    """Decide a new connection `flow` under `policies` in `state` (see the module docstring)."""
    every = tuple(policies)
    enforced = [p for p in every if p.mode is Mode.ENFORCE]
    decision = _decide(state, enforced, flow)
    if len(enforced) == len(every):
        return decision
    would = _decide(state, every, flow)
    if would.verdict is decision.verdict:
        return decision
    audit = AuditFinding(would.verdict, would.tier, would.rule, would.reason)
    return Decision(
        decision.verdict,
        decision.tier,
        decision.rule,
        decision.reason,
        decision.directions,
        audit,
    )


@dataclass(frozen=True)
class DirectionJudgement:
    """One direction's verdict with what enforcing the Audit-mode policies would change."""

    allowed: bool
    rule: RuleRef | None
    audit_allowed: bool | None  # None: no Audit-mode policy takes part
    audit_rule: RuleRef | None


def judge(
    state: ClusterState,
    policies: Iterable[Policy],
    flow: Flow,
    direction: Direction,
    from_node: bool = True,
) -> DirectionJudgement:
    """The verdict of one direction alone: the egress hook of the flow's source pod, or the
    ingress hook of its destination pod. The compiler lowers policies by calling this at one
    point of every region that policy cannot tell apart, so the datapath agrees by construction.
    `from_node` False: a flow from an address of the pod's node was forwarded by the node, not
    sent by its own stack, and is judged by policy like any other (the lowering judges so; the
    datapath exempts the node's own packets by ClassFlag.LOCAL_NODE, bpf/policy.h).
    """
    pod = state.pod_at(flow.dst_ip if direction is Direction.INGRESS else flow.src_ip)
    if pod is None:
        raise ValueError(f"no pod at the {direction.value.lower()} end of {flow}")
    remote = flow.src_ip if direction is Direction.INGRESS else flow.dst_ip
    dst_pod = state.pod_at(flow.dst_ip)
    every = _precedence(policies)
    enforced = tuple(p for p in every if p.mode is Mode.ENFORCE)
    now = _judge(_Context(state, enforced, flow, direction, pod, remote, dst_pod, from_node))
    if len(enforced) == len(every):
        return DirectionJudgement(now.verdict is Verdict.ALLOW, now.rule, None, None)
    would = _judge(_Context(state, every, flow, direction, pod, remote, dst_pod, from_node))
    return DirectionJudgement(
        now.verdict is Verdict.ALLOW, now.rule, would.verdict is Verdict.ALLOW, would.rule
    )
