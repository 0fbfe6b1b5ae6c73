"""A long pass hands on the nodes it has lowered as it goes (`stockade.control.worker.Partial`),
and the reconciler writes them while it lowers the rest (#17). Checked at every pass of generated
change sequences (tests/unit/test_lowering_worker.py's `Cluster`), with every node, some or none
handed on early, against the real Publisher on an in-memory API: the objects stored are
exactly those of a cold lowering, every node assembles, the early writes name whole nodes and
delete nothing, and the worker process answers as the thread does."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.control.lowering import Lowerer
from stockade.control.plan import Plan, plan
from stockade.control.publish import Publisher
from stockade.control.reconciler import Reconciler
from stockade.control.worker import InThread
from stockade.handoff import Assembler, TableObject
from tests.fixtures.scenarios import PROFILE, examples
from tests.unit.test_lowering_worker import Cluster

CONFLICT, NOT_FOUND = 409, 404


class Objects:
    """DatapathTables in memory, as a CustomObjectsApi stores them (merge patches; the spec's
    generation raised by a change to it)."""

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.lock = threading.Lock()

    def _stamped(self, name: str, obj: dict[str, Any], generation: int) -> dict[str, Any]:
        self.version += 1
        obj["metadata"] |= {
            "uid": f"uid-{name}",
            "generation": generation,
            "resourceVersion": str(self.version),
        }
        self.stored[name] = obj
        return copy.deepcopy(obj)

    def create_cluster_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        body = copy.deepcopy(args[-1])
        name = body["metadata"]["name"]
        with self.lock:
            if name in self.stored:
                raise ApiException(status=CONFLICT)
            return self._stamped(name, body, 1)

    def patch_cluster_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        name, body = args[-2], copy.deepcopy(args[-1])
        with self.lock:
            if name not in self.stored:
                raise ApiException(status=NOT_FOUND)
            obj = self.stored[name]
            spec = {k: v for k, v in {**obj["spec"], **body["spec"]}.items() if v is not None}
            meta = body.get("metadata") or {}
            notes = {**(obj["metadata"].get("annotations") or {}), **meta.get("annotations", {})}
            obj["metadata"]["annotations"] = {k: v for k, v in notes.items() if v is not None}
            generation = obj["metadata"]["generation"] + (spec != obj["spec"])
            obj["spec"] = spec
            return self._stamped(name, obj, generation)

    def delete_cluster_custom_object(self, *args: Any, **_: Any) -> None:
        with self.lock:
            if self.stored.pop(args[-1], None) is None:
                raise ApiException(status=NOT_FOUND)

    def get_cluster_custom_object(self, *args: Any, **_: Any) -> dict[str, Any]:
        with self.lock:
            if args[-1] not in self.stored:
                raise ApiException(status=NOT_FOUND)
            return copy.deepcopy(self.stored[args[-1]])

    def tables(self) -> dict[str, TableObject]:
        with self.lock:
            return {n: TableObject.from_api(o) for n, o in self.stored.items()}


class Recording(Publisher):
    """The real Publisher, on `Objects`, recording every plan it applies."""

    def __init__(self) -> None:
        super().__init__(ApiClient())
        self.objects = Objects()
        self._objects = self.objects  # type: ignore[assignment]
        self.applied: list[tuple[Plan, bool]] = []

    def apply(self, plan: Plan, partial: bool = False) -> None:
        self.applied.append((plan, partial))
        super().apply(plan, partial)


def reconciler(
    cluster: Cluster, mode: str, made: list[Reconciler], stream_after: float
) -> Reconciler:
    out = Reconciler(cluster.store, ApiClient(), mode=mode, stream_after=stream_after)
    made.append(out)
    out.publisher = Recording()
    out._synced, out._listed_at = True, time.monotonic()
    return out


@settings(settings.get_profile(PROFILE), max_examples=min(examples(6), 30))  # a worker each
@given(data=st.data())
def test_nodes_written_early_leave_exactly_the_cold_lowerings_objects(
    data: st.DataObject,
) -> None:
    cluster = Cluster(data)
    # every node handed on, some of them (as the clock falls), or none: all in the answer
    after = data.draw(st.sampled_from([0.0, 0.0005, 60.0]))
    made: list[Reconciler] = []
    try:
        process = reconciler(cluster, "process", made, after)
        thread = reconciler(cluster, "thread", made, 60.0)
        publisher = process.publisher
        assert isinstance(publisher, Recording) and isinstance(thread.lowering, InThread)
        streamed = 0
        for _ in range(data.draw(st.integers(1, 5))):
            snap = cluster.store.take(changes=True)
            assert snap.changes is not None
            engine = thread.lowering.engine
            before = dict(engine.lowerer.ids) if engine is not None else {}
            thread.lower(snap.changes)  # the same journal, lowered in this thread
            _, failure = process._publish(snap)  # lowered in the worker, written as it goes
            assert failure is None
            assert process.parts == thread.parts
            cold = Lowerer()
            cold.ids = before  # ids depend on the history: a cold lowering carries them in
            want = plan({}, cold.desired(cluster.store.snapshot()), 1)
            stored = publisher.objects.tables()
            assert {n: t.digest for n, t in stored.items()} == {
                w.name: w.digest for w in want.writes
            }
            for node in {w.node for w in want.writes}:
                # complete: the program object and every shard it names, at one generation
                Assembler(node).assemble({n: t for n, t in stored.items() if t.node == node})
            for applied, partial in publisher.applied:
                if partial:
                    streamed += 1
                    assert applied.deletes == ()
                    nodes = {w.node for w in applied.writes}
                    programs = {w.node for w in applied.writes if w.part == handoff.PROGRAM}
                    assert programs == nodes  # whole nodes: each with its manifest
            publisher.applied.clear()
            cluster.change()
        if after == 0.0:
            assert streamed > 0  # the first pass encodes every node: it hands them on
    finally:
        for one in made:
            one.close()
