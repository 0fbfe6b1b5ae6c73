"""Leader election with a coordination.k8s.io/v1 Lease: only the holder publishes.

kopf's peering is not leader election: operators of equal priority all freeze, and a higher
priority pauses the others for as long as it runs, so it cannot give "two replicas, one active,
the other takes over". This is client-go's lease protocol instead: the holder renews
`renewTime` every `renew_period`; another candidate takes over once it has seen the same record
unchanged for `duration` seconds (its own clock, never the holder's), writing with the
resourceVersion it read so that two candidates cannot both win. The holder stops publishing
once it has not renewed for two thirds of `duration` (it may have lost the lease without
knowing), and releases the lease when it stops so that the other replica takes over at once.
`on_started` runs whenever the replica leads after a moment of not leading, also when a renewal
was only slow (a loaded API server) rather than lost: the passes in that moment did nothing, so
the replica starts over as a new leader would.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient, CoordinationV1Api, V1Lease
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

NOT_FOUND = 404
CONFLICT = 409


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        api: ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        renew_period: float = 2.0,
        on_started: Callable[[], None] = lambda: None,
    ) -> None:
        self._api = CoordinationV1Api(api)
        self._namespace, self._name, self.identity = namespace, name, identity
        self._duration, self._renew = duration, renew_period
        self._on_started = on_started
        self._renewed_at: float | None = None  # monotonic time of our last successful write
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stockade-lease", daemon=True)

    @property
    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and time.monotonic() - renewed < self._window

    @property
    def _window(self) -> float:
        """How long after a renewal this replica still counts itself the leader."""
        return self._duration * 2 / 3

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.release()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.round()
            self._stop.wait(self._renew)

    def round(self) -> None:
        """One renewal, and `on_started` when this replica leads after not leading."""
        before = self._renewed_at
        try:
            self.try_acquire_or_renew()
        except Exception:
            log.exception("lease %s/%s: could not renew", self._namespace, self._name)
        if self.is_leader and self._lapsed(before):
            log.info("lease %s/%s: %s is the leader", self._namespace, self._name, self.identity)
            self._on_started()

    def _lapsed(self, before: float | None) -> bool:
        """Whether `is_leader` may have answered False at some moment since the renewal at
        `before` (None: not leading then). A renewal that took longer than the window (a slow
        API server) ends a leadership as surely as a lost lease: passes that ran meanwhile
        skipped their work, so the leader must start over as a new one would."""
        return before is None or time.monotonic() - before >= self._window

    def _body(self, acquire: str, transitions: int) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, "namespace": self._namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self._duration)),
                "acquireTime": acquire,
                "renewTime": _now(),
                "leaseTransitions": transitions,
            },
        }

    def try_acquire_or_renew(self) -> bool:
        """One round of the protocol; True when this candidate holds the lease afterwards."""
        started = time.monotonic()
        try:
            lease = self._api.read_namespaced_lease(self._name, self._namespace)
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            try:
                self._api.create_namespaced_lease(
                    self._namespace, V1Lease.model_validate(self._body(_now(), 0))
                )
            except ApiException as exc2:
                if exc2.status == CONFLICT:
                    return False
                raise
            self._renewed_at = started
            return True
        spec = lease.spec
        version = lease.metadata.resource_version if lease.metadata else None
        holder = spec.holder_identity if spec else None
        record = (holder, spec.renew_time if spec else None, version)
        if record != self._observed:
            self._observed, self._observed_at = record, started
        transitions = (spec.lease_transitions if spec else None) or 0
        if holder == self.identity:
            acquire = spec.acquire_time if spec and spec.acquire_time else None
            body = self._body(_iso(acquire) or _now(), transitions)
        elif not holder or started - self._observed_at > self._duration:
            body = self._body(_now(), transitions + 1)
        else:
            self._renewed_at = None
            return False
        body["metadata"]["resourceVersion"] = version
        try:
            self._api.replace_namespaced_lease(
                self._name, self._namespace, V1Lease.model_validate(body)
            )
        except ApiException as exc:
            if exc.status == CONFLICT:
                self._renewed_at = None
                return False
            raise
        self._renewed_at = started
        return True

    def release(self) -> None:
        """Give the lease up (if held) so that another candidate need not wait it out."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            lease = self._api.read_namespaced_lease(self._name, self._namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = self._body(_now(), lease.spec.lease_transitions or 0)
            body["spec"]["holderIdentity"] = None
            body["spec"]["leaseDurationSeconds"] = 1
            body["metadata"]["resourceVersion"] = (
                lease.metadata.resource_version if lease.metadata else None
            )
            self._api.replace_namespaced_lease(
                self._name, self._namespace, V1Lease.model_validate(body)
            )
        except ApiException:
            log.warning("lease %s/%s: could not release", self._namespace, self._name)


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime.datetime):
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value) if value else None
