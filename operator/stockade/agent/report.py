"""What the agent tells the API server: the status of its `<node>.program.0` DatapathTable (the
one object per node the operator aggregates policy status from), Events on Pods whose
programs could not be attached, and an Event on the program object when a published set is
refused.

`stockade.agent.sync` calls `Reporter.report()` after every sync and `pod_failures()` with the
attach failures; a status equal to the last one written is not written again, and an Event is
posted once per (pod address, reason, message).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping

from kubernetes.client import ApiClient, CoreV1Api, CoreV1Event, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.agent.attachments import Failure
from stockade.handoff import Report
from stockade.model.crd import DATAPATH_TABLE
from stockade.model.crd_schema import GROUP, VERSION

log = logging.getLogger(__name__)

COMPONENT = "stockade-agent"
MERGE_PATCH = "application/merge-patch+json"
NOT_FOUND = 404
REFUSED = "TablesRefused"
EVENTS_NAMESPACE = "default"  # where Events on cluster-scoped objects go, as kubectl looks


class Reporter:
    def __init__(self, api: ApiClient, node: str) -> None:
        self._objects = CustomObjectsApi(api)
        self._core = CoreV1Api(api)
        self.node = node
        self.name = handoff.program_name(node)
        self._last: Report | None = None
        self._said: set[tuple[str, str, str]] = set()
        self.writes = 0
        self.events = 0

    def report(self, report: Report) -> bool:
        """Patch the status when it changed; False when there is no program object to patch."""
        if report == self._last:
            return True
        try:
            self._objects.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                DATAPATH_TABLE.plural,
                self.name,
                {"status": report.body()},
                _content_type=MERGE_PATCH,
                _request_timeout=(5, 15),
            )
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return False
            raise
        self._last = report
        self.writes += 1
        return True

    def forget(self) -> None:
        """Write the next report even if it equals the last (the object may have been replaced)."""
        self._last = None

    def pod_failures(self, failures: Iterable[Failure]) -> None:
        """A Warning Event on each failing endpoint's Pod (found by address on this node)."""
        new = [
            f
            for f in failures
            if (str(f.endpoint.addresses), f.reason, f.message) not in self._said
        ]
        if not new:
            return
        pods = self._core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}", _request_timeout=(5, 30)
        )
        by_ip: dict[str, dict[str, str]] = {}
        for pod in pods.items:
            meta = pod.metadata
            if meta is None or pod.status is None:
                continue
            names = {"name": str(meta.name), "namespace": str(meta.namespace), "uid": str(meta.uid)}
            for ip in pod.status.pod_ips or []:
                by_ip[str(ip.ip)] = names
        for failure in new:
            refs = [by_ip[str(a)] for a in failure.endpoint.addresses if str(a) in by_ip]
            if refs:
                involved = {"apiVersion": "v1", "kind": "Pod", **refs[0]}
                message = f"stockade could not enforce policy on this pod: {failure.message}"
                self._post(refs[0]["namespace"], involved, failure.reason, message)
            else:
                log.warning("no pod on %s has %s", self.node, failure.endpoint.addresses)
            self._said.add((str(failure.endpoint.addresses), failure.reason, failure.message))

    def pod_event(self, namespace: str, name: str, uid: str, reason: str, message: str) -> None:
        """A Warning Event on one Pod (the pending state's budget ran out, for example)."""
        involved = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name}
        if uid:
            involved["uid"] = uid
        self._post(namespace, involved, reason, message)

    def refused(self, message: str) -> None:
        """A Warning Event on the node's program object: the published set was refused (not in
        the hand-off format, or a number out of its range) and the last good set stays in force.
        Posted once per message."""
        if ("", REFUSED, message) in self._said:
            return
        involved = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": DATAPATH_TABLE.kind,
            "name": self.name,
        }
        text = f"refused the published tables, enforcing the last good set: {message}"
        self._post(EVENTS_NAMESPACE, involved, REFUSED, text)
        self._said.add(("", REFUSED, message))

    def _post(self, namespace: str, involved: Mapping[str, str], reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name'][:200]}.", "namespace": namespace},
            "involvedObject": dict(involved),
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._core.create_namespaced_event(namespace, CoreV1Event.model_validate(body))
            self.events += 1
        except ApiException as exc:
            log.warning("could not post %s on %s: %s", reason, involved["name"], exc.reason)
