"""The fallback mode's Service verdicts: one node's tables and the cluster's Service → backends
table → what the client's veth decides for a new flow to a Service address (bpf/service.h,
`svc_verdict`), on kernels without BPF netfilter programs (docs/services.md, "fallback mode").

The veth sees `client → Service address:port` before kube-proxy picks a backend, so it cannot
judge the backend the flow really reaches. It allows the flow only when the client's egress
allows every ready backend on its target port (each judged by the node's own tables, the way
the veth judges a flow sent to that backend directly: `ir.lookup`), and denies it otherwise;
a Service address with no ready backend is denied (`no_backends`). The backend's ingress is
still judged by the backend's own veth after DNAT, as for any flow.

Entries are made only for endpoints that some egress policy selects (they have egress policy
entries): an endpoint without one is allowed everything, through a Service or not, and its flows
are judged at the veth as before (no entry: the Service address is judged as a peer).

The reference is the evaluator composed over the backends (tests/unit/test_fallback.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from stockade.compiler import ir


def service_verdicts(
    tables: ir.NodeTables, services: Iterable[ir.ServiceBackends]
) -> tuple[ir.ServiceVerdictEntry, ...]:
    """Every (endpoint with egress policy, Service address, protocol, port) verdict, sorted
    by map key."""
    egress = ir.Direction.EGRESS
    policy_of: dict[int, list[ir.PolicyEntry]] = {}
    for entry in tables.policy:
        if entry.direction is egress:
            policy_of.setdefault(entry.endpoint_id, []).append(entry)
    if not policy_of:
        return ()
    services = list(services)
    out: list[ir.ServiceVerdictEntry] = []
    for endpoint in sorted(tables.endpoints, key=lambda e: e.endpoint_id):
        entries = policy_of.get(endpoint.endpoint_id)
        if entries is None:
            continue
        # The endpoint's own tables: lookups read only its entries (same answers).
        own = ir.NodeTables(
            endpoints=(endpoint,), classes=tables.classes, policy=tuple(entries), rules={}
        )
        for svc in services:
            if svc.address.version != endpoint.address.version:
                continue  # a Service address of the other family is never this address's flow
            out.append(_judge(own, endpoint, svc))
    return tuple(sorted(out, key=lambda e: e.key()))


def _judge(
    own: ir.NodeTables, endpoint: ir.EndpointEntry, svc: ir.ServiceBackends
) -> ir.ServiceVerdictEntry:
    def entry(action: ir.Action, rule_id: int, no_backends: bool = False) -> ir.ServiceVerdictEntry:
        return ir.ServiceVerdictEntry(
            endpoint.endpoint_id, svc.address, svc.protocol, svc.port, action, rule_id, no_backends
        )

    if not svc.backends:
        return entry(ir.Action.DENY, ir.RULE_NONE, no_backends=True)
    first: ir.Verdict | None = None
    for address, target_port in svc.backends:
        packet = ir.Packet(endpoint.address, address, svc.protocol, target_port)
        verdict = ir.lookup(own, packet, ir.Direction.EGRESS)
        if verdict.action is not ir.Action.ALLOW:
            return entry(ir.Action.DENY, verdict.rule_id)
        first = first or verdict
    assert first is not None
    return entry(ir.Action.ALLOW, first.rule_id)
