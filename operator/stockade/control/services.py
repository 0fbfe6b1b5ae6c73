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


PROTOCOLS = {"TCP": ir.PROTO_TCP, "UDP": ir.PROTO_UDP, "SCTP": ir.PROTO_SCTP}


def _protocol(value: Any) -> int | None:
    return PROTOCOLS.get("TCP" if value is None else value)  # the API's default is TCP


def _port(value: Any) -> int | None:
    return value if isinstance(value, int) and 1 <= value <= 65535 else None


@dataclass(frozen=True, order=True)
class ServicePort:
    """One entry of a Service's `spec.ports`: the EndpointSlice port of the same name holds
    each backend's target port (a named targetPort resolved per backend)."""

    name: str
    protocol: int
    port: int
    node_port: int | None = None


@dataclass(frozen=True)
class ServiceInfo:
    addresses: tuple[ir.IPAddress, ...]  # cluster, external and load-balancer IPs
    node_ports: bool
    ports: tuple[ServicePort, ...] = ()


def service_from_api(obj: Mapping[str, Any]) -> ServiceInfo:
    spec, status = _map(obj.get("spec")), _map(obj.get("status"))
    ports: list[ServicePort] = []
    for raw in _list(spec.get("ports")):
        p = _map(raw)
        protocol, port, name = _protocol(p.get("protocol")), _port(p.get("port")), p.get("name")
        if protocol is None or port is None:
            continue
        ports.append(
            ServicePort(
                name if isinstance(name, str) else "", protocol, port, _port(p.get("nodePort"))
            )
        )
    texts = [spec.get("clusterIP"), *_list(spec.get("clusterIPs")), *_list(spec.get("externalIPs"))]
    texts += [_map(i).get("ip") for i in _list(_map(status.get("loadBalancer")).get("ingress"))]
    addresses: list[ir.IPAddress] = []
    for text in texts:
        address = _address(text)
        if address is not None and address not in addresses:
            addresses.append(address)
    node_ports = any(isinstance(_map(p).get("nodePort"), int) for p in _list(spec.get("ports")))
    if not addresses and not node_ports:
        ports = []  # headless: no Service address leads to its ports
    return ServiceInfo(tuple(addresses), node_ports, tuple(ports))


SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6}  # FQDN slices name no address: not used


@dataclass(frozen=True)
class SliceInfo:
    """What an EndpointSlice says of its Service's backends: the Service (`namespace/name`,
    from its `kubernetes.io/service-name` label), the family, its ports (name, protocol, target
    port number) and the addresses of its ready endpoints (`conditions.ready` absent counts as
    ready, as the API says)."""

    service: str
    version: int
    ports: tuple[tuple[str, int, int], ...]
    ready: tuple[ir.IPAddress, ...]


def endpoint_slice_from_api(obj: Mapping[str, Any]) -> SliceInfo | None:
    """None for a slice that names no Service or no address family stockade reads."""
    meta = _map(obj.get("metadata"))
    service = _map(meta.get("labels")).get(SERVICE_NAME_LABEL)
    version = ADDRESS_TYPES.get(obj.get("addressType"))  # type: ignore[arg-type]
    if not isinstance(service, str) or not service or version is None:
        return None
    ports: list[tuple[str, int, int]] = []
    for raw in _list(obj.get("ports")):
        p = _map(raw)
        protocol, port, name = _protocol(p.get("protocol")), _port(p.get("port")), p.get("name")
        if protocol is not None and port is not None:
            ports.append((name if isinstance(name, str) else "", protocol, port))
    ready: list[ir.IPAddress] = []
    for raw in _list(obj.get("endpoints")):
        endpoint = _map(raw)
        if _map(endpoint.get("conditions")).get("ready") not in (None, True):
            continue
        for text in _list(endpoint.get("addresses")):
            address = _address(text)
            if address is not None and address.version == version and address not in ready:
                ready.append(address)
    namespace = meta.get("namespace")
    key = f"{namespace}/{service}" if isinstance(namespace, str) and namespace else service
    return SliceInfo(key, version, tuple(ports), tuple(ready))


def service_backends(
    services: Mapping[str, ServiceInfo],
    slices: Iterable[SliceInfo],
    node_addresses: Iterable[ir.IPAddress] = (),
) -> tuple[ir.ServiceBackends, ...]:
    """The Service → ready backends table of the fallback mode, sorted: for each Service
    address (cluster, external, load-balancer) and port, and each node address and node port,
    the ready endpoints of the same family in the Service's slices with the target port of
    the slice port named as the Service port (same protocol). A Service port that no slice
    names has no backend. When two Services claim one address, protocol and port, the first by
    `namespace/name` is kept."""
    by_service: dict[str, list[SliceInfo]] = {}
    for info in slices:
        by_service.setdefault(info.service, []).append(info)
    nodes = list(dict.fromkeys(node_addresses))
    out: dict[tuple[ir.IPAddress, int, int], ir.ServiceBackends] = {}
    for key in sorted(services):
        svc = services[key]
        for port in svc.ports:
            for version in (4, 6):
                backends = sorted(
                    {
                        (address, number)
                        for s in by_service.get(key, ())
                        if s.version == version
                        for name, protocol, number in s.ports
                        if name == port.name and protocol == port.protocol
                        for address in s.ready
                    },
                    key=lambda b: (b[0].packed, b[1]),
                )
                targets = [(a, port.port) for a in svc.addresses if a.version == version]
                if port.node_port is not None:
                    targets += [(a, port.node_port) for a in nodes if a.version == version]
                for address, number in targets:
                    out.setdefault(
                        (address, port.protocol, number),
                        ir.ServiceBackends(address, port.protocol, number, tuple(backends)),
                    )
    return tuple(out[k] for k in sorted(out, key=lambda k: (k[0].version, k[0].packed, k[1], k[2])))


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
