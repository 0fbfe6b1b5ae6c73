"""The cluster as the API server holds it now: pods, namespaces, nodes and every policy stockade
enforces, parsed with the operator's own functions (`stockade.control.objects`,
`stockade.control.policies`), so that `stockade explain` judges what the operator lowers.

Called by `stockade.inspect.explain` and `stockade.inspect.observe`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from stockade.control.objects import namespace_from_api, node_from_api, pod_from_api
from stockade.control.policies import PolicyRecord, parse_record
from stockade.model.cluster import ClusterState, Pod
from stockade.model.kinds import enforced
from stockade.model.policy import IPAddress

NOT_FOUND = 404


@dataclass(frozen=True)
class Live:
    state: ClusterState
    records: tuple[PolicyRecord, ...]

    @property
    def policies(self) -> list[Any]:
        return [r.policy for r in self.records if r.policy is not None]

    def pod(self, key: str) -> Pod:
        """The pod `namespace/name`; ValueError names it when there is none."""
        for pod in self.state.pods:
            if pod.key == key:
                return pod
        raise ValueError(f"no pod {key} (or it has no address yet)")

    def pod_name(self, address: str) -> str:
        """`namespace/name` of the pod at `address`, else the address itself."""
        try:
            pod = self.state.pod_at(ipaddress.ip_address(address))
        except ValueError:
            return address
        return pod.key if pod is not None else address


def _items(listed: Any) -> list[dict[str, Any]]:
    items = listed.get("items") if isinstance(listed, dict) else None
    return items if isinstance(items, list) else []


def read(api: Any, namespace: str | None = None) -> Live:
    """Read the cluster (policies of every namespace when `namespace` is None)."""
    core = kubernetes.client.CoreV1Api(api)
    raw = api.sanitize_for_serialization
    namespaces = [namespace_from_api(o) for o in raw(core.list_namespace())["items"]]
    pods = [p for o in raw(core.list_pod_for_all_namespaces())["items"] if (p := pod_from_api(o))]
    nodes = [node_from_api(o) for o in raw(core.list_node())["items"]]
    state = ClusterState(namespaces, _unique(pods), nodes)
    return Live(state, tuple(_policies(api, namespace)))


def _unique(pods: Iterable[Pod]) -> list[Pod]:
    """One pod per address (a terminating pod's address may already be another's)."""
    seen: set[IPAddress] = set()
    out = []
    for pod in pods:
        if pod.host_network or not any(ip in seen for ip in pod.ips):
            out.append(pod)
            seen.update(() if pod.host_network else pod.ips)
    return out


def _policies(api: Any, namespace: str | None) -> Iterable[PolicyRecord]:
    custom = kubernetes.client.CustomObjectsApi(api)
    for resource in enforced():
        try:
            listed = custom.list_cluster_custom_object(
                resource.group, resource.version, resource.plural
            )
        except ApiException as exc:
            if exc.status == NOT_FOUND:  # the kind is not installed (the upstream CRD)
                continue
            raise
        for item in _items(listed):
            # a list's items of a built-in kind carry no apiVersion and kind: the list's do
            obj = {**item, "apiVersion": resource.api_version, "kind": resource.name}
            record = parse_record(obj)
            if record is None:
                continue
            if namespace is not None and record.namespace not in ("", namespace):
                continue
            yield record
