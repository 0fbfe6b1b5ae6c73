"""Differential test, end to end below the control plane: for generated clusters and policies
(`tests.fixtures.scenarios`: ipBlocks around pod addresses, named ports that differ between
pods, mixed peers in one rule, both families), the operator's lowering is written into the real
programs' maps and every generated flow's first packet is run through the hook of each endpoint
it touches. The kernel must give the reference evaluator's verdict, and a drop must be reported
with the rule the evaluator names.

tests/unit/test_lower_differential.py checks the same lowering through `ir.lookup` with more
examples; this test shows that what the kernel does with those tables agrees too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.lower import Lowering
from stockade.datapath import events, maps
from stockade.harness.testrun import TcVerdict
from stockade.model.evaluator import judge
from stockade.model.flow import Flow
from stockade.model.policy import Direction
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath
from tests.fixtures.scenarios import NODES, PROFILE, examples, flow, scenario


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        yield d


def _packet(f: Flow) -> ir.Packet:
    port = (
        f.dst_port if f.dst_port is not None else ir.icmp_port(f.icmp_type or 0, f.icmp_code or 0)
    )
    return ir.Packet(f.src_ip, f.dst_ip, f.protocol.number, port)


@settings(settings.get_profile(PROFILE), max_examples=examples(60))
@given(data=st.data())
def test_the_kernel_decides_lowered_policies_as_the_reference_evaluator(
    dp: Datapath, data: st.DataObject
) -> None:
    case = data.draw(scenario())
    state, policies = case.state, list(case.policies)
    flows = data.draw(st.lists(flow(case), min_size=1, max_size=10))
    lowering = Lowering(state, policies)
    assert dp.maps is not None
    for node in NODES:
        tables = lowering.node(node.name).tables
        dp.write(tables)
        rule_ids = {
            (r.kind, r.namespace, r.name, r.direction.name, r.index): i
            for i, r in tables.rules.items()
        }
        for f in flows:
            for direction, address in ((Direction.EGRESS, f.src_ip), (Direction.INGRESS, f.dst_ip)):
                pod = state.pod_at(address)
                if pod is None or pod.node != node.name:
                    continue
                maps.flush_conntrack(dp.maps)
                dp.events()
                want = judge(state, policies, f, direction)
                got = dp.run(pk.packet_frame(_packet(f)), ir.Direction[direction.name])
                expected = TcVerdict.ALLOW if want.allowed else TcVerdict.DENY
                assert got is expected, (direction, str(f), want)
                if not want.allowed:
                    rule = want.rule
                    want_id = (
                        rule_ids[
                            (
                                rule.kind.value,
                                rule.namespace,
                                rule.name,
                                rule.direction.name,
                                rule.index,
                            )
                        ]
                        if rule is not None
                        else ir.RULE_NONE
                    )
                    seen = [(e.kind, e.rule_id) for e in dp.events()]
                    assert seen == [(events.EventKind.DROP, want_id)], (direction, str(f))
