"""Watch the node's DatapathTables (label `stockade.io/node=<node>`) into an in-memory cache.

`stockade.agent.app` starts one `TableWatch`; every change of an object's spec calls
`on_change()` (which only requests a sync). The loop is list-then-watch with resourceVersion
bookkeeping: it lists, watches from the list's resourceVersion (with bookmarks), follows every
event's resourceVersion, and lists again when the server answers 410 Gone. When the API server is
unreachable the cache keeps the last state (the datapath keeps enforcing it) and the loop retries
with backoff. Status-only updates (the agent's own report) do not count as changes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from stockade import handoff
from stockade.handoff import HandoffError, TableObject
from stockade.model.crd import DATAPATH_TABLE
from stockade.model.crd_schema import GROUP, VERSION

log = logging.getLogger(__name__)

GONE = 410


class TableWatch:
    """Holds the latest spec of every DatapathTable of one node; thread-safe reads."""

    def __init__(
        self,
        api: ApiClient,
        node: str,
        on_change: Callable[[], None],
        *,
        timeout_seconds: int = 240,
        max_backoff: float = 10.0,
    ) -> None:
        self._objects_api = CustomObjectsApi(api)
        self.node = node
        self.selector = handoff.node_selector(node)
        self._on_change = on_change
        self._timeout = timeout_seconds
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._objects: dict[str, TableObject] = {}
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._loop, name="stockade-agent-watch", daemon=True)
        self.resource_version = ""
        self.synced = threading.Event()  # set after the first successful list
        self.lists = 0
        self.events = 0
        self.errors = 0
        self.connected = False
        self.invalid: dict[str, str] = {}  # object name -> why it could not be read

    # --- reads -------------------------------------------------------------------------------

    def snapshot(self) -> Mapping[str, TableObject]:
        with self._lock:
            return MappingProxyType(dict(self._objects))

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # type: ignore[no-untyped-call]
        self._thread.join(timeout=self._timeout + 15)

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._list()
                self._watch_once()
                backoff = 0.2
            except ApiException as exc:
                if exc.status == GONE:
                    log.info("watch of %s expired (410 Gone): listing again", self.selector)
                    self.resource_version = ""
                    continue
                self._failed(exc, backoff)
                backoff = min(self._max_backoff, backoff * 2)
            except Exception as exc:  # the API server is down or the connection broke
                self._failed(exc, backoff)
                backoff = min(self._max_backoff, backoff * 2)

    def _failed(self, exc: Exception, backoff: float) -> None:
        self.errors += 1
        self.connected = False
        if not self._stop.is_set():
            log.warning("watch of %s failed (retry in %.1fs): %s", self.selector, backoff, exc)
            self._stop.wait(backoff)

    def _list(self) -> None:
        listed: Any = self._objects_api.list_cluster_custom_object(
            GROUP,
            VERSION,
            DATAPATH_TABLE.plural,
            label_selector=self.selector,
            _request_timeout=(5, 30),
        )
        found: dict[str, TableObject] = {}
        invalid: dict[str, str] = {}
        for item in listed.get("items", []):
            self._parse(item, found, invalid)
        with self._lock:
            changed = found != self._objects
            self._objects = found
            self.invalid = invalid
        self.resource_version = str(listed.get("metadata", {}).get("resourceVersion", ""))
        self.lists += 1
        self.connected = True
        self.synced.set()
        if changed or self.lists == 1:
            self._on_change()

    @staticmethod
    def _parse(
        item: Mapping[str, Any], into: dict[str, TableObject], invalid: dict[str, str]
    ) -> None:
        name = str((item.get("metadata") or {}).get("name", ""))
        try:
            into[name] = TableObject.from_api(item)
            invalid.pop(name, None)
        except HandoffError as exc:
            into.pop(name, None)
            invalid[name] = str(exc)

    def _watch_once(self) -> None:
        watch = Watch()  # type: ignore[no-untyped-call]
        self._watch = watch
        try:
            for event in watch.stream(  # type: ignore[no-untyped-call]
                self._objects_api.list_cluster_custom_object,
                GROUP,
                VERSION,
                DATAPATH_TABLE.plural,
                label_selector=self.selector,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._timeout,
                _request_timeout=(5, self._timeout + 10),
            ):
                self.connected = True
                self._handle(event)
                if self._stop.is_set():
                    break
        finally:
            self._watch = None
            if watch.resource_version:
                self.resource_version = str(watch.resource_version)

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or {}
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if kind == "BOOKMARK":
            return
        self.events += 1
        name = str((obj.get("metadata") or {}).get("name", ""))
        with self._lock:
            before = self._objects.get(name)
            objects = dict(self._objects)
            if kind == "DELETED":
                objects.pop(name, None)
                self.invalid.pop(name, None)
            else:
                self._parse(obj, objects, self.invalid)
            after = objects.get(name)
            self._objects = objects
        if before != after:
            self._on_change()

    def wait_synced(self, timeout: float) -> bool:
        return self.synced.wait(timeout)
