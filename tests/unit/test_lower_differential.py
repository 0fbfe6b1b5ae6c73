"""The lowering is exact: for generated clusters, policies and flows, the tables it builds, read
the way the datapath reads them (`ir.lookup`), give the reference evaluator's verdict for each
direction, the deciding rule, and what Audit mode would report. The inputs come from
`tests.fixtures.scenarios` (ipBlocks around pod addresses, named ports that differ between pods,
mixed peers in one rule); `HYPOTHESIS_PROFILE=thorough` runs 5,000 examples.

This is the pure half of the datapath's differential test; tests/bpf checks the kernel against
`ir.lookup` on the same kind of tables.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.lower import VERDICTS_LIMIT, Ids, Lowering, Verdicts, lower_node
from stockade.model.cluster import ClusterState
from stockade.model.evaluator import judge
from stockade.model.flow import Flow
from stockade.model.parse import parse_policy
from stockade.model.policy import Direction
from tests.fixtures.scenarios import (
    NODES,
    PROFILE,
    Scenario,
    examples,
    flow,
    labels,
    scenario,
)


def _packet(f: Flow) -> ir.Packet:
    port = (
        f.dst_port if f.dst_port is not None else ir.icmp_port(f.icmp_type or 0, f.icmp_code or 0)
    )
    return ir.Packet(f.src_ip, f.dst_ip, f.protocol.number, port)


def _check(scenario: Scenario, tables: dict[str, ir.NodeTables], f: Flow) -> None:
    state, policies = scenario.state, list(scenario.policies)
    for direction, address in ((Direction.EGRESS, f.src_ip), (Direction.INGRESS, f.dst_ip)):
        pod = state.pod_at(address)
        if pod is None:
            continue
        want = judge(state, policies, f, direction)
        t = tables[pod.node or ""]
        got = ir.lookup(t, _packet(f), ir.Direction[direction.name])
        assert (got.action is ir.Action.ALLOW) == want.allowed, (direction, f)
        rule = t.rules[got.rule_id] if got.rule_id else None
        got_rule = (rule.kind, rule.namespace, rule.name, rule.index) if rule else None
        want_rule = (
            (want.rule.kind.value, want.rule.namespace, want.rule.name, want.rule.index)
            if want.rule
            else None
        )
        assert got_rule == want_rule, (direction, f)
        if want.audit_allowed is not None and want.audit_allowed != want.allowed:
            assert got.audit_action is (ir.Action.ALLOW if want.audit_allowed else ir.Action.DENY)
        else:
            assert got.audit_action is ir.Action.NONE


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_lowered_tables_decide_every_flow_as_the_reference_evaluator(data: st.DataObject) -> None:
    case = data.draw(scenario())
    lowering = Lowering(case.state, case.policies)
    tables = {n.name: lowering.node(n.name).tables for n in NODES}
    for _ in range(10):
        _check(case, tables, data.draw(flow(case)))


@settings(settings.get_profile(PROFILE), max_examples=examples(200))
@given(data=st.data())
def test_verdicts_and_results_kept_from_other_cluster_states_lower_exactly_as_a_cold_lowering(
    data: st.DataObject,
) -> None:
    """The operator keeps verdicts and each node's last result across passes while pods and
    labels change; what it reuses must never differ from what a lowering from nothing would
    decide (with the same ids carried in)."""
    case = data.draw(scenario())
    first, policies = case.state, list(case.policies)
    # The pods of n1 relabelled: n0's endpoints stay as they were, its peers may not.
    second = ClusterState(
        first.namespaces.values(),
        [replace(pod, labels=data.draw(labels)) if pod.node == "n1" else pod for pod in first.pods],
        NODES,
    )
    # A small limit turns the verdicts' generations over within a pass.
    verdicts = Verdicts(limit=data.draw(st.sampled_from([VERDICTS_LIMIT, 3, 1])))
    previous = {}  # type: ignore[var-annotated]
    ids: dict[str, Ids | None] = {n.name: None for n in NODES}
    for state in (first, second, second, first):
        warm = Lowering(state, policies, verdicts, previous)
        for node in NODES:
            cold = lower_node(state, policies, node.name, ids[node.name])
            got = warm.node(node.name, ids[node.name])
            assert got.tables == cold.tables, node.name
            assert dict(got.ids.classes) == dict(cold.ids.classes), node.name
            ids[node.name] = got.ids


def test_verdicts_keep_at_most_two_generations_and_what_is_used_stays() -> None:
    verdicts = Verdicts(limit=2)
    policy = parse_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"podSelector": {}},
        }
    )

    def key(n: int) -> Any:
        return (((), (id(policy),)), n)

    for n in range(10):
        verdicts.put(key(n), [policy], ())
        assert verdicts.get(key(0)) == ()  # used on every turn: it moves back each time
        assert len(verdicts) <= 4
    assert verdicts.get(key(1)) is None  # not asked for through a whole generation
    verdicts.retain([])
    assert len(verdicts) == 0
