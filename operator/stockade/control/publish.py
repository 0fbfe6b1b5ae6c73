"""Write DatapathTables to the API server, remembering what is there and which generation each
node's program object carries.

The reconciler calls `resync()` when it becomes leader (and now and then), `plan(desired)` and
`apply(plan)` after every lowering. The objects of one publish, table shards and program objects
alike, are written concurrently: a change is seldom one object, and each write is a round trip to
the API server, so a second wave for the program objects would add one to every change. Order is not
needed for safety: an agent applies a set only when every shard its program object's manifest lists
is there with the manifest's digest (`stockade.handoff.assemble`), so a manifest that arrives before
its shards, or whose shard the server refused, leaves the agent on the set it applied last until the
rest arrives. Stale shards are deleted last, after every write succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from stockade import handoff
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


class Publisher:
    """Owns the DatapathTables on the API server and the publish generations; `writes` and
    `deletes` count API calls."""

    def __init__(self, api: ApiClient) -> None:
        self._objects = CustomObjectsApi(api)
        self.published: dict[str, TableHead] = {}
        self.generation = 0  # the latest publish generation
        self.generations: dict[str, int] = {}  # node -> its current program generation
        self.writes = 0
        self.deletes = 0
        self._lock = threading.Lock()  # writes run on several threads at once

    def resync(self) -> int:
        """List every DatapathTable and take the generations from them; returns the highest
        generation found (0 if none)."""
        listed = self._objects.list_cluster_custom_object(
            GROUP, VERSION, DATAPATH_TABLE.plural, label_selector=handoff.PART_LABEL
        )
        found = {}
        items = listed.get("items", []) if isinstance(listed, dict) else []
        for item in items:
            try:
                record = TableObject.from_api(item).head()
            except HandoffError as exc:
                log.warning("ignoring a DatapathTable that is not ours: %s", exc)
                continue
            found[record.name] = record
        self.published = found
        highest = max((r.generation for r in found.values()), default=0)
        self.generation = max(self.generation, highest)
        self.generations = {
            r.node: r.generation for r in found.values() if r.part == handoff.PROGRAM
        }
        return highest

    def plan(self, desired: Mapping[str, NodeParts]) -> Plan:
        """What to write so that the server holds `desired`, at the next generation."""
        return plan_changes(self.published, desired, self.generation + 1)

    def forget(self, name: str) -> None:
        """Someone else deleted `name`: the next plan writes it again."""
        self.published.pop(name, None)

    def apply(self, plan: Plan) -> None:
        """Write `plan`: every changed object at once (at most MAX_CONCURRENT_WRITES in flight),
        the deletes after every write succeeded. Raises the first failure once nothing is in
        flight; what failed is not recorded as published, so the next plan writes it again.
        Once everything succeeded, the nodes' generations are the plan's."""
        began = time.monotonic()
        self.generation = max([self.generation, *(w.generation for w in plan.writes)])
        results = run_all(self._write, plan.writes, "stockade-publish")
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        for name in plan.deletes:
            try:
                self._objects.delete_cluster_custom_object(
                    GROUP, VERSION, DATAPATH_TABLE.plural, name
                )
            except ApiException as exc:
                if exc.status != NOT_FOUND:
                    raise
            self.deletes += 1
            self.published.pop(name, None)
        self.generations = dict(plan.generations)
        if plan.writes or plan.deletes:
            log.debug(
                "published %d objects, deleted %d in %.1f ms",
                len(plan.writes),
                len(plan.deletes),
                (time.monotonic() - began) * 1e3,
            )

    def _write(self, table: TableObject) -> None:
        name, obj = table.name, table.body()
        plural = DATAPATH_TABLE.plural
        if name in self.published:
            try:
                self._objects.patch_cluster_custom_object(
                    GROUP,
                    VERSION,
                    plural,
                    name,
                    {"metadata": obj["metadata"], "spec": obj["spec"]},
                    _content_type=MERGE_PATCH,
                )
            except ApiException as exc:
                if exc.status != NOT_FOUND:
                    raise
                self._objects.create_cluster_custom_object(GROUP, VERSION, plural, obj)
        else:
            try:
                self._objects.create_cluster_custom_object(GROUP, VERSION, plural, obj)
            except ApiException as exc:
                if exc.status != CONFLICT:
                    raise
                self._objects.patch_cluster_custom_object(
                    GROUP,
                    VERSION,
                    plural,
                    name,
                    {"metadata": obj["metadata"], "spec": obj["spec"]},
                    _content_type=MERGE_PATCH,
                )
        with self._lock:
            self.writes += 1
            self.published[name] = table.head()
