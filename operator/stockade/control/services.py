"""The Service address space of the cluster, from the API, for the agents' `svc_space` trie
(bpf/service.h: a pod's new flow to it is judged on its backend, after DNAT).

Pure functions over raw objects that never raise on a malformed one (a bad field is absent):
- a ServiceCIDR (networking.k8s.io/v1): its `spec.cidrs`;
- a Service: its cluster IPs (covered by a ServiceCIDR when the API serves them; listed anyway,
  so that a cluster without the ServiceCIDR API or the operator's `--service-cidrs` still
  has them), `spec.externalIPs` and `status.loadBalancer.ingress[].ip`, and whether it has
  node ports;
- `service_space()`: the entries every node gets: the CIDRs and addresses with every port, and,
  when some Service has a node port, each node's addresses with the NodePort range only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stockade.compiler import ir

DEFAULT_NODE_PORT_RANGE = (30000, 32767)  # kube-apiserver's --service-node-port-range


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _address(text: Any) -> ir.IPAddress | None:
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None  # "None" of a headless Service, or garbage


@dataclass(frozen=True)
class ServiceInfo:
    addresses: tuple[ir.IPAddress, ...]  # cluster, external and load-balancer IPs
    node_ports: bool


def service_from_api(obj: Mapping[str, Any]) -> ServiceInfo:
    spec, status = _map(obj.get("spec")), _map(obj.get("status"))
    texts = [spec.get("clusterIP"), *_list(spec.get("clusterIPs")), *_list(spec.get("externalIPs"))]
    texts += [_map(i).get("ip") for i in _list(_map(status.get("loadBalancer")).get("ingress"))]
    addresses: list[ir.IPAddress] = []
    for text in texts:
        address = _address(text)
        if address is not None and address not in addresses:
            addresses.append(address)
    node_ports = any(isinstance(_map(p).get("nodePort"), int) for p in _list(spec.get("ports")))
    return ServiceInfo(tuple(addresses), node_ports)


def service_cidr_from_api(obj: Mapping[str, Any]) -> tuple[ir.IPNetwork, ...]:
    out: list[ir.IPNetwork] = []
    for text in _list(_map(obj.get("spec")).get("cidrs")):
        try:
            network = ipaddress.ip_network(str(text))
        except ValueError:
            continue
        if network not in out:
            out.append(network)
    return tuple(out)


def service_space(
    cidrs: Iterable[ir.IPNetwork],
    services: Iterable[ServiceInfo],
    node_addresses: Iterable[ir.IPAddress],
    node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
) -> tuple[ir.ServiceEntry, ...]:
    """Every node's entries, sorted by key, one per prefix (a node address inside a Service
    CIDR keeps the CIDR's every-port entry: the longer prefix would narrow it)."""
    entries: dict[bytes, ir.ServiceEntry] = {}
    infos = list(services)
    networks = [*cidrs, *(ipaddress.ip_network(a) for i in infos for a in i.addresses)]
    for network in networks:
        entry = ir.ServiceEntry(network)
        entries[entry.key()] = entry
    if any(i.node_ports for i in infos):
        low, high = node_port_range
        for address in node_addresses:
            network = ipaddress.ip_network(address)
            if any(network.subnet_of(n) for n in networks if n.version == network.version):  # type: ignore[arg-type]
                continue
            entry = ir.ServiceEntry(network, low, high)
            entries.setdefault(entry.key(), entry)
    return tuple(entries[k] for k in sorted(entries))
