"""Write DatapathTables to the API server, remembering what is there and which generation each
node's program object carries.

The reconciler calls `resync()` when it becomes leader (and now and then), `plan(desired)` and
`apply(plan)` after every lowering. The objects of one publish, table shards and program objects
alike, are written concurrently: a change is seldom one object, and each write is a round trip to
the API server, so a second wave for the program objects would add one to every change. Order is not
needed for safety: an agent applies a set only when every shard its program object's manifest lists
is there with the manifest's digest (`stockade.handoff.assemble`), so a manifest that arrives before
its shards, or whose shard the server refused, leaves the agent on the set it applied last until the
rest arrives. Stale shards are deleted last, for the nodes all of whose writes succeeded: one
object the server refuses (too large, invalid) holds back its own node only, never the other
nodes' generations or the policy statuses (`stockade.control.reconciler`).

Fencing: a replica that lost the lease must not write over the new leader. The publisher asks
`is_leader()` before each wave (the writes, then the deletes), and every write of an object it
knows carries the resourceVersion it last saw (its own write's, the listing's, or a watched
status write's, `stockade.control.drift.Stamp`), so a write planned on a view the new leader has
since changed is refused by the server (409) instead of landing. A refused object is forgotten
and the next pass lists the tables again (`stale`); only when the server's copy differs from ours
in nothing but its status (the agent reported meanwhile) is the write retried at once, with the
new resourceVersion. Drift: `observe()` is given every watched DatapathTable and forgets one that
no longer holds what was published, so that the next plan writes it back; `resync()` forgets
those whose entries do not match their digest.

Change time: `plan(desired, changed_at)` stamps each program object written at the new
generation with when the earliest change it carries was taken in (`handoff.CHANGED_AT`, from
`stockade.control.store`); a node whose write failed keeps its stamp for the generation that
retries it, so its agent measures from the change, not from the retry. A program object written
without a stamp (restored, or no change taken in) has the annotation removed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kubernetes.client import ApiClient, CustomObjectsApi, V1DeleteOptions, V1Preconditions
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.control.drift import Stamp, drifted, holds, labelled
from stockade.control.plan import NodeParts, Plan
from stockade.control.plan import plan as plan_changes
from stockade.handoff import HandoffError, TableHead, TableObject
from stockade.model.crd import DATAPATH_TABLE
from stockade.model.crd_schema import GROUP, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
NOT_FOUND = 404
CONFLICT = 409
MAX_CONCURRENT_WRITES = 8  # API calls in flight at once during one publish


T = TypeVar("T")


def run_all(
    call: Callable[[T], object], items: Sequence[T], name: str
) -> list[object | BaseException]:
    """`call(item)` for every item, at most MAX_CONCURRENT_WRITES at once in threads called
    `name` (a single item runs in this thread); each item's result or exception, in order, once
    all have finished. The publisher's and the status writes use it."""
    if len(items) <= 1:
        out: list[object | BaseException] = []
        for item in items:
            try:
                out.append(call(item))
            except Exception as exc:
                out.append(exc)
        return out
    workers = min(MAX_CONCURRENT_WRITES, len(items))
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        futures = [pool.submit(call, item) for item in items]
    return [f.exception() or f.result() for f in futures]


class NotLeaderError(Exception):
    """This replica no longer leads: nothing of the wave was written."""


class WriteConflictError(Exception):
    """The server refused writes planned on a view that someone else has since changed (409);
    those objects are forgotten and the next pass lists the tables again."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(f"{len(names)} DatapathTables changed by someone else: {', '.join(names)}")
        self.names = tuple(names)


@dataclass(frozen=True)
class _Refused:
    """One write refused by its precondition (inside `apply`)."""

    name: str


class Publisher:
    """Owns the DatapathTables on the API server and the publish generations; `writes`,
    `deletes` and `conflicts` count API calls (a conflict is a write the server refused)."""

    def __init__(self, api: ApiClient, *, is_leader: Callable[[], bool] = lambda: True) -> None:
        self._objects = CustomObjectsApi(api)
        self._is_leader = is_leader
        self.published: dict[str, TableHead] = {}
        self.stamps: dict[str, Stamp] = {}  # name -> the version last seen of what we published
        self.stale = False  # a write was refused: list again before the next plan
        self.generation = 0  # the latest publish generation
        self.generations: dict[str, int] = {}  # node -> its current program generation
        self.writes = 0
        self.deletes = 0
        self.conflicts = 0
        self.held: dict[str, int] = {}  # node -> change time of a program write that failed
        # Writes and deletes under way: a watch event of one can arrive before its answer
        # (`observe`, `observe_deleted`)
        self._writing: dict[str, TableHead] = {}
        self._deleting: set[str] = set()
        self._spoiled: set[str] = set()  # written, but changed by someone else meanwhile
        self._lock = threading.Lock()  # writes run on several threads at once

    def resync(self) -> int:
        """List every DatapathTable and take the generations from them; returns the highest
        generation found (0 if none). An object whose entries do not hash to its digest, or that
        lacks its labels, is not taken as published, so the next plan writes it again."""
        listed = self._objects.list_cluster_custom_object(
            GROUP, VERSION, DATAPATH_TABLE.plural, label_selector=handoff.PART_LABEL
        )
        found, stamps = {}, {}
        items = listed.get("items", []) if isinstance(listed, dict) else []
        for item in items:
            try:
                table = TableObject.from_api(item)
            except HandoffError as exc:
                log.warning("ignoring a DatapathTable that is not ours: %s", exc)
                continue
            record = table.head()
            stamp = Stamp.from_api(item)
            if stamp is not None:
                stamps[record.name] = stamp
            if table.content_digest != table.digest or not labelled(record, item):
                log.warning("DatapathTable %s does not match its digest: rewriting it", record.name)
                continue
            found[record.name] = record
        with self._lock:
            self.published, self.stamps, self.stale = found, stamps, False
        highest = max((r.generation for r in found.values()), default=0)
        self.generation = max(self.generation, highest)
        self.generations = {
            r.node: r.generation for r in found.values() if r.part == handoff.PROGRAM
        }
        return highest

    def plan(self, desired: Mapping[str, NodeParts], changed_at: int | None = None) -> Plan:
        """What to write so that the server holds `desired`, at the next generation, stamped
        with `changed_at` (`stamp`)."""
        return self.stamp(plan_changes(self.published, desired, self.generation + 1), changed_at)

    def stamp(self, planned: Plan, changed_at: int | None) -> Plan:
        """`planned` with each program object (always one of a new generation: its manifest
        changed) carrying `changed_at` (Unix ns), or the earlier time held for its node since
        its write failed."""
        writes = []
        for table in planned.writes:
            stamped = table
            if table.part == handoff.PROGRAM:
                times = [t for t in (changed_at, self.held.get(table.node)) if t is not None]
                stamped = replace(table, changed_at=min(times, default=None))
            writes.append(stamped)
        return replace(planned, writes=tuple(writes))

    def forget(self, name: str) -> None:
        """Someone else deleted `name`: the next plan writes it again."""
        with self._lock:
            self.published.pop(name, None)
            self.stamps.pop(name, None)

    def observe(self, obj: Mapping[str, Any]) -> bool:
        """A watched DatapathTable (kopf's event, no round trip): True when it is one we
        published and it no longer holds what we published. It is then forgotten, its version
        kept, so that the next plan writes it back over exactly that version. Our own writes,
        late events of them and the agent's status writes are not drift; a status write's
        version is kept for the next write's precondition."""
        name = str((obj.get("metadata") or {}).get("name", ""))
        seen = Stamp.from_api(obj)
        with self._lock:
            writing = self._writing.get(name)
        # The server sends a write's watch event as soon as it stores it, often before this
        # process has read the write's answer: the object then holds the head being written,
        # which `published` does not know yet. Neither that event nor the agent's status
        # write over it is drift; the write's answer records what was published.
        if writing is not None and holds(writing, obj):
            return False
        with self._lock:
            have = self.published.get(name)
            if have is None:
                return False
            stamp = self.stamps.get(name)
            if drifted(have, stamp, obj):
                del self.published[name]
                if seen is not None:
                    self.stamps[name] = seen
                if name in self._writing:
                    self._spoiled.add(name)  # changed after our write: its answer is stale
                return True
            if seen is not None and (
                stamp is None or not stamp.covers(seen) or seen.generation == stamp.generation
            ):
                self.stamps[name] = seen  # what we published, at its latest version
            return False

    def observe_deleted(self, name: str) -> bool:
        """A watched DatapathTable was deleted: True when it was one we published and not one
        we are deleting (its event can arrive before the delete's answer); it is forgotten, so
        that the next plan writes it again."""
        with self._lock:
            if name in self._deleting:
                return False
            known = name in self.published
        self.forget(name)
        return known

    def apply(self, plan: Plan, partial: bool = False) -> None:
        """Write `plan`: every changed object at once (at most MAX_CONCURRENT_WRITES in flight),
        then the deletes of the nodes all of whose writes succeeded, each wave only while
        `is_leader()` (else NotLeaderError). Raises the first failure once nothing is in flight;
        what failed is not recorded as published, so the next plan writes it again, and refused
        writes raise WriteConflictError. A failed object holds back only its own node: every
        node whose writes succeeded takes the plan's generation, the others keep theirs. A
        `partial` plan names some nodes only (a long pass's early writes): the nodes it does
        not name keep their generations."""
        began = time.monotonic()
        if plan.writes:
            self._check_leader()
        self.generation = max([self.generation, *(w.generation for w in plan.writes)])
        results = run_all(self._write, plan.writes, "stockade-publish")
        # A node one of whose objects failed keeps its generation and its stale shards (its
        # agent may still read them); every other node goes on.
        failed = {w.node for w, r in zip(plan.writes, results, strict=True) if r is not None}
        for table in plan.writes:
            if table.part == handoff.PROGRAM and table.changed_at is not None:
                if table.node in failed:
                    self.held[table.node] = table.changed_at
                else:
                    self.held.pop(table.node, None)
        generations = {
            node: self.generations.get(node, 0) if node in failed else generation
            for node, generation in plan.generations.items()
        }
        if partial:  # some nodes only: the others keep theirs
            self.generations = {**self.generations, **generations}
        else:
            self.generations = generations
        deletes = [n for n in plan.deletes if self._node_of(n) not in failed]
        if deletes:
            self._check_leader()
        self._settle([*results, *(self._delete(name) for name in deletes)])
        if plan.writes or plan.deletes:
            log.debug(
                "published %d objects, deleted %d in %.1f ms",
                len(plan.writes),
                len(plan.deletes),
                (time.monotonic() - began) * 1e3,
            )

    def _node_of(self, name: str) -> str | None:
        with self._lock:
            head = self.published.get(name)
        return head.node if head is not None else None

    def _check_leader(self) -> None:
        if not self._is_leader():
            raise NotLeaderError("no longer the leader: the wave was not written")

    def _settle(self, results: Sequence[object]) -> None:
        """Forget the refused objects of one wave and raise its first failure."""
        refused = [r.name for r in results if isinstance(r, _Refused)]
        for name in refused:
            self.forget(name)
        if refused:
            with self._lock:
                self.conflicts += len(refused)
                self.stale = True
        errors = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, _Refused)
        ]
        if errors:
            raise errors[0]
        if refused:
            raise WriteConflictError(refused)

    def _delete(self, name: str) -> _Refused | None:
        """Delete `name` on the precondition that it is the version we know."""
        with self._lock:
            self._deleting.add(name)
        try:
            return self._delete_known(name)
        finally:
            with self._lock:
                self._deleting.discard(name)

    def _delete_known(self, name: str) -> _Refused | None:
        stamp = self.stamps.get(name)
        try:
            self._delete_at(name, stamp)
        except ApiException as exc:
            if exc.status == CONFLICT and stamp is not None:
                fresh = self._status_only(name, stamp)
                if fresh is None:
                    return _Refused(name)
                try:
                    self._delete_at(name, fresh)
                except ApiException as again:
                    if again.status == CONFLICT:
                        return _Refused(name)
                    if again.status != NOT_FOUND:
                        raise
            elif exc.status != NOT_FOUND:
                raise
        self.deletes += 1
        self.forget(name)
        return None

    def _delete_at(self, name: str, stamp: Stamp | None) -> None:
        options = None
        if stamp is not None:
            options = V1DeleteOptions(
                preconditions=V1Preconditions(uid=stamp.uid, resource_version=stamp.version)
            )
        self._objects.delete_cluster_custom_object(
            GROUP, VERSION, DATAPATH_TABLE.plural, name, body=options
        )

    def _status_only(self, name: str, stamp: Stamp) -> Stamp | None:
        """After a refused write: the server's version when it differs from `stamp` in its status
        only (the agent reported meanwhile), checked that we still lead; None when someone else
        changed the spec, or the object is gone."""
        try:
            current = Stamp.from_api(self._get(name))
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            return None
        if current is None or current.uid != stamp.uid or current.generation != stamp.generation:
            return None
        self._check_leader()
        return current

    def _get(self, name: str) -> Mapping[str, Any]:
        got = self._objects.get_cluster_custom_object(GROUP, VERSION, DATAPATH_TABLE.plural, name)
        return got if isinstance(got, Mapping) else {}

    def _patch(self, table: TableObject, stamp: Stamp) -> object:
        obj = table.body()
        # A merge patch keeps what it does not name: name the change time, to remove an old one.
        annotations = {handoff.CHANGED_AT: table.annotations().get(handoff.CHANGED_AT)}
        metadata = {**obj["metadata"], "annotations": annotations, "resourceVersion": stamp.version}
        return self._objects.patch_cluster_custom_object(
            GROUP,
            VERSION,
            DATAPATH_TABLE.plural,
            table.name,
            {"metadata": metadata, "spec": obj["spec"]},
            _content_type=MERGE_PATCH,
        )

    def _create(self, table: TableObject) -> object:
        return self._objects.create_cluster_custom_object(
            GROUP, VERSION, DATAPATH_TABLE.plural, table.body()
        )

    def _write(self, table: TableObject) -> _Refused | None:
        """Create `table`, or patch it over the version we know (one that exists but that we
        do not know is read first, and patched over what is there)."""
        with self._lock:
            self._writing[table.name] = table.head()
        try:
            return self._write_known(table)
        finally:
            with self._lock:
                self._writing.pop(table.name, None)
                self._spoiled.discard(table.name)

    def _write_known(self, table: TableObject) -> _Refused | None:
        name = table.name
        stamp = self.stamps.get(name)
        if stamp is None:
            try:
                stored = self._create(table)
            except ApiException as exc:
                if exc.status != CONFLICT:
                    raise
                stamp = Stamp.from_api(self._get(name))
                if stamp is None:
                    return _Refused(name)
        if stamp is not None:
            try:
                stored = self._patch(table, stamp)
            except ApiException as exc:
                if exc.status == NOT_FOUND:
                    stored = self._create(table)  # deleted meanwhile
                elif exc.status != CONFLICT:
                    raise
                else:
                    fresh = self._status_only(name, stamp)
                    if fresh is None:
                        return _Refused(name)
                    try:
                        stored = self._patch(table, fresh)
                    except ApiException as again:
                        if again.status != CONFLICT:
                            raise
                        return _Refused(name)
        written = Stamp.from_api(stored) if isinstance(stored, Mapping) else None
        with self._lock:
            self.writes += 1
            if name in self._spoiled:
                return None  # forgotten by `observe`: the next plan writes it again
            self.published[name] = table.head()
            if written is not None:
                self.stamps[name] = written
            else:
                self.stamps.pop(name, None)
        return None
