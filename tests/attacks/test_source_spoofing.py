"""Attack: a pod sends with another pod's source address (CAP_NET_RAW is in every runtime's default
set), to borrow that pod's standing with a policy, or to plant a conntrack entry.

Scenario (tests/bpf/agent_harness.py): `web` on node-1 admits only `client` on TCP 8080; `client`
and `other` live on node-2. Each node runs the agent's sync on its own pins. `other` crafts TCP
SYNs from `client`'s address to web:8080. Were they let out, web's ingress hook would judge them
as client's and pass them. The binding of each pod's interface to its endpoint stops them at
other's own hook: dropped with reason SPOOFED, before conntrack, so no entry is planted, while
the real client still connects.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from stockade.datapath import maps
from stockade.datapath import packets as pk
from stockade.datapath.events import DropReason, EventKind, EventReader
from stockade.datapath.netns import NetnsExecutor
from stockade.sandbox.workloads.traffic import Outcome
from tests.attacks.node_agents import node_agent
from tests.bpf.agent_harness import (
    PORT,
    Cluster,
    pin_root,
    probe_web,
    serving_scenario,
)
from tests.fixtures.netns import MakeProcesses, MakeTopology

SYNS = 20
ATTACKER_PORT = 40_404


def _send_spoofed_syns(src: str, dst: str) -> None:
    """From inside the attacking pod: raw IPv4 TCP SYNs whose source is `src`."""
    source, target = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for seq in range(SYNS):
            segment = pk.tcp_segment(source, target, ATTACKER_PORT + seq, PORT, pk.TCP_SYN)
            raw.sendto(pk.ipv4(source, target, socket.IPPROTO_TCP, segment), (dst, 0))


def _syns_seen(capture: socket.socket, src: str) -> int:
    """SYNs from `src` to web:8080 that reached web's interface (by source port: a capture
    may see a frame more than once)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 0.5
    capture.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            frame = capture.recv(2048)
        except TimeoutError:
            continue
        ip = frame[14:]
        if len(ip) >= 40 and ip[9] == socket.IPPROTO_TCP and ip[12:16] == socket.inet_aton(src):
            sport, dport = int.from_bytes(ip[20:22], "big"), int.from_bytes(ip[22:24], "big")
            if dport == PORT and ATTACKER_PORT <= sport < ATTACKER_PORT + SYNS:
                seen.add(sport)
    return len(seen)


def _attack(cluster: Cluster) -> int:
    """How many of other's SYNs, spoofed from client's address, reached web."""
    web = cluster.topo.pods["demo/web"]
    with (
        NetnsExecutor.named(web.netns) as in_web,
        NetnsExecutor.named(cluster.topo.pods["demo/other"].netns) as in_other,
    ):
        capture = in_web.run(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        with capture:
            in_web.run(capture.bind, (web.pod_ifname, 0))
            in_other.run(_send_spoofed_syns, cluster.ip("demo/client"), cluster.ip("demo/web"))
            return _syns_seen(capture, cluster.ip("demo/client"))


def test_source_spoofing_without_the_binding_reaches_the_victim(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    # The attack is real: with only web's node enforcing (no hook on other's interface), web's
    # ingress judges the SYNs as client's and lets them in.
    _, cluster, procs = serving_scenario(topology, pod_processes)
    with pin_root() as root, node_agent(cluster, "node-1", root):
        assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
        assert _attack(cluster) == SYNS


def test_source_spoofing_is_dropped_at_the_senders_own_interface(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes)
    with (
        pin_root() as root1,
        pin_root() as root2,
        node_agent(cluster, "node-1", root1),
        node_agent(cluster, "node-2", root2) as node2,
    ):
        assert node2.maps is not None
        bound = maps.Bindings(node2.maps).read()
        assert len(bound) == 2  # client's and other's interfaces, each to its own endpoint
        reader = EventReader(node2.maps.fd("events"))
        try:
            reader.poll(0)
            assert _attack(cluster) == 0
            spoofed = [
                e
                for e in reader.poll(0)
                if (e.kind, e.reason) == (EventKind.DROP, DropReason.SPOOFED)
            ]
        finally:
            reader.close()
        assert len(spoofed) == SYNS
        other_if = topo.pods["demo/other"].host_ifname
        other_index = NetnsExecutor.named(topo.node("node-2").netns)
        with other_index:
            assert {e.ifindex for e in spoofed} == {
                other_index.run(socket.if_nametoindex, other_if)
            }
        client = ipaddress.ip_address(cluster.ip("demo/client")).packed
        planted = [
            c
            for c in maps.conntrack_entries(node2.maps)
            if c.saddr[-4:] == client and ATTACKER_PORT <= c.sport < ATTACKER_PORT + SYNS
        ]
        assert planted == []  # dropped before conntrack: nothing to pass as a reply later
        assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
