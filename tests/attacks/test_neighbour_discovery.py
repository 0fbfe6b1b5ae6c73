"""Attack: a pod sends ICMPv6 neighbour discovery and MLD messages that no on-link neighbour
would (CAP_NET_RAW is in every runtime's default set). Link control is never judged by policy,
so were these types passed whatever they look like, they would be a payload channel across
nodes into a pod whose policy refuses the sender, and a pod could advertise itself as a router.

Scenario (tests/bpf/agent_harness.py): `web` on node-1 admits only `client` on TCP 8080;
`client` and `other` live on node-2, routed to node-1. `other` sends to web's IPv6 address
neighbour solicitations and MLD reports carrying a payload, with the hop limit a routed packet
has (64, so 63 at web's hook: RFC 4861 wants 255 and RFC 3810 wants 1, which no router
forwards), and a router advertisement, and a neighbour advertisement from web's own address (hop
limit 255, as if on-link). With only web's node enforcing, web's hook drops the routed ones with
reason NOT_ON_LINK, where before they all reached web's interface. With both nodes enforcing,
`other`'s own hook drops them (NOT_ON_LINK), the router advertisement (NOT_A_ROUTER) and the
spoofed neighbour advertisement (SPOOFED). Real on-link neighbour discovery still works: IPv6
between the pods' kernels and their gateways needs it.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from stockade.compiler import ir
from stockade.datapath import packets as pk
from stockade.datapath.events import DropReason, EventKind, EventReader
from stockade.datapath.netns import NetnsExecutor
from stockade.sandbox.workloads.traffic import Outcome
from tests.attacks.node_agents import node_agent
from tests.bpf.agent_harness import Cluster, pin_root, probe_web, serving_scenario
from tests.fixtures.netns import MakeProcesses, MakeTopology

NS, RA, NA, MLD2_REPORT = 135, 134, 136, 143
ROUTED = (NS, MLD2_REPORT)
MESSAGES = 5  # of each routed type
MARK = b"stockade-covert-"


def _message(src: str, dst: str, icmp_type: int, n: int, hop_limit: int) -> bytes:
    source, target = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    payload = MARK + bytes([icmp_type, n])
    body = pk.icmp_message(source, target, icmp_type, 0, b"\0\0\0\0", target.packed + payload)
    return pk.ipv6(source, target, ir.PROTO_ICMPV6, body, hop_limit=hop_limit)


def _send(packets: list[bytes], dst: str) -> None:
    """From inside a pod: the IPv6 packets as they are (IPPROTO_RAW: the header is ours)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for packet in packets:
            raw.sendto(packet, (dst, 0))


def _seen(capture: socket.socket) -> set[tuple[int, int]]:
    """(ICMPv6 type, number) of the marked messages that reached web's interface."""
    seen: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 0.5
    capture.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            frame = capture.recv(2048)
        except TimeoutError:
            continue
        ip6 = frame[14:]
        at = ip6.find(MARK)
        if len(ip6) >= 40 and ip6[6] == ir.PROTO_ICMPV6 and at > 0:
            seen.add((ip6[at + len(MARK)], ip6[at + len(MARK) + 1]))
    return seen


def _attack(cluster: Cluster) -> set[tuple[int, int]]:
    """What of other's crafted link control reached web's interface."""
    topo = cluster.topo
    web, other = topo.pods["demo/web"], topo.pods["demo/other"]
    packets = [_message(other.ip_v6, web.ip_v6, t, n, 64) for t in ROUTED for n in range(MESSAGES)]
    packets.append(_message("fe80::1", web.ip_v6, RA, 0, 255))
    packets.append(_message(web.ip_v6, web.ip_v6, NA, 0, 255))  # web's address: spoofed
    with (
        NetnsExecutor.named(web.netns) as in_web,
        NetnsExecutor.named(other.netns) as in_other,
    ):
        capture = in_web.run(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        with capture:
            in_web.run(capture.bind, (web.pod_ifname, 0))
            in_other.run(_send, packets, web.ip_v6)
            return _seen(capture)


def _reasons(reader: EventReader) -> list[DropReason]:
    return [e.reason for e in reader.poll(0) if e.kind is EventKind.DROP]


def test_neighbour_discovery_off_link_is_dropped_at_the_receivers_hook(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    _, cluster, procs = serving_scenario(topology, pod_processes)
    with pin_root() as root, node_agent(cluster, "node-1", root) as node1:
        assert node1.maps is not None
        reader = EventReader(node1.maps.fd("events"))
        try:
            reader.poll(0)
            assert _attack(cluster) == set()
            reasons = _reasons(reader)
        finally:
            reader.close()
        # the spoofed advertisement too: routed, it arrives with hop limit 254
        assert reasons.count(DropReason.NOT_ON_LINK) == len(ROUTED) * MESSAGES + 1
        assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}


def test_neighbour_discovery_off_link_is_dropped_at_the_senders_own_hook(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    _, cluster, procs = serving_scenario(topology, pod_processes)
    with (
        pin_root() as root1,
        pin_root() as root2,
        node_agent(cluster, "node-1", root1),
        node_agent(cluster, "node-2", root2) as node2,
    ):
        assert node2.maps is not None
        reader = EventReader(node2.maps.fd("events"))
        try:
            reader.poll(0)
            assert _attack(cluster) == set()
            reasons = _reasons(reader)
        finally:
            reader.close()
        assert reasons.count(DropReason.NOT_ON_LINK) == len(ROUTED) * MESSAGES
        assert reasons.count(DropReason.NOT_A_ROUTER) == 1
        assert reasons.count(DropReason.SPOOFED) == 1  # an advertisement from web's address
        assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
