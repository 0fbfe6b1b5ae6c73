"""Write DatapathTables to the API server, remembering what is there.

The reconciler calls `resync()` when it becomes leader (and now and then), `apply(plan)` after
every lowering. Table shards are written before the program objects whose manifests list them,
and stale shards are deleted last, so an agent never sees a manifest that names missing content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from stockade.compiler import handoff
from stockade.control.plan import Plan, Published
from stockade.model.crd import DATAPATH_TABLE
from stockade.model.crd_schema import GROUP, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
NOT_FOUND = 404
CONFLICT = 409


def published_from(obj: Mapping[str, Any]) -> Published | None:
    """What a listed or watched DatapathTable says about itself, or None if it is not ours."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    try:
        return Published(
            name=str(meta["name"]),
            node=str(spec["node"]),
            part=str(spec["part"]),
            shard=int(spec["shard"]),
            digest=str(spec.get("digest", "")),
            generation=int(spec.get("generation", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None


class Publisher:
    """Owns the DatapathTables on the API server; `writes` and `deletes` count API calls."""

    def __init__(self, api: ApiClient) -> None:
        self._objects = CustomObjectsApi(api)
        self.published: dict[str, Published] = {}
        self.writes = 0
        self.deletes = 0

    def resync(self) -> int:
        """List every DatapathTable; returns the highest generation found (0 if none)."""
        listed = self._objects.list_cluster_custom_object(
            GROUP, VERSION, DATAPATH_TABLE.plural, label_selector=handoff.PART_LABEL
        )
        found = {}
        items = listed.get("items", []) if isinstance(listed, dict) else []
        for item in items:
            record = published_from(item)
            if record is not None:
                found[record.name] = record
        self.published = found
        return max((r.generation for r in found.values()), default=0)

    def forget(self, name: str) -> None:
        """Someone else deleted `name`: the next plan writes it again."""
        self.published.pop(name, None)

    def apply(self, plan: Plan) -> None:
        for obj in plan.writes:
            self._write(obj)
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

    def _write(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
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
        self.writes += 1
        record = published_from(obj)
        assert record is not None
        self.published[name] = record
