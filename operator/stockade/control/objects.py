"""Raw Kubernetes objects (as the API server sends them) → the model's cluster values.

The kopf handlers (`stockade.control.handlers`) call these on every Pod, Namespace and Node they
see; the results go into the `Store`. Pure functions that never raise on a malformed object: a
field that is missing or of the wrong type is treated as absent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from stockade.model.cluster import Namespace, Node, Pod
from stockade.model.policy import IPAddress, Protocol

TERMINAL_PHASES = ("Succeeded", "Failed")  # their addresses may already belong to another pod
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    labels = _map(meta.get("labels"))
    return {str(k): str(v) for k, v in labels.items() if isinstance(v, str)}


def _ip(text: Any) -> IPAddress | None:
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name`, or `name` for cluster-scoped objects."""
    meta = _map(obj.get("metadata"))
    name = str(meta.get("name", ""))
    namespace = meta.get("namespace")
    return f"{namespace}/{name}" if namespace else name


def namespace_from_api(obj: Mapping[str, Any]) -> Namespace:
    meta = _map(obj.get("metadata"))
    return Namespace(str(meta.get("name", "")), _labels(meta))


def node_from_api(obj: Mapping[str, Any]) -> Node:
    meta = _map(obj.get("metadata"))
    ips: list[IPAddress] = []
    for address in _list(_map(obj.get("status")).get("addresses")):
        entry = _map(address)
        ip = _ip(entry.get("address")) if entry.get("type") in NODE_ADDRESS_TYPES else None
        if ip is not None and ip not in ips:
            ips.append(ip)
    return Node(str(meta.get("name", "")), tuple(ips), _labels(meta))


def _named_ports(spec: Mapping[str, Any]) -> dict[str, tuple[int, Protocol]]:
    out: dict[str, tuple[int, Protocol]] = {}
    for container in _list(spec.get("containers")):
        for port in _list(_map(container).get("ports")):
            entry = _map(port)
            name, number = entry.get("name"), entry.get("containerPort")
            try:
                protocol = Protocol(str(entry.get("protocol") or "TCP"))
            except ValueError:
                continue
            if isinstance(name, str) and isinstance(number, int) and name not in out:
                out[name] = (number, protocol)
    return out


def pod_from_api(obj: Mapping[str, Any]) -> Pod | None:
    """The pod as policy sees it, or None when it has no address to enforce on (not yet
    scheduled, no IP yet, or finished)."""
    meta = _map(obj.get("metadata"))
    spec, status = _map(obj.get("spec")), _map(obj.get("status"))
    if status.get("phase") in TERMINAL_PHASES:
        return None
    ips: list[IPAddress] = []
    for entry in _list(status.get("podIPs")):
        ip = _ip(_map(entry).get("ip"))
        if ip is not None and ip not in ips:
            ips.append(ip)
    first = _ip(status.get("podIP"))
    if first is not None and first not in ips:
        ips.insert(0, first)
    node = spec.get("nodeName")
    if not ips or not isinstance(node, str) or not node:
        return None
    return Pod(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        labels=_labels(meta),
        ips=tuple(ips),
        node=node,
        named_ports=_named_ports(spec),
        host_network=spec.get("hostNetwork") is True,
    )
