"""The sandbox cluster DNS, run as its own process against a real API server with its sockets in
a network namespace, answers from inside that namespace over UDP and TCP: a Service's ClusterIP
(A), AAAA for none, SRV for a named port, a headless Service's ready EndpointSlice addresses,
NXDOMAIN for unknown cluster names and REFUSED for names outside cluster.local; it follows
changes through its watch; and `install` creates the kube-dns Service at 10.96.0.10 and its
Deployment."""

from __future__ import annotations

import secrets
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from stockade.sandbox import netns
from stockade.sandbox.cluster import dns
from stockade.sandbox.cluster.dnswire import HEADER, Rcode, RType, encode_name
from stockade.sandbox.controlplane.server import ControlPlane
from tests.fixtures.controlplane import wait_for

PORT = 5353


def _query(name: str, qtype: int, qid: int) -> bytes:
    return HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)


def _socket_in(ns: str, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A socket created inside `ns` by a thread of its own (setns is per thread)."""
    made: list[socket.socket] = []

    def create() -> None:
        with netns.entered(ns):
            made.append(socket.socket(family, kind))

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    return made[0]


def ask(
    ns: str, name: str, qtype: int = RType.A, *, server: str = "127.0.0.1", tcp: bool = False
) -> tuple[int, list[bytes]]:
    """(rcode, rdata of each answer) for one query sent from inside `ns`."""
    qid = secrets.randbelow(0xFFFF)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with _socket_in(ns, family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        data = _query(name, qtype, qid)
        if tcp:
            sock.connect((server, PORT))
            sock.sendall(struct.pack("!H", len(data)) + data)
            size = struct.unpack("!H", _recv_exactly(sock, 2))[0]
            reply = _recv_exactly(sock, size)
        else:
            sock.sendto(data, (server, PORT))
            reply = sock.recv(4096)
    rid, flags, _, ancount, _, _ = HEADER.unpack_from(reply)
    assert rid == qid
    offset = 12 + len(encode_name(name)) + 4
    rdata = []
    for _ in range(ancount):
        size = struct.unpack_from("!H", reply, offset + 10)[0]
        rdata.append(reply[offset + 12 : offset + 12 + size])
        offset += 12 + size
    return flags & 0xF, rdata


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def _answers(ns: str, name: str, **kw: Any) -> tuple[int, list[bytes]] | None:
    try:
        return ask(ns, name, **kw)
    except OSError:
        return None  # not answering yet


@pytest.fixture
def resolver(
    control_plane: ControlPlane, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """(namespace with the resolver's sockets in it, the resolver's process); the resolver runs
    in the machine's own namespace."""
    name = f"stk-dnstest{secrets.token_hex(3)}"
    netns.create(name)
    proc = None
    try:
        with (tmp_path / "dns.log").open("wb") as log:
            proc = subprocess.Popen(
                dns.command(control_plane.kubeconfig, name, PORT), stdout=log, stderr=log
            )
        wait_for(
            "the resolver answers", lambda: _answers(name, "kubernetes.default.svc.cluster.local")
        )
        yield name, proc
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            proc.terminate()
            proc.wait(timeout=10)
        netns.remove(name)


@pytest.fixture
def dns_netns(resolver: tuple[str, subprocess.Popen[bytes]]) -> str:
    return resolver[0]


def test_a_service_resolves_to_its_cluster_ip_from_inside_the_namespace_over_udp_and_tcp(
    api_client: Any, k8s_namespace: str, dns_netns: str
) -> None:
    core = kubernetes.client.CoreV1Api(api_client)
    service = core.create_namespaced_service(
        k8s_namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"a": "b"}},
        },
    )
    ip = service.spec.cluster_ip
    name = f"web.{k8s_namespace}.svc.cluster.local"
    expected = (Rcode.NOERROR, [socket.inet_aton(ip)])
    assert wait_for("the Service in DNS", lambda: _answers(dns_netns, name) == expected)
    assert ask(dns_netns, name, tcp=True) == expected
    assert ask(dns_netns, name, server="::1") == expected
    assert ask(dns_netns, name, RType.AAAA) == (Rcode.NOERROR, [])
    srv = struct.pack("!HHH", 0, 100, 80) + encode_name(name)
    assert ask(dns_netns, f"_http._tcp.{name}", RType.SRV) == (Rcode.NOERROR, [srv])
    assert ask(dns_netns, f"nope.{k8s_namespace}.svc.cluster.local") == (Rcode.NXDOMAIN, [])
    assert ask(dns_netns, "example.com") == (Rcode.REFUSED, [])
    assert ask(dns_netns, "example.com", tcp=True) == (Rcode.REFUSED, [])
    core.delete_namespaced_service("web", k8s_namespace)
    gone = (Rcode.NXDOMAIN, [])
    assert wait_for("the Service gone from DNS", lambda: _answers(dns_netns, name) == gone)


def test_a_headless_service_resolves_to_its_ready_endpoint_addresses(
    api_client: Any, k8s_namespace: str, dns_netns: str
) -> None:
    core = kubernetes.client.CoreV1Api(api_client)
    core.create_namespaced_service(
        k8s_namespace,
        {"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}},
    )
    kubernetes.client.DiscoveryV1Api(api_client).create_namespaced_endpoint_slice(
        k8s_namespace,
        {
            "metadata": {"name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": True}},
                {"addresses": ["10.244.1.8"], "conditions": {"ready": False}},
            ],
            "ports": [{"port": 5432}],
        },
    )
    name = f"db.{k8s_namespace}.svc.cluster.local"
    expected = (Rcode.NOERROR, [socket.inet_aton("10.244.1.7")])
    assert wait_for("the headless Service in DNS", lambda: _answers(dns_netns, name) == expected)


def test_install_creates_kube_dns_at_the_tenth_service_address(api_client: Any) -> None:
    dns.install(api_client)
    dns.install(api_client)  # idempotent
    service = kubernetes.client.CoreV1Api(api_client).read_namespaced_service(
        "kube-dns", "kube-system"
    )
    assert service.spec.cluster_ip == "10.96.0.10"
    assert service.spec.selector == {"k8s-app": "kube-dns"}
    deployment = kubernetes.client.AppsV1Api(api_client).read_namespaced_deployment(
        "coredns", "kube-system"
    )
    assert deployment.spec.template.spec.containers[0].image == dns.DNS_IMAGE


def test_garbage_from_a_pod_neither_stops_the_resolver_nor_gets_more_than_a_header(
    resolver: tuple[str, subprocess.Popen[bytes]],
) -> None:
    dns_netns, process = resolver
    name = "kubernetes.default.svc.cluster.local"
    with _socket_in(dns_netns, socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.setsockopt(socket.SOL_SOCKET, dns.SO_RCVBUFFORCE, 1 << 20)  # room for every reply
        udp.connect(("127.0.0.1", PORT))
        udp.settimeout(5.0)  # a loaded machine may take a while to answer 200 datagrams
        # The whole burst arrives while the resolver is not running, as on a busy machine: all
        # of it waits in the resolver's receive buffer, and nothing of it may be dropped there.
        process.send_signal(signal.SIGSTOP)
        try:
            for size in range(0, 600, 3):
                udp.send(secrets.token_bytes(size))
            # A pointer loop in the question: FORMERR, header only, with the query's id.
            formerr = HEADER.pack(0xBEEF, 0x8101, 0, 0, 0, 0)
            udp.send(HEADER.pack(0xBEEF, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + bytes(4))
        finally:
            process.send_signal(signal.SIGCONT)
        replies = []
        while formerr not in replies:  # answered in order: the pointer loop's comes last
            try:
                replies.append(udp.recv(4096))
            except TimeoutError:
                break
    assert formerr in replies
    assert all(len(reply) == 12 for reply in replies)  # only FORMERR/NOTIMP for random bytes
    with _socket_in(dns_netns, socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(2.0)
        tcp.connect(("127.0.0.1", PORT))
        tcp.sendall(struct.pack("!H", 40) + b"\xff" * 10)  # a length it never completes
    with _socket_in(dns_netns, socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(2.0)
        tcp.connect(("127.0.0.1", PORT))
        tcp.sendall(struct.pack("!H", 5) + b"\x00" * 5)  # too short for a header: closed
        assert tcp.recv(10) == b""
    assert ask(dns_netns, name)[0] == Rcode.NOERROR
    assert ask(dns_netns, name, tcp=True)[0] == Rcode.NOERROR
