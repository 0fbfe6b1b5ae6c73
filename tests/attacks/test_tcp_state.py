"""Attack: a pod crafts TCP segments (CAP_NET_RAW is in every runtime's default set) to shape
conntrack entries. Without TCP state, a bare ACK makes an entry with the six-hour established
timeout, a SYN in the reverse direction of a recorded flow passes as its reply, and one forged
RST switches an entry to the closing timeout for good.

Scenario (tests/bpf/agent_harness.py): `web` on node-1 admits only `client` on TCP 8080; `client`
and `other` live on node-2. Both nodes run the agent's sync on their own pins.
- Reverse SYN: web sends a SYN from port 45000 to other:9000 (its egress is open). other then
  sends a bare SYN from 9000 to web:45000: a new connection toward web, which web's policy
  refuses. Matched against the reversed tuple it used to pass web's hook as a reply; now it is
  judged and dropped (reason policy).
- Bare ACK: other sends a bare ACK to web:12345. other's egress is open, so its node records
  the flow, but no answer comes (web's ingress drops it): the entry must keep the short timeout.
- Forged RST: client holds a real connection to web:8080; an RST with the connection's ports
  and a wrong sequence number (web's kernel ignores it) reaches web's hook. The connection goes
  on; its entry must be back on the established timeout after the next segment.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from stockade.compiler import abi
from stockade.datapath import maps
from stockade.datapath import packets as pk
from stockade.datapath.events import DropReason, EventKind, EventReader
from stockade.datapath.netns import NetnsExecutor
from tests.attacks.node_agents import node_agent
from tests.bpf.agent_harness import PORT, pin_root, serving_scenario
from tests.fixtures.netns import MakeProcesses, MakeTopology

WEB_PORT, OTHER_PORT, ACK_PORT = 45_000, 9_000, 12_345


def _send(src: str, dst: str, sport: int, dport: int, flags: int) -> None:
    """From inside a pod: one crafted TCP segment."""
    source, target = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    segment = pk.tcp_segment(source, target, sport, dport, flags)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(pk.ipv4(source, target, socket.IPPROTO_TCP, segment), (dst, 0))


def _syns_seen(capture: socket.socket, src: str, sport: int, dport: int) -> int:
    seen = 0
    deadline = time.monotonic() + 0.5
    capture.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            frame = capture.recv(2048)
        except TimeoutError:
            continue
        ip = frame[14:]
        if len(ip) >= 40 and ip[9] == socket.IPPROTO_TCP and ip[12:16] == socket.inet_aton(src):
            ports = (int.from_bytes(ip[20:22], "big"), int.from_bytes(ip[22:24], "big"))
            if ports == (sport, dport) and ip[33] & pk.TCP_SYN:
                seen += 1
    return seen


def _entry(node: maps.PinnedMaps, src: str, sport: int, dport: int) -> maps.ConntrackEntry:
    packed = ipaddress.ip_address(src).packed
    (entry,) = [
        e
        for e in maps.conntrack_entries(node)
        if e.saddr[-4:] == packed and (e.sport, e.dport) == (sport, dport)
    ]
    return entry


def test_a_reverse_syn_is_judged_not_passed_as_a_reply(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, _ = serving_scenario(topology, pod_processes)
    web, other = topo.pods["demo/web"], topo.pods["demo/other"]
    with (
        pin_root() as root1,
        pin_root() as root2,
        node_agent(cluster, "node-1", root1) as node1,
        node_agent(cluster, "node-2", root2),
        NetnsExecutor.named(web.netns) as in_web,
        NetnsExecutor.named(other.netns) as in_other,
    ):
        assert node1.maps is not None
        in_web.run(_send, web.ip_v4, other.ip_v4, WEB_PORT, OTHER_PORT, pk.TCP_SYN)
        assert _entry(node1.maps, web.ip_v4, WEB_PORT, OTHER_PORT)  # web's flow is recorded
        reader = EventReader(node1.maps.fd("events"))
        capture = in_web.run(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        try:
            reader.poll(0)
            with capture:
                in_web.run(capture.bind, (web.pod_ifname, 0))
                in_other.run(_send, other.ip_v4, web.ip_v4, OTHER_PORT, WEB_PORT, pk.TCP_SYN)
                seen = _syns_seen(capture, other.ip_v4, OTHER_PORT, WEB_PORT)
            drops = [
                e
                for e in reader.poll(0)
                if e.kind is EventKind.DROP and (e.sport, e.dport) == (OTHER_PORT, WEB_PORT)
            ]
        finally:
            reader.close()
        assert seen == 0
        assert [e.reason for e in drops] == [DropReason.POLICY]


def test_a_bare_ack_gets_no_established_timeout(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, _ = serving_scenario(topology, pod_processes)
    web, other = topo.pods["demo/web"], topo.pods["demo/other"]
    with (
        pin_root() as root1,
        pin_root() as root2,
        node_agent(cluster, "node-1", root1),
        node_agent(cluster, "node-2", root2) as node2,
        NetnsExecutor.named(other.netns) as in_other,
    ):
        assert node2.maps is not None
        in_other.run(_send, other.ip_v4, web.ip_v4, ACK_PORT, PORT + 1, pk.TCP_ACK)
        time.sleep(0.2)  # an answer, were there one
        entry = _entry(node2.maps, other.ip_v4, ACK_PORT, PORT + 1)
        assert entry.closing  # the short timeout: nothing answered
        assert not entry.tcp & abi.CT_TCP_REPLIED


def test_a_forged_rst_does_not_shorten_a_live_connection(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, _ = serving_scenario(topology, pod_processes)
    web, client = topo.pods["demo/web"], topo.pods["demo/client"]
    with (
        pin_root() as root1,
        node_agent(cluster, "node-1", root1) as node1,
        NetnsExecutor.named(client.netns) as in_client,
    ):
        assert node1.maps is not None
        conn = in_client.run(socket.create_connection, (web.ip_v4, PORT), 2.0)
        with conn:
            conn.settimeout(2.0)
            sport = conn.getsockname()[1]
            conn.sendall(b"one")
            assert conn.recv(16) == b"one"
            assert not _entry(node1.maps, client.ip_v4, sport, PORT).closing
            in_client.run(_send, client.ip_v4, web.ip_v4, sport, PORT, pk.TCP_RST)
            assert _entry(node1.maps, client.ip_v4, sport, PORT).closing  # for now
            conn.sendall(b"two")
            assert conn.recv(16) == b"two"
            assert not _entry(node1.maps, client.ip_v4, sport, PORT).closing  # undone
