"""The lowering fed the Store's journal (`stockade.control.worker`, #17) gives exactly what a
cold lowering of the same Store gives, at every pass of a generated change sequence (the
generators and steps of tests/unit/test_lower_incremental.py), and so does the worker process,
also when it is killed between passes: its successor starts from the whole store. Every policy
subject's endpoints per node, which the status reporter reads, equal the state's own index.
"""

from __future__ import annotations

import collections
import gc
import ipaddress
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client import ApiClient

from stockade.compiler.membership import Membership
from stockade.control.config import OperatorConfig
from stockade.control.lowering import Lowerer
from stockade.control.policies import PolicyRecord
from stockade.control.reconciler import Reconciler
from stockade.control.store import Mirror, Store
from stockade.control.worker import Collector, InProcess, InThread
from stockade.model.cluster import Namespace, Pod
from stockade.model.policy import PodSet, Policy
from stockade.model.selectors import LabelSelector
from tests.fixtures.scenarios import NODES, PROFILE, examples, scenario
from tests.unit.test_lower_incremental import step


def record(policy: Policy) -> PolicyRecord:
    return PolicyRecord(policy.kind, policy.namespace, policy.name, f"uid-{policy.name}", 1, policy)


class Cluster:
    """A generated cluster held in a Store, changed step by step as the handlers would."""

    def __init__(self, data: st.DataObject) -> None:
        case = data.draw(scenario())
        self.data = data
        self.namespaces = list(case.state.namespaces.values())
        self.pods: dict[str, Pod] = {p.key: p for p in case.state.pods}
        if data.draw(st.booleans()):  # no named ports: every change takes the proportional path
            self.pods = {k: replace(p, named_ports={}) for k, p in self.pods.items()}
        self.removed: dict[str, Pod] = {}
        self.pool = list(case.policies)
        self.active = list(self.pool)
        self.store = Store()
        for node in NODES:
            self.store.put_node(node.name, node)
        self.write()

    def write(self) -> None:
        """Put everything into the Store; an unchanged value is no change there."""
        for namespace in self.namespaces:
            self.store.put_namespace(namespace.name, namespace)
        for key, pod in self.pods.items():
            self.store.put_pod(key, pod)
        for key in self.removed:
            self.store.put_pod(key, None)
        active = {record(p).key: p for p in self.active}
        for policy in self.pool:
            key = record(policy).key
            if key not in active:
                self.store.put_policy(key, None)
        for key, policy in active.items():
            old = self.store.policy(key)
            if old is None or old.policy is not policy:
                self.store.put_policy(key, record(policy))

    def change(self) -> None:
        step(self.data, self.namespaces, self.pods, self.removed, self.active, self.pool)
        self.write()


def subjects_per_node(store: Store) -> dict[Any, dict[str, int]]:
    """Every policy subject's endpoints per node, from the state's own index."""
    snap = store.snapshot()
    out: dict[Any, dict[str, int]] = {}
    for r in snap.policies.values():
        if r.policy is not None:
            counts: dict[str, int] = {}
            for pod in snap.state.index.pods_in(r.policy.subject):
                if pod.node is not None and pod.ips:
                    counts[pod.node] = counts.get(pod.node, 0) + 1
            out[r.policy.subject] = counts
    return out


def lower(reconciler: Reconciler, store: Store) -> None:
    changes = store.take(changes=True).changes
    assert changes is not None
    reconciler.lower(changes)


@pytest.fixture
def reconcilers() -> Iterator[list[Reconciler]]:
    """Reconcilers made by the test; their workers are stopped and reaped after it."""
    made: list[Reconciler] = []
    yield made
    for reconciler in made:
        reconciler.close()


@settings(settings.get_profile(PROFILE), max_examples=examples(40))
@given(data=st.data())
def test_every_pass_fed_the_journal_equals_a_cold_lowering_of_the_store(
    data: st.DataObject,
) -> None:
    cluster = Cluster(data)
    reconciler = Reconciler(cluster.store, ApiClient(), mode="thread")
    assert isinstance(reconciler.lowering, InThread)
    for _ in range(data.draw(st.integers(1, 8))):
        engine = reconciler.lowering.engine
        before = dict(engine.lowerer.ids) if engine is not None else {}
        lower(reconciler, cluster.store)
        cold = Lowerer()
        cold.ids = before  # ids depend on the history: a cold lowering carries them in
        assert reconciler.parts == cold.desired(cluster.store.snapshot())
        assert reconciler.selected == subjects_per_node(cluster.store)
        cluster.change()


@settings(settings.get_profile(PROFILE), max_examples=examples(10))
@given(data=st.data())
def test_a_pass_leaves_no_garbage_in_reference_cycles(data: st.DataObject) -> None:
    """The worker freezes what a pass leaves alive (`Collector`): what dies later must die by
    its reference count, so no pass may make garbage that only a full collection frees."""
    cluster = Cluster(data)
    reconciler = Reconciler(cluster.store, ApiClient(), mode="thread")
    for _ in range(data.draw(st.integers(2, 6))):
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            lower(reconciler, cluster.store)
            gc.collect()
            found = collections.Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not found
        cluster.change()


def test_the_worker_collects_everything_only_when_the_heap_grew_by_a_quarter() -> None:
    collector = Collector(growth=0.25)
    kept: list[object] = []

    def grow(fraction: float) -> None:
        kept.extend([] for _ in range(int(fraction * collector.baseline) + 1))

    try:
        collector.after_pass(idle=True)  # everything is new: collected once
        assert collector.full_collections == 1
        assert gc.get_freeze_count() == collector.baseline > 0  # no longer scanned
        for _ in range(5):  # a heap that only churns is not scanned again
            kept.append([])
            kept.pop(0) if len(kept) > 1 else None
            collector.after_pass(idle=True)
        assert collector.full_collections == 1
        grow(0.3)
        collector.after_pass(idle=False)  # due, but a change waits
        assert collector.full_collections == 1
        collector.after_pass(idle=True)
        assert collector.full_collections == 2
        grow(1.1)  # four times the growth: collected even when a change waits
        collector.after_pass(idle=False)
        assert collector.full_collections == 3
        # Cycles frozen while a cache held them, then dropped from it: garbage that only a full
        # collection frees shows as growth, and the collection frees it.
        alive = collector.baseline
        cache: list[object] = []
        for _ in range(int(0.3 * alive) // 2 + 1):
            a: list[object] = []
            a.append([a])
            cache.append(a)
        collector.after_pass(idle=False)
        assert collector.full_collections == 3
        cache.clear()
        collector.after_pass(idle=True)
        assert collector.full_collections == 4
        assert collector.baseline < alive * 1.05
    finally:
        gc.unfreeze()


@settings(settings.get_profile(PROFILE), max_examples=min(examples(4), 25))  # a worker each
@given(data=st.data())
def test_the_worker_process_answers_as_the_thread_does_and_a_killed_one_loses_nothing(
    data: st.DataObject,
) -> None:
    cluster = Cluster(data)
    thread = Reconciler(cluster.store, ApiClient(), mode="thread")
    process = Reconciler(cluster.store, ApiClient(), mode="process")
    worker = process.lowering
    assert isinstance(worker, InProcess)
    steps = data.draw(st.integers(2, 6))
    kill = data.draw(st.integers(1, steps - 1))
    try:
        for index in range(steps):
            if index == kill:
                assert worker.pid is not None
                os.kill(worker.pid, signal.SIGKILL)
            changes = cluster.store.take(changes=True).changes
            assert changes is not None
            thread.lower(changes)
            process.lower(changes)
            assert process.parts == thread.parts
            assert process.selected == thread.selected
            cluster.change()
    finally:
        process.close()
    assert worker.starts == 2


def test_a_lowering_that_raised_starts_again_from_the_whole_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine that raised may hold half an update: the next pass has a new one, given the
    whole store, so the change the failed pass took is not lost."""
    store = Store()
    store.put_node("n0", NODES[0])
    reconciler = Reconciler(store, ApiClient(), mode="thread")
    assert isinstance(reconciler.lowering, InThread)
    lower(reconciler, store)
    engine = reconciler.lowering.engine
    assert engine is not None and set(reconciler.parts) == {"n0"}

    def broken(changes: object, stream: object = None) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(engine, "lower", broken)
    store.put_node("n1", NODES[1])
    with pytest.raises(RuntimeError):
        lower(reconciler, store)
    lower(reconciler, store)
    assert reconciler.lowering.engine is not engine
    assert set(reconciler.parts) == {"n0", "n1"}


def test_closing_the_lowering_ends_its_worker_at_the_end_of_its_input(
    reconcilers: list[Reconciler],
) -> None:
    store = Store()
    store.put_node("n0", NODES[0])
    reconciler = Reconciler(store, ApiClient(), mode="process")
    reconcilers.append(reconciler)
    lower(reconciler, store)
    worker = reconciler.lowering
    assert isinstance(worker, InProcess)
    child = worker._child
    assert child is not None
    reconciler.close()
    assert child.returncode == 0  # it exited on its own (killed would be -9), and was reaped
    assert worker.pid is None


def test_the_lowering_setting_takes_process_or_thread_and_defaults_to_process() -> None:
    assert OperatorConfig().lowering == "process"
    assert OperatorConfig(lowering="thread").lowering == "thread"
    with pytest.raises(ValueError, match="--lowering: 'fork' is not one of process, thread"):
        OperatorConfig(lowering="fork")


def test_a_take_hands_over_only_what_changed_since_the_last_and_a_full_take_everything() -> None:
    store = Store()
    ns = Namespace("a", {"kubernetes.io/metadata.name": "a"})
    store.put_namespace("a", ns)
    web = Pod("a", "web", {"app": "web"}, node="n0")
    store.put_pod("a/web", web)
    store.put_pod("a/db", Pod("a", "db"))
    store.put_pod("a/db", None)  # the last write of a key wins
    first = store.take(changes=True).changes
    assert first is not None and not first.full
    assert dict(first.entries) == {
        ("namespaces", "a"): ns,
        ("pods", "a/web"): web,
        ("pods", "a/db"): None,
    }
    store.put_pod("a/web", web)  # the same value: no change
    store.put_report("n0", {"appliedGeneration": 1})  # an agent's report: not the lowering's
    assert store.take(changes=False).changes is None  # a status pass leaves the journal
    assert dict(store.take(changes=True).changes.entries) == {}  # type: ignore[union-attr]
    whole = store.take(changes=True, full=True).changes
    assert whole is not None and whole.full
    assert dict(whole.entries) == {("namespaces", "a"): ns, ("pods", "a/web"): web}
    mirror = Mirror()
    mirror.apply(first)
    assert [p.key for p in mirror.snapshot().state.pods] == ["a/web"]


ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1")


@st.composite
def pod_writes(draw: st.DrawFn) -> list[tuple[str, Pod | None]]:
    """Puts and removals of a few pods over a pool of addresses so small that addresses are
    reused (held by two pods at once), host-network pods among them."""
    writes: list[tuple[str, Pod | None]] = []
    for _ in range(draw(st.integers(1, 30))):
        name = draw(st.sampled_from(["a", "b", "c", "d", "e"]))
        if draw(st.integers(0, 4)) == 0:
            writes.append((f"ns/{name}", None))
            continue
        ips = draw(st.lists(st.sampled_from(ADDRESSES), max_size=2, unique=True))
        pod = Pod(
            "ns",
            name,
            {"v": str(draw(st.integers(0, 2)))},
            tuple(ipaddress.ip_address(ip) for ip in ips),
            node=draw(st.sampled_from(["n0", "n1"])),
            host_network=draw(st.integers(0, 5)) == 0,
        )
        writes.append((f"ns/{name}", pod))
    return writes


@settings(max_examples=examples(300), deadline=None)
@given(writes=pod_writes(), every=st.integers(1, 5))
def test_the_mirror_keeps_the_state_the_store_builds(
    writes: list[tuple[str, Pod | None]], every: int
) -> None:
    """The Mirror's state, kept from change to change, is the Store's built anew: the same pods
    in the same order (a pod whose address another still holds left out), the same owner of
    every address; taken every `every` writes, so a take carries several changes of one pod.
    A Membership that follows the Mirror's snapshots with the pods they say changed (none said
    while an address is shared) holds what the state's own index holds."""
    store, mirror, membership = Store(), Mirror(), Membership()
    pod_sets = [PodSet(LabelSelector.of({"v": v}), namespace="ns") for v in ("0", "1", "2")]
    for i, (key, pod) in enumerate(writes, start=1):
        store.put_pod(key, pod)
        if i % every and i != len(writes):
            continue
        changes = store.take(changes=True).changes
        assert changes is not None
        mirror.apply(changes)
        snap = mirror.snapshot()
        want, got = store.snapshot().state, snap.state
        assert got.pods == want.pods
        for ip in ADDRESSES:
            address = ipaddress.ip_address(ip)
            assert got.pod_at(address) == want.pod_at(address), ip
        membership.update(got, snap.pods_changed)
        for pod_set in pod_sets:
            members = sorted(p.key for p in membership.pods_in(got, pod_set))
            assert members == sorted(p.key for p in got.index.pods_in(pod_set)), pod_set
        assert membership.nodes() == {p.node for p in got.pods if p.node}
