"""Kubernetes Events on policies: how failures (and, for the standard NetworkPolicy, which has
no status of ours, every state change) reach `kubectl describe`.

The status reporter (`stockade.control.reporter`) calls `post_event()`; a failure to post is
logged, never raised.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CoreV1Event
from kubernetes.client.exceptions import ApiException

from stockade.control.policies import PolicyRecord

log = logging.getLogger(__name__)

COMPONENT = "stockade-operator"
API_VERSIONS = {
    "NetworkPolicy.networking.k8s.io": ("networking.k8s.io/v1", "NetworkPolicy"),
    "NetworkPolicy.stockade.io": ("stockade.io/v1alpha1", "NetworkPolicy"),
    "ClusterNetworkPolicy.stockade.io": ("stockade.io/v1alpha1", "ClusterNetworkPolicy"),
    "ClusterNetworkPolicy.policy.networking.k8s.io": (
        "policy.networking.k8s.io/v1alpha2",
        "ClusterNetworkPolicy",
    ),
}
MAX_MESSAGE = 1024


def event_body(record: PolicyRecord, kind: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about `record` (cluster-scoped policies: in namespace `default`)."""
    api_version, object_kind = API_VERSIONS[record.kind.value]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    namespace = record.namespace or "default"
    involved: dict[str, Any] = {
        "apiVersion": api_version,
        "kind": object_kind,
        "name": record.name,
        "uid": record.uid,
    }
    if record.namespace:
        involved["namespace"] = record.namespace
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{record.name[:200]}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "type": kind,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def post_event(api: ApiClient, record: PolicyRecord, kind: str, reason: str, message: str) -> None:
    body = event_body(record, kind, reason, message)
    try:
        CoreV1Api(api).create_namespaced_event(
            body["metadata"]["namespace"], CoreV1Event.model_validate(body)
        )
    except ApiException as exc:
        log.warning("could not post event %s on %s: %s", reason, record.key, exc.reason)
