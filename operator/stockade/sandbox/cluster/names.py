"""What the sandbox's cluster DNS answers: the `cluster.local` zone as it stands, and the answer
to one parsed query. Pure: `stockade.sandbox.cluster.dns` keeps a `Zone` up to date from the API
server and calls `answer()` for every query it reads.

- `<svc>.<ns>.svc.cluster.local`: the Service's ClusterIPs (A for IPv4, AAAA for IPv6); for a
  headless Service (clusterIP None), the ready addresses of its EndpointSlices.
- `_<port>._<proto>.<svc>.<ns>.svc.cluster.local`: SRV, one record per named port of that
  protocol, whose target is the Service's name (also for a headless Service: no per-endpoint
  names); no additional records, so a client asks for the target's address itself.
- `<a-b-c-d>.<ns>.pod.cluster.local` (and IPv6 with `-` for `:`): that address, as kube-dns
  does without checking that a pod has it.
- An ExternalName Service exists without records (nothing outside the zone is named).
- Other names in `cluster.local`: NXDOMAIN, except the names between the zone and a Service
  (`svc.cluster.local`, `<ns>.svc.cluster.local`), which exist without records (NOERROR, empty).
- Names outside `cluster.local`: REFUSED. Nothing is forwarded: no traffic leaves the machine.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from stockade.sandbox.cluster.dnswire import (
    CLASS_ANY,
    CLASS_IN,
    Query,
    Rcode,
    Record,
    RType,
    a_record,
    aaaa_record,
    badvers_response,
    encode_name,
    response,
    soa_record,
    srv_record,
)

ZONE = "cluster.local"
TTL_S = 5
_ZONE_LABELS = (b"cluster", b"local")


@dataclass(frozen=True)
class Zone:
    """The zone at one moment: (namespace, service name) -> addresses. Replaced, never changed."""

    services: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # (namespace, service name) -> (port name, protocol in lower case, port) of its named ports
    ports: dict[tuple[str, str], tuple[tuple[str, str, int], ...]] = field(default_factory=dict)
    serial: int = 1

    def namespaces(self) -> set[str]:
        return {ns for ns, _ in self.services}


def _pod_address(label: str) -> str | None:
    """The address a `pod.cluster.local` label spells (1-2-3-4, fd00--1), if it spells one."""
    for text in (label.replace("-", "."), label.replace("-", ":")):
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            continue
    return None


def lookup(zone: Zone, labels: tuple[str, ...]) -> tuple[Rcode, tuple[str, ...]]:
    """(rcode, addresses) for a name in the zone, given its labels before `cluster.local`."""
    if labels in ((), ("svc",), ("pod",)):
        return Rcode.NOERROR, ()
    if len(labels) == 2 and labels[1] == "svc":
        return (Rcode.NOERROR if labels[0] in zone.namespaces() else Rcode.NXDOMAIN), ()
    if len(labels) == 3 and labels[2] == "svc":
        found = zone.services.get((labels[1], labels[0]))
        return (Rcode.NXDOMAIN, ()) if found is None else (Rcode.NOERROR, found)
    if len(labels) == 3 and labels[2] == "pod":
        address = _pod_address(labels[0])
        return (Rcode.NXDOMAIN, ()) if address is None else (Rcode.NOERROR, (address,))
    return Rcode.NXDOMAIN, ()


def srv_records(zone: Zone, labels: tuple[str, ...]) -> tuple[Rcode, list[Record]] | None:
    """SRV answers for `_<port>._<proto>.<svc>.<ns>.svc` (labels before the zone), or None if
    the name is not of that form."""
    if not (len(labels) == 5 and labels[4] == "svc" and labels[0][:1] == labels[1][:1] == "_"):
        return None
    key = (labels[3], labels[2])
    if key not in zone.services:
        return Rcode.NXDOMAIN, []
    target = encode_name(f"{labels[2]}.{labels[3]}.svc.{ZONE}")
    wanted = (labels[0][1:], labels[1][1:])
    records = [
        srv_record(port, target, TTL_S)
        for name, proto, port in zone.ports.get(key, ())
        if (name, proto) == wanted
    ]
    return (Rcode.NOERROR, records) if records else (Rcode.NXDOMAIN, [])


def _records(addresses: tuple[str, ...], qtype: int) -> list[Record]:
    out: list[Record] = []
    for address in addresses:
        v6 = ":" in address
        if not v6 and qtype in (RType.A, RType.ANY):
            out.append(a_record(address, TTL_S))
        elif v6 and qtype in (RType.AAAA, RType.ANY):
            out.append(aaaa_record(address, TTL_S))
    return out


def answer(zone: Zone, query: Query, *, tcp: bool = False) -> bytes:
    """The response to `query` (already parsed and well formed)."""
    if query.edns is not None and query.edns.version != 0:
        return badvers_response(query)
    if query.qclass not in (CLASS_IN, CLASS_ANY):
        return response(query, Rcode.REFUSED, [], tcp=tcp)
    lowered = tuple(label.lower() for label in query.labels)
    if lowered[-2:] != _ZONE_LABELS:
        return response(query, Rcode.REFUSED, [], tcp=tcp)
    try:
        inner = tuple(label.decode("ascii") for label in lowered[:-2])
    except UnicodeDecodeError:
        inner = ("\x00",)  # no such name
    srv = srv_records(zone, inner)
    if srv is not None:
        rcode, found = srv
        answers = found if query.qtype in (RType.SRV, RType.ANY) else []
    else:
        rcode, addresses = lookup(zone, inner)
        answers = _records(addresses, query.qtype)
    authority = [] if answers else [soa_record(ZONE, TTL_S, zone.serial)]
    return response(query, rcode, answers, authority, tcp=tcp)
