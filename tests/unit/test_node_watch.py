"""The kubelet stand-in's pod watch: it lists the node's pods by field selector, watches from the
list's resourceVersion (and from the latest one it saw after a watch times out), and lists again
when the watch has expired (410 Gone)."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from stockade.sandbox.node.kubelet import watch_pods


def _pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": version}}


class FakeCore:
    def __init__(self) -> None:
        self.lists: list[str] = []
        self.versions = iter(["10", "20"])

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        self.lists.append(kwargs["field_selector"])
        version = next(self.versions)

        class Response:
            data = json.dumps(
                {"items": [_pod("a", version)], "metadata": {"resourceVersion": version}}
            )

        return Response()


class FakeWatch:
    """Round 1: one event, then the watch times out; round 2: 410 Gone; round 3 (after the
    second list): one event, then stop."""

    def __init__(self, stop: threading.Event, calls: list[str]) -> None:
        self.stop_event, self.calls = stop, calls

    def stream(self, _func: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        assert kwargs["field_selector"] == "spec.nodeName=node-1"
        self.calls.append(kwargs["resource_version"])
        n = len(self.calls)
        if n == 1:
            yield {"type": "ADDED", "raw_object": _pod("b", "11")}
        elif n == 2:
            raise ApiException(status=410, reason="Gone")
        else:
            yield {"type": "DELETED", "raw_object": _pod("a", "21")}
            self.stop_event.set()

    def stop(self) -> None:
        pass


def test_the_watch_resumes_from_the_last_version_and_lists_again_when_expired() -> None:
    core, stop, calls = FakeCore(), threading.Event(), []
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    watch_pods(core, "node-1", events, stop, lambda: FakeWatch(stop, calls))
    got = []
    while not events.empty():
        kind, obj = events.get()
        got.append(
            (
                kind,
                [p["metadata"]["name"] for p in obj] if kind == "LIST" else obj["metadata"]["name"],
            )
        )
    assert got == [("LIST", ["a"]), ("ADDED", "b"), ("LIST", ["a"]), ("DELETED", "a")]
    assert core.lists == ["spec.nodeName=node-1", "spec.nodeName=node-1"]
    assert calls == ["10", "11", "20"]
