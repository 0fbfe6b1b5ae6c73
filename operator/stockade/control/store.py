"""The operator's in-memory picture of the cluster, with the indexes that selector lookups use.

The kopf handlers write into one `Store` (from kopf's event loop); the reconciler
(`stockade.control.reconciler`) takes from another thread what changed since its last pass. Every
write says whether the model value changed, so that a status-only update (for example the
operator's own status write coming back through the watch) never triggers a new lowering.

The journal: every write that changes a lowering input also records `(table, key) -> new value`
(None: deleted), the last write of a key winning. `take(changes=True)` hands the journal over
(`Changes`) and starts a new one, so the reconciler's work under the lock is in proportion to the
changes, never to the cluster: the handlers never wait for a pass. The lowering
(`stockade.control.worker`) holds a `Mirror`, a Store that applies the journal, and builds its
`Snapshot` there, off this lock. `take(changes=True, full=True)` journals the whole store, for a
lowering that starts from nothing (a restarted worker process).

The Store also remembers when it took in the earliest change to the lowering's inputs that no
pass has taken yet (wall clock, Unix nanoseconds): `snapshot(take_changes=True)` hands it over
with the snapshot, and the publisher stamps it on the program objects of the generation that
carries the change (`stockade.handoff.CHANGED_AT`).

Selector look-ups go through the label indexes of the snapshot's `ClusterState`
(`stockade.model.cluster.ClusterIndex`), built once per snapshot.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from stockade.compiler import ir
from stockade.compiler.membership import PodsChanged
from stockade.control.policies import PolicyKey, PolicyRecord
from stockade.control.services import (
    DEFAULT_NODE_PORT_RANGE,
    ServiceInfo,
    SliceInfo,
    service_backends,
    service_space,
)
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.policy import IPAddress


@dataclass(frozen=True)
class Snapshot:
    """A consistent view for one reconcile."""

    state: ClusterState
    policies: Mapping[PolicyKey, PolicyRecord]
    reports: Mapping[str, Mapping[str, Any]]  # node -> status of its program.0 DatapathTable
    # Service address space (control.services), with the operator's service space on
    service_space: tuple[ir.ServiceEntry, ...] = ()
    # Unix ns when the earliest change this snapshot takes over was taken in (None: none taken)
    changed_at: int | None = None
    # Service -> ready backends from EndpointSlices (control.services): the fallback mode's input
    service_backends: tuple[ir.ServiceBackends, ...] = ()
    # Unix ns of the latest change to the lowering's inputs this snapshot holds (None: none yet)
    latest_change: int | None = None
    # The state of the previous snapshot and the pods changed since, when the `Mirror` knows
    # them: the lowering's membership then looks at those pods only
    pods_changed: PodsChanged | None = None


# The tables the journal names (Store attributes without the underscore)
TABLES = ("namespaces", "nodes", "pods", "policies", "services", "slices", "service_cidrs")


@dataclass(frozen=True)
class Changes:
    """The lowering's inputs that changed since the last take: (table, key) -> the new value, or
    None when it was deleted; with `full`, the whole store (a mirror drops what it held)."""

    entries: Mapping[tuple[str, Any], Any]
    full: bool
    configured_cidrs: tuple[ir.IPNetwork, ...]
    node_port_range: tuple[int, int]
    latest_change: int | None  # Unix ns of the latest change to the inputs the store holds


@dataclass(frozen=True)
class View:
    """What one pass takes under the Store's lock: the policies and agent reports (copies of
    two small tables, for the status reporter) and, for a pass that lowers, the changes."""

    policies: Mapping[PolicyKey, PolicyRecord]
    reports: Mapping[str, Mapping[str, Any]]
    changed_at: int | None = None  # the earliest change this view takes over (None: none)
    latest_change: int | None = None
    changes: Changes | None = None


class Store:
    """Thread-safe; `on_change(tables: bool)` is called after every write that changed
    something (tables=True when the lowering's inputs changed, False for status only)."""

    def __init__(
        self,
        on_change: Callable[[bool], None] = lambda tables: None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._lock = threading.Lock()
        self._on_change = on_change
        self._clock = clock
        self._changed_at: int | None = None  # the earliest change no snapshot has taken yet
        self.latest_change: int | None = None  # Unix ns of the latest change to the inputs
        self.pod_events = 0  # pod watch events taken in (changed or not), for metrics
        self.first_pod_event: int | None = None  # Unix ns of the first one
        self.last_pod_event: int | None = None  # Unix ns of the last one
        self._pods: dict[str, Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._nodes: dict[str, Node] = {}
        self._policies: dict[PolicyKey, PolicyRecord] = {}
        self._reports: dict[str, Mapping[str, Any]] = {}
        self._services: dict[str, ServiceInfo] = {}
        self._service_cidrs: dict[str, tuple[ir.IPNetwork, ...]] = {}
        self._slices: dict[str, SliceInfo] = {}
        self.configured_cidrs: tuple[ir.IPNetwork, ...] = ()  # used while no ServiceCIDR exists
        self.node_port_range = DEFAULT_NODE_PORT_RANGE
        self._journal: dict[tuple[str, Any], Any] = {}  # changes no take has handed over yet
        self._tables: dict[str, dict[Any, Any]] = {t: getattr(self, f"_{t}") for t in TABLES}

    # --- writes ------------------------------------------------------------------------------

    def put_pod(self, key: str, pod: Pod | None) -> None:
        """Set (or with None, remove) the pod stored under `namespace/name`."""
        with self._lock:
            old = self._pods.get(key)
            if old == pod:
                return
            if pod is None:
                del self._pods[key]
            else:
                self._pods[key] = pod
            self._mark("pods", key, pod)
        self._on_change(True)

    def took_pod_event(self) -> None:
        """Count a pod watch event (the handler calls it; the priming list does not)."""
        now = self._clock()
        with self._lock:
            self.pod_events += 1
            self.last_pod_event = now
            if self.first_pod_event is None:
                self.first_pod_event = now

    def put_namespace(self, name: str, namespace: Namespace | None) -> None:
        with self._lock:
            old = self._namespaces.get(name)
            if old == namespace:
                return
            if namespace is None:
                del self._namespaces[name]
            else:
                self._namespaces[name] = namespace
            self._mark("namespaces", name, namespace)
        self._on_change(True)

    def put_node(self, name: str, node: Node | None) -> None:
        with self._lock:
            if self._nodes.get(name) == node:
                return
            if node is None:
                del self._nodes[name]
            else:
                self._nodes[name] = node
            self._mark("nodes", name, node)
        self._on_change(True)

    def put_service(self, key: str, info: ServiceInfo | None) -> None:
        self._put("services", key, info)

    def put_endpoint_slice(self, key: str, info: SliceInfo | None) -> None:
        self._put("slices", key, info)

    def put_service_cidr(self, name: str, cidrs: tuple[ir.IPNetwork, ...] | None) -> None:
        self._put("service_cidrs", name, cidrs)

    def _put(self, name: str, key: str, value: object | None) -> None:
        table = self._tables[name]
        with self._lock:
            if table.get(key) == value:
                return
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
            self._mark(name, key, value)
        self._on_change(True)

    def put_policy(self, key: PolicyKey, record: PolicyRecord | None) -> None:
        with self._lock:
            old = self._policies.get(key)
            if old == record:
                return
            if record is None:
                del self._policies[key]
            else:
                self._policies[key] = record
            content = old is None or record is None or not old.same_content(record)
            if content:  # a status-only change is not journaled: the lowering never reads it
                self._mark("policies", key, record)
        self._on_change(content)

    def _mark(self, table: str, key: Any, value: object | None) -> None:
        """A change to the lowering's inputs was taken in now (called under the lock)."""
        self._journal[(table, key)] = value
        self.latest_change = self._clock()
        if self._changed_at is None:
            self._changed_at = self.latest_change

    def put_report(self, node: str, status: Mapping[str, Any] | None) -> None:
        """The agent report of `node` (the status of its program.0 DatapathTable)."""
        with self._lock:
            if self._reports.get(node) == status:
                return
            if status is None:
                self._reports.pop(node, None)
            else:
                self._reports[node] = dict(status)
        self._on_change(False)

    # --- reads -------------------------------------------------------------------------------

    def policy(self, key: PolicyKey) -> PolicyRecord | None:
        with self._lock:
            return self._policies.get(key)

    def take(self, changes: bool = False, full: bool = False) -> View:
        """The policies and reports; with `changes`, also the journal, which starts anew, and
        the earliest change not taken yet (`View.changed_at`), which the next take no longer
        reports. With `full` the journal handed over holds the whole store. Without `full` the
        time under the lock is two small copies and a swap: no pod is looked at."""
        with self._lock:
            taken = None
            changed_at = self._changed_at if changes else None
            if changes:
                self._changed_at = None
                entries = self._journal
                self._journal = {}
                if full:
                    entries = {(t, k): v for t in TABLES for k, v in self._tables[t].items()}
                taken = Changes(
                    entries,
                    full,
                    self.configured_cidrs,
                    self.node_port_range,
                    self.latest_change,
                )
            return View(
                policies=MappingProxyType(dict(self._policies)),
                reports=MappingProxyType(dict(self._reports)),
                changed_at=changed_at,
                latest_change=self.latest_change,
                changes=taken,
            )

    def snapshot(self, take_changes: bool = False) -> Snapshot:
        """A consistent view, built under the lock (O(cluster): the `Mirror` builds the
        lowering's, off the Store's lock); with `take_changes`, it also takes over the earliest
        change not taken yet (`Snapshot.changed_at`), which the next such snapshot no longer
        reports."""
        with self._lock:
            return self._snapshot(take_changes)

    def _snapshot(self, take_changes: bool) -> Snapshot:
        """`snapshot()`'s work, under the lock."""
        changed_at = self._changed_at if take_changes else None
        if take_changes:
            self._changed_at = None
        return Snapshot(
            state=self._state(),
            policies=MappingProxyType(dict(self._policies)),
            reports=MappingProxyType(dict(self._reports)),
            service_space=service_space(
                [c for cs in self._service_cidrs.values() for c in cs] or self.configured_cidrs,
                self._services.values(),
                [ip for node in self._nodes.values() for ip in node.ips],
                self.node_port_range,
            ),
            changed_at=changed_at,
            latest_change=self.latest_change,
            service_backends=service_backends(
                self._services,
                self._slices.values(),
                [ip for node in self._nodes.values() for ip in node.ips],
            ),
        )

    def _state(self) -> ClusterState:
        """The cluster as policy sees it (under the lock): O(pods)."""
        return ClusterState(
            self._namespaces.values(), _unique_addresses(self._pods.values()), self._nodes.values()
        )


def _unique_addresses(pods: Iterable[Pod]) -> list[Pod]:
    """Pods sorted by key; a pod whose address another pod still holds (a reused address whose
    old pod's deletion has not arrived yet) is left out until the conflict resolves."""
    seen: set[IPAddress] = set()
    out = []
    for pod in sorted(pods, key=lambda p: p.key):
        if not pod.host_network:
            if seen.intersection(pod.ips):
                continue
            seen.update(pod.ips)
        out.append(pod)
    return out


class Mirror(Store):
    """The lowering's copy of a Store, kept current from its journal (`apply`); its
    `snapshot()` is the Store's at the moment of the take.

    A pass follows one change, so the Mirror keeps what the cluster state needs of every pod
    from change to change instead of building it again: the pods in key order and the address
    index. While no address has two holders (a reused address whose old pod's deletion has not
    arrived yet) its state is the Store's without sorting or hashing every pod; with one, it is
    built as the Store builds it."""

    def __init__(self) -> None:
        super().__init__()
        self._order: list[str] = []  # every pod's key, sorted
        self._holders: dict[IPAddress, set[str]] = {}  # non-host-network pods' addresses
        self._shared: set[IPAddress] = set()  # addresses with more than one holder
        self._by_ip: dict[IPAddress, Pod] = {}  # each address's holder (its last, when shared)
        # The last snapshot's state, when it held every pod (no address shared), and the pods
        # changed since (key -> the pod now, None: gone)
        self._previous: ClusterState | None = None
        self._since: dict[str, Pod | None] = {}

    def _forget(self, pod: Pod) -> None:
        del self._order[bisect.bisect_left(self._order, pod.key)]
        if pod.host_network:
            return
        for ip in pod.ips:
            holders = self._holders[ip]
            holders.discard(pod.key)
            if not holders:
                del self._holders[ip]
                del self._by_ip[ip]
            elif len(holders) == 1:
                self._shared.discard(ip)
                self._by_ip[ip] = self._pods[next(iter(holders))]

    def _hold(self, pod: Pod) -> None:
        bisect.insort(self._order, pod.key)
        if pod.host_network:
            return
        for ip in pod.ips:
            holders = self._holders.setdefault(ip, set())
            holders.add(pod.key)
            if len(holders) > 1:
                self._shared.add(ip)
            self._by_ip[ip] = pod

    def _state(self) -> ClusterState:
        if self._shared:
            return super()._state()
        pods = self._pods
        return ClusterState.indexed(
            self._namespaces.values(),
            tuple(pods[k] for k in self._order),
            self._nodes.values(),
            dict(self._by_ip),
        )

    def snapshot(self, take_changes: bool = False) -> Snapshot:
        """The Store's snapshot, with the pods changed since the previous one when both states
        hold every pod (built without leaving out a pod whose address another still holds)."""
        with self._lock:
            snap = self._snapshot(take_changes)
            whole = not self._shared
            previous, since = self._previous, self._since
            self._previous, self._since = (snap.state if whole else None), {}
        if whole and previous is not None:
            return replace(snap, pods_changed=(previous, since))
        return snap

    def apply(self, changes: Changes) -> None:
        with self._lock:
            if changes.full:
                self._previous, self._since = None, {}
                for table in self._tables.values():
                    table.clear()
                self._order.clear()
                self._holders.clear()
                self._shared.clear()
                self._by_ip.clear()
            for (name, key), value in changes.entries.items():
                table = self._tables[name]
                if name == "pods":
                    self._since[key] = value
                    old = table.get(key)
                    if old is not None:
                        del table[key]
                        self._forget(old)
                    if value is not None:
                        table[key] = value
                        self._hold(value)
                    continue
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            self.configured_cidrs = changes.configured_cidrs
            self.node_port_range = changes.node_port_range
            self.latest_change = changes.latest_change
