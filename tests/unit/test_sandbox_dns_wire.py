"""The sandbox cluster DNS reads queries strictly and answers within the size the query allows:
golden bytes for a query and its answer, the zone's answers (A, AAAA, headless, pod names,
NXDOMAIN, REFUSED), and garbage that never raises and never gets a malformed or oversized
reply."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.sandbox.cluster import dns
from stockade.sandbox.cluster.dnswire import (
    HEADER,
    TC,
    UDP_LIMIT,
    Malformed,
    Query,
    Rcode,
    RType,
    encode_name,
    parse_query,
)
from stockade.sandbox.cluster.names import Zone, answer

WEB_A_QUERY = bytes.fromhex(
    "1234 0100 0001 0000 0000 0000"  # id, RD, one question
    "03776562 0473686f70 03737663 07636c7573746572 056c6f63616c 00"  # web.shop.svc.cluster.local
    "0001 0001"  # A, IN
)
WEB_A_ANSWER = bytes.fromhex(
    "1234 8500 0001 0001 0000 0000"  # QR AA RD, NOERROR, one answer
    "03776562 0473686f70 03737663 07636c7573746572 056c6f63616c 00 0001 0001"
    "c00c 0001 0001 00000005 0004 0a600007"  # pointer to the question, A IN, TTL 5, 10.96.0.7
)
ZONE = Zone(
    services={
        ("shop", "web"): ("10.96.0.7", "fd00:10:96::7"),
        ("shop", "db"): ("10.244.1.2", "10.244.2.3"),  # as a headless Service resolves
    },
    ports={("shop", "web"): (("http", "tcp", 80), ("dns", "udp", 53), ("metrics", "tcp", 9090))},
)


def query(name: str, qtype: int = RType.A, *, qid: int = 7, edns: int | None = None) -> bytes:
    header = HEADER.pack(qid, 0x0100, 1, 0, 0, 1 if edns is not None else 0)
    opt = b"\x00" + struct.pack("!HHIH", RType.OPT, edns, 0, 0) if edns is not None else b""
    return header + encode_name(name) + struct.pack("!HH", qtype, 1) + opt


def ask(data: bytes, zone: Zone = ZONE, *, tcp: bool = False) -> bytes:
    parsed = parse_query(data)
    assert isinstance(parsed, Query), parsed
    return answer(zone, parsed, tcp=tcp)


def rcode(reply: bytes) -> int:
    return HEADER.unpack_from(reply)[1] & 0xF


def answers(reply: bytes) -> list[tuple[int, bytes]]:
    """(type, rdata) of each answer record, read back from the reply (pointer owners only)."""
    _, _, qd, an, _, _ = HEADER.unpack_from(reply)
    assert qd == 1
    offset = 12
    while reply[offset] != 0:
        offset += reply[offset] + 1
    offset += 5
    out = []
    for _ in range(an):
        assert reply[offset] & 0xC0 == 0xC0
        rtype, _, ttl, size = struct.unpack_from("!HHIH", reply, offset + 2)
        assert ttl == 5
        out.append((rtype, reply[offset + 12 : offset + 12 + size]))
        offset += 12 + size
    return out


def test_a_query_for_a_service_gets_its_cluster_ip_in_golden_bytes() -> None:
    zone = Zone(services={("shop", "web"): ("10.96.0.7",)})
    assert ask(WEB_A_QUERY, zone) == WEB_A_ANSWER


def test_aaaa_gets_the_ipv6_cluster_ip_and_a_gets_the_ipv4_one() -> None:
    assert answers(ask(query("web.shop.svc.cluster.local", RType.AAAA))) == [
        (RType.AAAA, bytes.fromhex("fd000010009600000000000000000007"))
    ]
    assert answers(ask(query("WEB.Shop.svc.cluster.local."))) == [(RType.A, bytes([10, 96, 0, 7]))]


def test_a_headless_service_answers_with_every_ready_endpoint_address() -> None:
    got = answers(ask(query("db.shop.svc.cluster.local")))
    assert got == [(RType.A, bytes([10, 244, 1, 2])), (RType.A, bytes([10, 244, 2, 3]))]


@pytest.mark.parametrize(
    ("name", "qtype", "expected", "records"),
    [
        ("nope.shop.svc.cluster.local", RType.A, Rcode.NXDOMAIN, 0),
        ("web.other.svc.cluster.local", RType.A, Rcode.NXDOMAIN, 0),
        ("a.b.c.cluster.local", RType.A, Rcode.NXDOMAIN, 0),
        ("shop.svc.cluster.local", RType.A, Rcode.NOERROR, 0),
        ("web.shop.svc.cluster.local", RType.SRV, Rcode.NOERROR, 0),
        ("10-244-1-5.shop.pod.cluster.local", RType.A, Rcode.NOERROR, 1),
        ("fd00-10-244-1--5.shop.pod.cluster.local", RType.AAAA, Rcode.NOERROR, 1),
        ("example.com", RType.A, Rcode.REFUSED, 0),
        ("cluster.local.example.com", RType.A, Rcode.REFUSED, 0),
        (".", RType.A, Rcode.REFUSED, 0),
    ],
    ids=[
        "unknown-service",
        "unknown-namespace",
        "unknown-name",
        "namespace-exists",
        "no-srv-records",
        "pod-v4",
        "pod-v6",
        "outside-zone",
        "zone-as-a-prefix",
        "root",
    ],
)
def test_names_get_their_rcode(name: str, qtype: int, expected: Rcode, records: int) -> None:
    reply = ask(query(name, qtype))
    assert rcode(reply) == expected
    assert len(answers(reply)) == records


def test_srv_names_a_named_port_of_the_service_with_the_service_as_target() -> None:
    target = encode_name("web.shop.svc.cluster.local")
    assert answers(ask(query("_http._tcp.web.shop.svc.cluster.local", RType.SRV))) == [
        (RType.SRV, struct.pack("!HHH", 0, 100, 80) + target)
    ]
    assert answers(ask(query("_dns._udp.web.shop.svc.cluster.local", RType.SRV))) == [
        (RType.SRV, struct.pack("!HHH", 0, 100, 53) + target)
    ]
    for name in ("_dns._tcp.web.shop", "_http._tcp.nope.shop"):
        assert rcode(ask(query(f"{name}.svc.cluster.local", RType.SRV))) == Rcode.NXDOMAIN
    reply = ask(query("_http._tcp.web.shop.svc.cluster.local", RType.A))
    assert (rcode(reply), answers(reply)) == (Rcode.NOERROR, [])


def test_a_negative_answer_carries_the_zone_soa_for_negative_caching() -> None:
    reply = ask(query("nope.shop.svc.cluster.local"))
    assert HEADER.unpack_from(reply)[4] == 1
    assert encode_name("cluster.local") + struct.pack("!H", RType.SOA) in reply


def _many(count: int) -> Zone:
    return Zone(
        services={("shop", "big"): tuple(f"10.244.{i // 250}.{i % 250}" for i in range(count))}
    )


def test_udp_without_edns_is_cut_at_512_bytes_with_tc_and_tcp_gets_everything() -> None:
    data = query("big.shop.svc.cluster.local")
    reply = ask(data, _many(100))
    assert len(reply) <= UDP_LIMIT
    assert HEADER.unpack_from(reply)[1] & TC
    assert len(answers(reply)) == (UDP_LIMIT - len(data)) // 16
    full = ask(data, _many(100), tcp=True)
    assert not HEADER.unpack_from(full)[1] & TC
    assert len(answers(full)) == 100


def test_edns_raises_the_udp_limit_to_the_advertised_size_and_answers_with_opt() -> None:
    reply = ask(query("big.shop.svc.cluster.local", edns=1000), _many(100))
    assert 512 < len(reply) <= 1000
    assert HEADER.unpack_from(reply)[5] == 1
    assert reply.endswith(b"\x00" + struct.pack("!HH", RType.OPT, 1232) + bytes(6))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + bytes(4), "compressed"),
        (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x05ab", "past the end"),
        (HEADER.pack(1, 0, 2, 0, 0, 0) + b"\x00" + bytes(4), "questions"),
        (HEADER.pack(1, 0, 1, 1, 0, 0) + b"\x00" + bytes(4), "no answers"),
        (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x00\x00\x01", "truncated"),
        (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x00" + bytes(4) + b"x", "after the last"),
        (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x3f" * 5 + bytes(4), "past the end"),
        (HEADER.pack(1, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + bytes(4), "255"),
        (HEADER.pack(1, 0, 1, 0, 0, 1) + b"\x00" + bytes(4) + b"\x00\x00\x01", "OPT"),
    ],
    ids=[
        "pointer",
        "short-label",
        "two-questions",
        "answer-in-query",
        "short-question",
        "trailing",
        "label-overrun",
        "long-name",
        "short-opt",
    ],
)
def test_malformed_queries_get_formerr_naming_the_fault(data: bytes, reason: str) -> None:
    parsed = parse_query(data)
    assert isinstance(parsed, Malformed)
    assert reason in parsed.reason
    reply = dns.handle(_state(), data, tcp=False)
    assert reply == HEADER.pack(1, 0x8001, 0, 0, 0, 0)


def test_short_messages_and_responses_are_dropped() -> None:
    assert parse_query(b"\x00" * 11) is None
    assert parse_query(HEADER.pack(1, 0x8000, 1, 0, 0, 0) + b"\x00" + bytes(4)) is None


def _state(zone: Zone = ZONE) -> dns.ZoneState:
    state = dns.ZoneState()
    state.zone = zone
    return state


def _check_reply(data: bytes, reply: bytes | None, limit: int) -> None:
    """A reply is a response to the same id with the question echoed (or none), within limit."""
    if reply is None:
        return
    assert 12 <= len(reply) <= limit
    rid, flags, qd, an, ns, ar = HEADER.unpack_from(reply)
    assert rid == HEADER.unpack_from(data)[0]
    assert flags & 0x8000
    if qd:
        parsed = parse_query(data)
        assert isinstance(parsed, Query)
        assert reply[12 : 12 + len(parsed.question)] == parsed.question
    else:
        assert (an, ns, ar) == (0, 0, 0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises_and_gets_a_well_formed_reply_or_none(data: bytes) -> None:
    _check_reply(data, dns.handle(_state(), data, tcp=False), UDP_LIMIT)


_label = st.binary(min_size=0, max_size=70)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.lists(_label, max_size=6),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=20),
    st.booleans(),
)
def test_near_queries_never_raise_and_stay_within_the_udp_limit(
    qid: int, flags: int, labels: list[bytes], qtype: int, qclass: int, tail: bytes, tcp: bool
) -> None:
    name = b"".join(bytes([len(label) & 0xFF]) + label for label in labels) + b"\x00"
    data = HEADER.pack(qid, flags, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, qclass) + tail
    _check_reply(data, dns.handle(_state(), data, tcp=tcp), 65535 if tcp else UDP_LIMIT)


def _service(ns: str, name: str, cluster_ips: list[str] | None, kind: str = "ClusterIP") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(namespace=ns, name=name),
        spec=SimpleNamespace(
            type=kind,
            cluster_ips=cluster_ips,
            cluster_ip=None,
            ports=[SimpleNamespace(name="HTTP", protocol="TCP", port=80)],
        ),
    )


def _slice(ns: str, name: str, service: str, endpoints: list[tuple[str, bool | None]]) -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(
            namespace=ns, name=name, labels={"kubernetes.io/service-name": service}
        ),
        endpoints=[
            SimpleNamespace(addresses=[ip], conditions=SimpleNamespace(ready=ready))
            for ip, ready in endpoints
        ],
    )


def test_the_zone_follows_services_and_ready_endpoints_of_headless_services() -> None:
    state = dns.ZoneState()
    state.set_services([_service("shop", "web", ["10.96.0.7"]), _service("shop", "db", ["None"])])
    state.set_slices([_slice("shop", "db-1", "db", [("10.244.1.2", True), ("10.244.1.3", False)])])
    state.slice_event("ADDED", _slice("shop", "db-2", "db", [("10.244.2.4", None)]))
    assert state.zone.services == {
        ("shop", "web"): ("10.96.0.7",),
        ("shop", "db"): ("10.244.1.2", "10.244.2.4"),
    }
    assert state.zone.ports[("shop", "web")] == (("http", "tcp", 80),)
    state.service_event("DELETED", _service("shop", "web", ["10.96.0.7"]))
    assert ("shop", "web") not in state.zone.services


def test_install_objects_match_the_dns_egress_example() -> None:
    service, deployment = dns.service_body(), dns.deployment_body()
    assert service["metadata"]["namespace"] == "kube-system"
    assert service["spec"]["clusterIP"] == "10.96.0.10"
    assert {(p["name"], p["protocol"], p["port"]) for p in service["spec"]["ports"]} == {
        ("dns", "UDP", 53),
        ("dns-tcp", "TCP", 53),
    }
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {"k8s-app": "kube-dns"}
    assert template["spec"]["containers"][0]["image"] == dns.DNS_IMAGE
