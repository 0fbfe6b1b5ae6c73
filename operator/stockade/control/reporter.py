"""Policy status and Events, from what the agents report: the operator's status reporter.

After every pass the reconciler tells the reporter which node generations carry each policy's
current version (`carried()`, after a publish) and asks it to `report()`, with the endpoints per
node of every policy subject as the last lowering found them (`stockade.control.worker`, from
the lowering's pod-set membership, so that no pass scans the cluster here): the reporter computes
the status (`stockade.control.status`, pure) of every policy whose record, progress or the
replica's leadership changed since it last needed nothing, writes only the statuses that change,
several at once, and posts an Event once per (policy version, reason, message): a Warning when a
policy is invalid (before its status, so that whoever sees the status finds it), and for the
standard NetworkPolicy, which has no status of ours, a Normal Event when it is programmed.
Nothing is written unless this replica is the leader.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from stockade.control.events import post_event
from stockade.control.policies import PolicyKey, PolicyRecord
from stockade.control.publish import MERGE_PATCH, NOT_FOUND, run_all
from stockade.control.status import Progress, desired_status, progress, status_differs
from stockade.control.store import View
from stockade.model.kinds import RESOURCE_OF
from stockade.model.policy import PodSet


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusReporter:
    """Remembers what it wrote and said; `status_writes` and `events` count API calls."""

    def __init__(self, api: ApiClient, is_leader: Callable[[], bool] = lambda: True) -> None:
        self._api = api
        self._objects = CustomObjectsApi(api)
        self._is_leader = is_leader
        # policy -> (uid, generation) and the node generations that first carried it
        self._required: dict[PolicyKey, tuple[tuple[str, int], dict[str, int]]] = {}
        self._reported: dict[PolicyKey, tuple[Any, ...]] = {}  # what Events already said
        self._written: dict[PolicyKey, dict[str, Any]] = {}  # statuses written, not yet seen
        # policy -> the record, progress and leadership that last needed no write and no new
        # Event: while they stay the same the policy is not looked at again (a pass that
        # follows one change does not rebuild thousands of statuses to compare them)
        self._settled: dict[PolicyKey, tuple[PolicyRecord, Progress | None, bool]] = {}
        self.status_writes = 0
        self.events = 0
        self.last_status_write = 0.0  # Unix s of the last status write

    def carried(self, snap: View, generations: Mapping[str, int]) -> None:
        """After a publish: each accepted policy whose version is new is carried from
        `generations` on (its Programmed condition waits for those)."""
        for key, record in snap.policies.items():
            version = (record.uid, record.generation)
            if record.accepted and self._required.get(key, ((), {}))[0] != version:
                self._required[key] = (version, dict(generations))
        for key in set(self._required) - set(snap.policies):
            del self._required[key]

    def report(
        self,
        snap: View,
        generations: Mapping[str, int],
        selected: Mapping[PodSet, Mapping[str, int]],
    ) -> None:
        """Write every policy status that changed and post the Events that are due;
        `generations` are the nodes' current program generations, `selected` the endpoints
        per node of each subject. A policy whose subject no lowering has seen yet (a status
        pass before the pass that lowers it) waits for that pass."""
        now = _now()
        leader = self._is_leader()
        writes: list[tuple[PolicyRecord, dict[str, Any]]] = []
        for key, record in sorted(snap.policies.items()):
            done = None
            if record.policy is not None:
                if (endpoints := selected.get(record.policy.subject)) is None:
                    continue
                required = self._required.get(key, ((), generations))[1]
                done = progress(endpoints, required, snap.reports)
            settled = self._settled.get(key)
            if settled is not None and settled[0] is record and settled[1:] == (done, leader):
                continue  # what its status and Events follow from is what needed nothing
            status = desired_status(record, done, now)
            if record.has_status:
                if status_differs(record.status, status) and status_differs(
                    self._written.get(key, {}), status
                ):
                    writes.append((record, status))
                    continue  # settled once the write is seen to need nothing more
            elif leader:
                self._netpol_events(record, status)
            self._settled[key] = (record, done, leader)
        if writes and self._is_leader():
            for record, status in writes:  # the Event first: whoever sees the status finds it
                if not record.accepted:
                    self._event_once(record, "Warning", record.reason, status)
            self._write_statuses(writes)
        for key in set(self._reported) - set(snap.policies):
            del self._reported[key]
        for key in set(self._written) - set(snap.policies):
            del self._written[key]
        for key in set(self._settled) - set(snap.policies):
            del self._settled[key]

    def _write_statuses(self, writes: list[tuple[PolicyRecord, dict[str, Any]]]) -> None:
        """Write the statuses that changed, at most MAX_CONCURRENT_WRITES at once (each is a round
        trip; a thousand new policies are a thousand writes). Every write that succeeded is
        remembered; the first failure is raised once all have finished, and the next pass writes
        what is still missing."""
        results = run_all(lambda w: self._write_status(*w), writes, "stockade-status")
        errors = [r for r in results if isinstance(r, BaseException)]
        for (record, status), result in zip(writes, results, strict=True):
            if result is True:
                self.status_writes += 1
                self.last_status_write = time.time()
                self._written[record.key] = status
        if errors:
            raise errors[0]

    def _event_once(self, record: PolicyRecord, kind: str, reason: str, status: Any) -> None:
        message = status["conditions"][0]["message"] if not record.accepted else ""
        if reason == "Programmed":
            message = status["conditions"][1]["message"]
        said = (record.uid, record.generation, reason, message)
        if self._reported.get(record.key) == said:
            return
        self._reported[record.key] = said
        post_event(self._api, record, kind, reason, message)
        self.events += 1

    def _netpol_events(self, record: PolicyRecord, status: dict[str, Any]) -> None:
        """The standard NetworkPolicy: a Warning when it is not accepted, a Normal event when
        its generation is programmed on every selected endpoint."""
        accepted, programmed = status["conditions"]
        if accepted["status"] == "False":
            self._event_once(record, "Warning", record.reason, status)
        elif programmed["status"] == "True":
            self._event_once(record, "Normal", "Programmed", status)

    def _write_status(self, record: PolicyRecord, status: dict[str, Any]) -> bool:
        """Patch one policy's status; False when the policy is gone."""
        resource = RESOURCE_OF[record.kind]
        group, version, plural = resource.group, resource.version, resource.plural
        body = {"status": status}
        try:
            if record.namespace:
                self._objects.patch_namespaced_custom_object_status(
                    group,
                    version,
                    record.namespace,
                    plural,
                    record.name,
                    body,
                    _content_type=MERGE_PATCH,
                )
            else:
                self._objects.patch_cluster_custom_object_status(
                    group, version, plural, record.name, body, _content_type=MERGE_PATCH
                )
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return False  # deleted meanwhile: its DELETED event is on its way
            raise
        return True
