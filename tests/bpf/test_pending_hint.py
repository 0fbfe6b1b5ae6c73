"""The `pending_hint` counts (bpf/maps.h) on real BPF: the programs skip the `pending` lookup for
an interface whose slot counts no pending interface, so a slot that ever counted fewer than its
pending interfaces would let a pending pod's packets pass unjudged.

Generated sequences of marks and clears, over interfaces that share the loopback's slot and
interfaces that do not: after each step every slot counts exactly its pending interfaces, and
the programs judge the loopback (the interface of the test runs) by its own state alone. And an
agent that finds interfaces pending from a version before the hints counts them before it
loads the programs that read the hints.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.agent.programs import Programs
from stockade.compiler import abi, ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import Shape
from stockade.datapath import events, libbpf, maps
from stockade.datapath.clang import Compiler
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath, private_pin_root

SLOTS = abi.HINT_SLOTS
LO = maps.LOOPBACK_IFINDEX
SHARING = (LO, LO + SLOTS, LO + 7 * SLOTS)  # the loopback's slot
OTHERS = (LO + 1, LO + 1 + SLOTS, SLOTS - 1)
POD, PEER, EP = "10.0.0.1", "10.0.0.2", 1
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(pk.addr(POD), EP),),
    classes=(),
    policy=(ir.PolicyEntry(EP, Direction.INGRESS, 32, 0, 0, 0, Action.DENY, 100),),
)
# Denied by the policy; a pending interface drops it as pending (CLOSED) or passes it (OPEN).
PROBE = pk.packet_frame(ir.Packet(pk.addr(PEER), pk.addr(POD), ir.PROTO_TCP, 80))

steps = st.lists(
    st.tuples(
        st.booleans(),  # mark, or clear
        st.sampled_from(SHARING + OTHERS),
        st.sampled_from(list(abi.PendingState)),
    ),
    min_size=1,
    max_size=24,
)


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    with datapath() as d:
        d.write(TABLES)
        yield d


def _judged(dp: Datapath) -> tuple[TcVerdict, list[events.DropReason]]:
    assert dp.maps is not None
    maps.flush_conntrack(dp.maps)
    dp.events()
    verdict = dp.run(PROBE, Direction.INGRESS)
    return verdict, [e.reason for e in dp.events()]


def _expected(state: abi.PendingState | None) -> tuple[TcVerdict, list[events.DropReason]]:
    if state is abi.PendingState.OPEN:
        return TcVerdict.ALLOW, []
    if state is abi.PendingState.CLOSED:
        return TcVerdict.DENY, [events.DropReason.PENDING]
    return TcVerdict.DENY, [events.DropReason.POLICY]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=steps)
def test_every_slot_counts_its_pending_interfaces_and_the_loopback_is_judged_by_its_own_state(
    dp: Datapath, steps: list[tuple[bool, int, abi.PendingState]]
) -> None:
    assert dp.maps is not None
    pending = maps.Pending(dp.maps)
    try:
        for mark, ifindex, state in steps:
            if mark:
                pending.mark(ifindex, state)
            else:
                pending.clear(ifindex)
            marked = pending.read()
            assert pending.hints() == dict(Counter(i % SLOTS for i in marked)), steps
            assert _judged(dp) == _expected(marked.get(LO)), (steps, marked)
    finally:
        for ifindex in pending.read():
            pending.clear(ifindex)
    assert pending.hints() == {}


def _pending_without_hints(root: Path, marked: dict[int, abi.PendingState]) -> None:
    """What a version before the hints left pinned: `pending`, holding `marked`, and no hint."""
    spec = abi.MAPS["pending"]
    fd = libbpf.map_create(int(spec.type), "pending", 4, 4, spec.entries(Shape()))
    try:
        for ifindex, state in marked.items():
            libbpf.map_update(fd, abi.U32.pack(ifindex), abi.U32.pack(int(state)))
        libbpf.obj_pin(fd, root / "pending")
    finally:
        os.close(fd)


def test_interfaces_left_pending_by_a_version_before_the_hints_are_counted_before_a_load() -> None:
    closed, open_ = abi.PendingState.CLOSED, abi.PendingState.OPEN
    marked = {LO: closed, LO + SLOTS: open_, 5: open_}
    root = private_pin_root()
    try:
        _pending_without_hints(root, marked)
        assert maps.ensure_pending_hint(root)
        assert not maps.ensure_pending_hint(root)  # made once; the agent keeps it counted
        dp = Datapath(Shape(), root)  # the programs reuse both pins
        try:
            dp.write(TABLES)
            assert dp.maps is not None
            assert maps.Pending(dp.maps).hints() == {LO % SLOTS: 2, 5: 1}
            assert _judged(dp) == _expected(abi.PendingState.CLOSED)
            maps.Pending(dp.maps).clear(LO)
            assert _judged(dp) == _expected(None)
        finally:
            dp.close()
    finally:
        shutil.rmtree(root)


def test_the_agent_counts_them_when_it_loads_its_programs(tmp_path: Path) -> None:
    root = private_pin_root()
    programs = Programs(Compiler(tmp_path / "cache"), root)
    try:
        _pending_without_hints(root, {LO: abi.PendingState.CLOSED, 9: abi.PendingState.CLOSED})
        assert programs.ensure(Shape())
        opened = maps.PinnedMaps.open(root)
        try:
            assert maps.Pending(opened).hints() == {LO: 1, 9: 1}
        finally:
            opened.close()
    finally:
        programs.close()
        shutil.rmtree(root)
