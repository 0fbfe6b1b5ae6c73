"""One reconcile pass: snapshot → lower every node → plan → publish → policy statuses.

Level-triggered: whatever happened, a pass recomputes every node's tables from the Store and
writes only what differs from what is published (`stockade.control.plan`), then recomputes every
policy's status and writes only the statuses that change, several at once. The `Runner` calls
`run(tables)`; nothing here runs unless this replica is the leader.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from stockade.compiler import handoff, ir
from stockade.compiler.lower import Ids, Lowered, Lowering, Verdicts
from stockade.compiler.shape import Shape
from stockade.control.events import post_event
from stockade.control.plan import plan
from stockade.control.policies import PolicyKey, PolicyRecord
from stockade.control.prime import prime
from stockade.control.publish import MERGE_PATCH, NOT_FOUND, Publisher, run_all
from stockade.control.selection import selected_endpoints
from stockade.control.status import desired_status, progress, status_differs
from stockade.control.store import Snapshot, Store
from stockade.model.kinds import RESOURCE_OF

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Counters for metrics and tests."""

    passes: int = 0
    table_passes: int = 0
    status_writes: int = 0
    events: int = 0
    last_seconds: float = 0.0
    # the last pass that lowered, by stage: lowering and encoding, writing tables, statuses
    stage_seconds: dict[str, float] = field(default_factory=dict)
    node_seconds: dict[str, float] = field(default_factory=dict)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(
        self,
        store: Store,
        api: ApiClient,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        shape: Shape | None = None,
        upstream_cnp: bool = True,
        inline_entries: int = handoff.INLINE_ENTRIES,
    ) -> None:
        self._upstream_cnp = upstream_cnp
        self._inline = inline_entries
        self._store = store
        self._api = api
        self._objects = CustomObjectsApi(api)
        self._is_leader = is_leader
        self._shape = shape or Shape()
        self.publisher = Publisher(api)
        self.ids: dict[str, Ids] = {}
        self.verdicts = Verdicts()  # kept across passes: a pass judges only what is new
        self._encoded: dict[str, tuple[ir.NodeTables, dict[str, handoff.Shards]]] = {}
        self._lowered: dict[str, tuple[object, Lowered]] = {}  # node -> its last inputs, result
        self.generation = 0
        self.generations: dict[str, int] = {}  # node -> its current program generation
        self._synced = False
        # policy -> (uid, generation) and the node generations that first carried it
        self._required: dict[PolicyKey, tuple[tuple[str, int], dict[str, int]]] = {}
        self._reported: dict[PolicyKey, tuple[Any, ...]] = {}  # what Events already said
        self._written: dict[PolicyKey, dict[str, Any]] = {}  # statuses written, not yet seen
        self.stats = Stats()

    def became_leader(self) -> None:
        """Forget what we believe is published: the next pass lists it again."""
        self._synced = False

    def forget(self, name: str) -> bool:
        """A DatapathTable was deleted behind our back; True when it was one of ours."""
        known = name in self.publisher.published
        self.publisher.forget(name)
        return known

    def run(self, tables: bool) -> None:
        if not self._is_leader():
            return
        started = time.monotonic()
        if not self._synced:
            # Never publish from a partial picture.
            prime(self._store, self._api, upstream_cnp=self._upstream_cnp)
            self.generation = max(self.generation, self.publisher.resync())
            self.generations = {
                p.node: p.generation
                for p in self.publisher.published.values()
                if p.part == handoff.PROGRAM
            }
            self._synced, tables = True, True
        snap = self._store.snapshot()
        stages = {"lower": 0.0, "publish": 0.0}
        if tables:
            stages = self._publish(snap)
        began = time.monotonic()
        self._statuses(snap)
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

    # --- tables ------------------------------------------------------------------------------

    def desired(self, snap: Snapshot) -> dict[str, dict[str, handoff.Shards]]:
        policies = [r.policy for _, r in sorted(snap.policies.items()) if r.policy is not None]
        nodes = set(snap.state.nodes) | {p.node for p in snap.state.pods if p.node}
        lowering = Lowering(snap.state, policies, self.verdicts, self._lowered)
        out = {}
        for node in sorted(nodes):
            began = time.monotonic()
            lowered = lowering.node(node, self.ids.get(node))
            self.ids[node] = lowered.ids
            last = self._encoded.get(node)
            if last is not None and last[0] == lowered.tables:
                out[node] = last[1]  # unchanged: skip encoding it again
            else:
                out[node] = handoff.encode(lowered.tables, self._shape, self._inline)
                self._encoded[node] = (lowered.tables, out[node])
            self.stats.node_seconds[node] = time.monotonic() - began
        for node in set(self.ids) - nodes:
            del self.ids[node]
            self._encoded.pop(node, None)
            self._lowered.pop(node, None)
        self.verdicts.retain(policies)
        return out

    def _publish(self, snap: Snapshot) -> dict[str, float]:
        """Lower, plan and write; the seconds each took."""
        began = time.monotonic()
        desired = self.desired(snap)
        planned = plan(self.publisher.published, desired, self.generation + 1)
        lowered = time.monotonic()
        stages = {"lower": lowered - began, "publish": 0.0}
        if not self._is_leader():
            return stages
        if planned.writes:
            self.generation += 1
        self.publisher.apply(planned)
        stages["publish"] = time.monotonic() - lowered
        self.generations = dict(planned.generations)
        self.stats.table_passes += 1
        for key, record in snap.policies.items():
            version = (record.uid, record.generation)
            if record.accepted and self._required.get(key, ((), {}))[0] != version:
                self._required[key] = (version, dict(self.generations))
        for key in set(self._required) - set(snap.policies):
            del self._required[key]
        return stages

    # --- status ------------------------------------------------------------------------------

    def _statuses(self, snap: Snapshot) -> None:
        now = _now()
        writes: list[tuple[PolicyRecord, dict[str, Any]]] = []
        for key, record in sorted(snap.policies.items()):
            done = None
            if record.policy is not None:
                selected = selected_endpoints(snap, record.policy.subject)
                required = self._required.get(key, ((), self.generations))[1]
                done = progress(selected, required, snap.reports)
            status = desired_status(record, done, now)
            if record.has_status:
                if status_differs(record.status, status) and status_differs(
                    self._written.get(key, {}), status
                ):
                    writes.append((record, status))
            elif self._is_leader():
                self._netpol_events(record, status)
        if writes and self._is_leader():
            for record, status in writes:  # the Event first: whoever sees the status finds it
                if not record.accepted:
                    self._event_once(record, "Warning", "Invalid", status)
            self._write_statuses(writes)
        for key in set(self._reported) - set(snap.policies):
            del self._reported[key]
        for key in set(self._written) - set(snap.policies):
            del self._written[key]

    def _write_statuses(self, writes: list[tuple[PolicyRecord, dict[str, Any]]]) -> None:
        """Write the statuses that changed, at most MAX_CONCURRENT_WRITES at once (each is a round
        trip; a thousand new policies are a thousand writes). Every write that succeeded is
        remembered; the first failure is raised once all have finished, and the next pass writes
        what is still missing."""
        results = run_all(lambda w: self._write_status(*w), writes, "stockade-status")
        errors = [r for r in results if isinstance(r, BaseException)]
        for (record, status), result in zip(writes, results, strict=True):
            if result is True:
                self.stats.status_writes += 1
                self._written[record.key] = status
        if errors:
            raise errors[0]

    def _event_once(self, record: PolicyRecord, kind: str, reason: str, status: Any) -> None:
        message = status["conditions"][0]["message"] if reason == "Invalid" else ""
        if reason == "Programmed":
            message = status["conditions"][1]["message"]
        said = (record.uid, record.generation, reason, message)
        if self._reported.get(record.key) == said:
            return
        self._reported[record.key] = said
        post_event(self._api, record, kind, reason, message)
        self.stats.events += 1

    def _netpol_events(self, record: PolicyRecord, status: dict[str, Any]) -> None:
        """The standard NetworkPolicy: a Warning when it is not accepted, a Normal event when
        its generation is programmed on every selected endpoint."""
        accepted, programmed = status["conditions"]
        if accepted["status"] == "False":
            self._event_once(record, "Warning", "Invalid", status)
        elif programmed["status"] == "True":
            self._event_once(record, "Normal", "Programmed", status)

    def _write_status(self, record: PolicyRecord, status: dict[str, Any]) -> bool:
        """Patch one policy's status; False when the policy is gone."""
        resource = RESOURCE_OF[record.kind]
        body = {"status": status}
        try:
            if record.namespace:
                self._objects.patch_namespaced_custom_object_status(
                    resource.group,
                    resource.version,
                    record.namespace,
                    resource.plural,
                    record.name,
                    body,
                    _content_type=MERGE_PATCH,
                )
            else:
                self._objects.patch_cluster_custom_object_status(
                    resource.group,
                    resource.version,
                    resource.plural,
                    record.name,
                    body,
                    _content_type=MERGE_PATCH,
                )
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return False  # deleted meanwhile: its DELETED event is on its way
            raise
        return True
