"""The operator's reconcile loop: changes → lower every node → plan → publish → policy statuses.

Level-triggered: whatever happened, a pass derives every node's tables from the Store's state
and writes only what differs from what is published. The pass takes the Store's journal of
changes (O(changes) under the Store's lock, `Store.take`) and hands it to the lowering
(`stockade.control.worker`: by default a worker process that mirrors the Store and lowers again
only the nodes a change can reach), which answers with the nodes whose parts changed (a long
pass hands on the nodes it has lowered as it goes, and they are written while it lowers the
rest); the reconciler keeps every node's last parts for the plan
(`stockade.control.plan`, `stockade.control.publish`), then has the status reporter
(`stockade.control.reporter`) write the policy statuses that change. This module only sequences
them: priming the Store before the first pass as leader (`stockade.control.prime`), the leader
checks and the pass's timings. The `Runner` calls `run(tables)`; nothing here runs unless this
replica is the leader. Drift: `observe()` hands every watched DatapathTable to the publisher,
which forgets what someone else changed; the publisher lists the tables again every `relist`
seconds and after a write was refused, so that a pass also repairs what no event showed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes.client import ApiClient

from stockade import handoff
from stockade.compiler.shape import Shape
from stockade.control.plan import NodeParts
from stockade.control.prime import prime
from stockade.control.publish import NotLeaderError, Publisher, WriteConflictError
from stockade.control.reporter import StatusReporter
from stockade.control.store import Changes, Store, View
from stockade.control.worker import STREAM_AFTER, Lowering, Result, Settings, Stream, lowering
from stockade.model.policy import PodSet

log = logging.getLogger(__name__)

RELIST = 300.0  # seconds between listings of the DatapathTables, to repair unseen drift


@dataclass
class Stats:
    """Counters for metrics and tests."""

    passes: int = 0
    table_passes: int = 0
    running: bool = False  # a pass is under way (`passes` counts it once it ends)
    last_seconds: float = 0.0
    # the last pass that lowered, by stage: taking the changes (under the Store's lock),
    # lowering and encoding (the lowering's own stages as lower_*), writing tables, statuses
    stage_seconds: dict[str, float] = field(default_factory=dict)
    nodes_lowered: int = 0  # nodes the last lowering looked at again
    # The latest change to the lowering's inputs (Unix ns) that every node's tables carry, and
    # when (Unix s) the pass that first carried it began and finished writing them
    published_inputs: int | None = None
    published_pass_began: float = 0.0
    published_at: float = 0.0
    began_at: float = 0.0  # when (Unix s) the last pass began


class Reconciler:
    """Sequences one pass; its parts are public for metrics and tests."""

    def __init__(
        self,
        store: Store,
        api: ApiClient,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        shape: Shape | None = None,
        upstream_cnp: bool = True,
        inline_entries: int = handoff.INLINE_ENTRIES,
        services: bool = False,
        again: Callable[[], None] = lambda: None,
        relist: float = RELIST,
        mode: str = "process",  # where the lowering runs (`stockade.control.worker`)
        stream_after: float = STREAM_AFTER,  # a pass's seconds before it hands nodes on early
    ) -> None:
        self._upstream_cnp = upstream_cnp
        self._services = services
        self._store = store
        self._api = api
        self._is_leader = is_leader
        self.lowering: Lowering = lowering(
            mode, Settings(shape, inline_entries, services, stream_after)
        )
        self.parts: dict[str, NodeParts] = {}  # every node's encoded parts, as last lowered
        # policy subject -> node -> its endpoints there, as last lowered (for the statuses)
        self.selected: dict[PodSet, Mapping[str, int]] = {}
        self.publisher = Publisher(api, is_leader=is_leader)
        self.reporter = StatusReporter(api, is_leader)
        self._synced = False
        self._again = again  # asks for another pass (after a refused write)
        self._relist = relist
        self._listed_at = 0.0
        self.stats = Stats()

    def close(self) -> None:
        """Stop the lowering's worker (after the runner stopped: no pass is under way)."""
        self.lowering.close()

    def became_leader(self) -> None:
        """Forget what we believe is published: the next pass lists it again."""
        self._synced = False

    def observe(self, obj: Mapping[str, Any], deleted: bool) -> bool:
        """A watched DatapathTable: True when it was one of ours and was deleted, or changed by
        someone else, so that the next pass writes it back."""
        if deleted:
            return self.publisher.observe_deleted(str((obj.get("metadata") or {}).get("name", "")))
        return self.publisher.observe(obj)

    def run(self, tables: bool) -> None:
        if not self._is_leader():
            return
        self.stats.running = True
        try:
            self._run(tables)
        finally:
            self.stats.running = False

    def _run(self, tables: bool) -> None:
        started = time.monotonic()
        self.stats.began_at = time.time()
        if not self._synced:
            # Never publish from a partial picture.
            prime(
                self._store,
                self._api,
                upstream_cnp=self._upstream_cnp,
                services=self._services,
            )
        if (
            not self._synced
            or self.publisher.stale
            or time.monotonic() - self._listed_at >= self._relist
        ):
            self.publisher.resync()
            self._listed_at = time.monotonic()
            self._synced, tables = True, True
        began = time.monotonic()
        snap = self._store.take(changes=tables)
        took = time.monotonic() - began
        stages = {"lower": 0.0, "publish": 0.0}
        failure: Exception | None = None
        if tables:
            stages, failure = self._publish(snap)
        stages["take"] = took
        began = time.monotonic()
        self.reporter.report(snap, self.publisher.generations, self.selected)
        stages["status"] = time.monotonic() - began
        self.stats.passes += 1
        self.stats.last_seconds = time.monotonic() - started
        if tables:
            self.stats.stage_seconds = stages
        log.debug(
            "pass %d (tables=%s) in %.3fs: %s",
            self.stats.passes,
            tables,
            self.stats.last_seconds,
            ", ".join(f"{k} {v:.3f}s" for k, v in stages.items()),
        )
        if failure is not None:
            raise failure  # the runner runs the pass again: what failed is written then

    def lower(self, changes: Changes, early: Stream | None = None) -> Result:
        """Hand the changes to the lowering and keep what it answers; the nodes a long pass
        hands on before its answer go to `early` too, as they come."""
        streamed: dict[str, NodeParts] = {}

        def stream(parts: Mapping[str, NodeParts]) -> None:
            streamed.update(parts)
            if early is not None:
                early(parts)

        result = self.lowering.lower(changes, self._whole_store, stream)
        if result.full:
            self.parts.clear()
            self.selected.clear()
        # Only what the engine that answered streamed: a worker that died in the middle of a
        # pass may have streamed a node its successor no longer lowers.
        self.parts.update({node: streamed[node] for node in result.streamed})
        self.parts.update(result.parts)
        for node in result.gone:
            self.parts.pop(node, None)
        self.selected.update(result.selected)
        for subject in result.unselected:
            self.selected.pop(subject, None)
        self.stats.nodes_lowered = result.nodes_lowered
        return result

    def _whole_store(self) -> Changes:
        """The whole store as one journal, for a lowering that starts from nothing."""
        changes = self._store.take(changes=True, full=True).changes
        assert changes is not None
        return changes

    def _publish(self, snap: View) -> tuple[dict[str, float], Exception | None]:
        """Lower, plan and write; the seconds each took, and a write's failure, raised by `run`
        once the statuses are written: one object the server refuses holds back its own node,
        not the other nodes or the policy statuses."""
        assert snap.changes is not None
        began = time.monotonic()
        with ThreadPoolExecutor(1, thread_name_prefix="stockade-publish-early") as pool:

            def early(parts: Mapping[str, NodeParts]) -> None:
                pool.submit(self._publish_early, parts, snap.changed_at)

            result = self.lower(snap.changes, early)
            lowered = time.monotonic()
        planned = self.publisher.plan(self.parts, snap.changed_at)  # what the early ones left
        stages = {"lower": lowered - began, "publish": 0.0}
        stages.update({f"lower_{k}": v for k, v in result.seconds.items()})
        if not self._is_leader():
            return stages, None
        failure: Exception | None = None
        try:
            self.publisher.apply(planned)
        except NotLeaderError:
            log.info("lost the lease during a publish; stopped before the next wave")
            return stages, None
        except WriteConflictError as exc:
            log.warning("%s; listing the tables again", exc)
            self._again()
            return stages, None
        except Exception as exc:  # the other nodes went on: their policies' statuses are due
            log.warning("a publish failed for some nodes, the others went on: %s", exc)
            failure = exc
        stages["publish"] = time.monotonic() - lowered
        self.stats.table_passes += 1
        if failure is None and snap.latest_change != self.stats.published_inputs:
            self.stats.published_inputs = snap.latest_change
            self.stats.published_pass_began = self.stats.began_at
            self.stats.published_at = time.time()
        # A node that failed carries the policies at the plan's generation, which its agent
        # has not applied: they stay Pending there until a later publish lands.
        self.reporter.carried(snap, planned.generations)
        return stages, failure

    def _publish_early(self, parts: Mapping[str, NodeParts], changed_at: int | None) -> None:
        """Write the nodes a long pass handed on before its answer, while it lowers the rest:
        each node whole, at a generation of its own, so that its agent assembles it as it
        would after the pass. Nothing is deleted here, and a failure is left to the pass's own
        publish, which plans every node against what was written (and deletes what no node
        wants any more)."""
        if not self._is_leader():
            return
        try:
            planned = self.publisher.plan(parts, changed_at)
            self.publisher.apply(replace(planned, deletes=()), partial=True)
        except Exception as exc:
            log.debug("an early write failed; the pass's publish writes it again: %s", exc)
