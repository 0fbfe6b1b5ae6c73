"""The sandbox's stand-in for kubelet: it registers sandbox nodes and pods in the API server.

It writes what a kubelet would for Pods the sandbox wires itself: a Node with its pod CIDRs,
InternalIPs, capacity and a Ready condition, and Pods bound to a node (spec.nodeName) whose
status (phase Running, Ready, podIP/podIPs, hostIP) is written through the status subresource.
Such Pods are wired directly (`Topology.add_pod`) and carry `node.podspec.DIRECT_ANNOTATION`, so
that the per-node kubelet stand-in (`stockade.sandbox.node.kubelet`), which runs the other Pods
bound to its node, leaves them alone. Pods are deleted with grace period 0, since nothing would
confirm a graceful stop. The controller manager creates each namespace's `default`
ServiceAccount shortly after the namespace; until then the ServiceAccount admission plugin
rejects Pods, so `create_pod` retries that one refusal for a while. Called by the apiserver/e2e
test fixtures, the e2e conformance engine, the benchmarks and
`stockade sandbox`.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, V1Node, V1Pod
from kubernetes.client.exceptions import ApiException

from stockade.sandbox.node.podspec import DIRECT_ANNOTATION
from stockade.sandbox.topology import NodeNet, PodNet

POD_IMAGE = "stockade.invalid/sandbox-pod:none"  # never pulled: nothing runs images here
CONDITION_TYPES = ("PodScheduled", "Initialized", "ContainersReady", "Ready")
HTTP_NOT_FOUND = 404
# Lists (conditions, addresses) are replaced whole, so registering again never duplicates entries.
MERGE_PATCH = "application/merge-patch+json"
HTTP_CONFLICT = 409
HTTP_FORBIDDEN = 403
# What a node offers the scheduler (a kubelet would report its machine's).
CAPACITY = {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}
# How long a Pod waits for its namespace's `default` ServiceAccount (the controller manager's
# serviceaccount controller makes it within a second or so of the namespace).
SERVICE_ACCOUNT_WAIT = 30.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register_node(api: ApiClient, node: NodeNet) -> None:
    """Create (or update) the Node object for `node`, then mark it Ready with its addresses."""
    core = CoreV1Api(api)
    labels = {
        "kubernetes.io/hostname": node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "stockade.io/sandbox-netns": node.netns,
    }
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": labels},
        "spec": {"podCIDR": node.pod_cidr_v4, "podCIDRs": [node.pod_cidr_v4, node.pod_cidr_v6]},
    }
    try:
        core.create_node(V1Node.model_validate(body))
    except ApiException as exc:
        if exc.status != HTTP_CONFLICT:
            raise
    # The API server taints a new Node not-ready (TaintNodesByCondition); the node lifecycle
    # controller, which the sandbox does not run, would lift it once the Node is Ready.
    spec = {**body["spec"], "taints": []}
    core.patch_node(
        node.name, {"metadata": {"labels": labels}, "spec": spec}, _content_type=MERGE_PATCH
    )
    now = _now()
    status = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "stockade sandbox node",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "addresses": [
                {"type": "InternalIP", "address": node.ip_v4},
                {"type": "InternalIP", "address": node.ip_v6},
                {"type": "Hostname", "address": node.name},
            ],
        }
    }
    core.patch_node_status(node.name, status, _content_type=MERGE_PATCH)


def node_internal_ips(api: ApiClient, node_name: str) -> list[str]:
    """The InternalIP addresses of Node `node_name`, in the order the node lists them."""
    try:
        node = CoreV1Api(api).read_node_status(node_name)
    except ApiException as exc:
        if exc.status == HTTP_NOT_FOUND:
            raise ValueError(
                f"pod node {node_name!r} is not registered (register_node first)"
            ) from exc
        raise
    addresses = (node.status.addresses if node.status else None) or []
    return [a.address for a in addresses if a.type == "InternalIP"]


def missing_service_account(status: int | None, body: str) -> bool:
    """Whether the ServiceAccount admission plugin refused a Pod (the answer's HTTP `status` and
    `body`) because its ServiceAccount does not exist (yet)."""
    return status == HTTP_FORBIDDEN and "error looking up service account" in body


def create_pod(api: ApiClient, namespace: str, body: dict[str, Any] | V1Pod) -> Any:
    """Create a Pod; while its namespace's ServiceAccount is still missing (a namespace the
    controller manager has not caught up with), retry for up to SERVICE_ACCOUNT_WAIT seconds."""
    core = CoreV1Api(api)
    pod = body if isinstance(body, V1Pod) else V1Pod.model_validate(body)
    deadline = time.monotonic() + SERVICE_ACCOUNT_WAIT
    while True:
        try:
            return core.create_namespaced_pod(namespace, pod)
        except ApiException as exc:
            waiting = missing_service_account(exc.status, str(exc.body or ""))
            if not waiting or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _container_port(name: str | None, port: int, protocol: str) -> dict[str, Any]:
    proto = protocol.upper()
    if proto not in ("TCP", "UDP", "SCTP"):
        raise ValueError(f"container port {port}: protocol {protocol!r} must be TCP, UDP or SCTP")
    entry: dict[str, Any] = {"containerPort": int(port), "protocol": proto}
    if name:
        entry["name"] = name
    return entry


def register_pod(
    api: ApiClient,
    namespace: str,
    name: str,
    pod: PodNet,
    labels: dict[str, str],
    ports: list[tuple[str | None, int, str]],
    host_network: bool = False,
    service_account: str | None = None,
) -> None:
    """Create Pod `namespace/name` bound to `pod.node` and set its status to Running and Ready.

    `ports` are (name or None, number, protocol) container ports. hostIP/hostIPs are the
    InternalIPs of the pod's Node object, which `register_node` must have created. A
    host-network pod (`host_network`) is given its node's addresses in `pod`. The pod runs as
    ServiceAccount `service_account` when given (tokens can then be bound to it), else the
    namespace's `default`."""
    core = CoreV1Api(api)
    host_ips = node_internal_ips(api, pod.node)
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            # wired here, not by the node's kubelet stand-in (stockade.sandbox.node.kubelet)
            "annotations": {DIRECT_ANNOTATION: "true"},
        },
        "spec": {
            "nodeName": pod.node,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "hostNetwork": host_network,
            "containers": [
                {
                    "name": "main",
                    "image": POD_IMAGE,
                    "ports": [_container_port(n, p, proto) for n, p, proto in ports],
                }
            ],
        },
    }
    if service_account is not None:
        body["spec"]["serviceAccountName"] = service_account
    create_pod(api, namespace, body)
    now = _now()
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": now} for t in CONDITION_TYPES
        ],
        "podIP": pod.ip_v4,
        "podIPs": [{"ip": pod.ip_v4}, {"ip": pod.ip_v6}],
        "startTime": now,
        "containerStatuses": [
            {
                "name": "main",
                "image": POD_IMAGE,
                "imageID": "",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }
        ],
    }
    if host_ips:
        status["hostIP"] = host_ips[0]
        status["hostIPs"] = [{"ip": ip} for ip in host_ips]
    core.patch_namespaced_pod_status(name, namespace, {"status": status}, _content_type=MERGE_PATCH)


def set_pod_labels(api: ApiClient, namespace: str, name: str, labels: dict[str, str]) -> None:
    """Replace the pod's labels with `labels` (labels absent from `labels` are removed)."""
    core = CoreV1Api(api)
    current = core.read_namespaced_pod(name, namespace)
    old = dict((current.metadata.labels if current.metadata else None) or {})
    patch: dict[str, Any] = {k: None for k in old if k not in labels}
    patch.update(labels)
    core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": patch}})


def delete_pod(api: ApiClient, namespace: str, name: str) -> None:
    """Delete the pod at once (grace period 0); a pod already gone is fine."""
    core = CoreV1Api(api)
    try:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != HTTP_NOT_FOUND:
            raise
