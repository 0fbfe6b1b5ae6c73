"""Attack: a pod sends crafted IP fragments (CAP_NET_RAW is in every runtime's default set) to a
peer whose policy refuses it. Non-first fragments carry no ports, so a hook that judges packets
by their ports cannot judge them.

Scenario (tests/bpf/agent_harness.py): `web` on node-1 admits only `client` on TCP 8080; `client`
and `other` live on node-2. Each node runs the agent's sync on its own pins. `other` sends, over
the real veths and routes, whole fragmented datagrams to web:8080 (first fragment and the rest)
and orphan non-first fragments (no first fragment at all); `client` sends fragmented datagrams
to web:8080 too. With `fragments: PASS` (the default before TRACK) every non-first fragment of
`other`'s reaches web's interface unjudged: a peer the policy refuses puts its bytes into web's
reassembly queue (and into any packet socket there). With the default `fragments: TRACK`, none
does: the tails of denied datagrams drop at web's hook, following their first fragment's verdict
(REASON_FRAGMENT and the rule), and the orphans at `other`'s own hook (REASON_FRAGMENT, rule 0),
while every fragment of `client`'s datagrams still arrives.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.datapath import packets as pk
from stockade.datapath.events import DropReason, Event, EventKind, EventReader
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

DATAGRAMS = 5  # whole fragmented datagrams per sender, three fragments each
ORPHANS = 10  # non-first fragments of datagrams whose first fragment is never sent
CHUNK = 512
FIRST_ID, ORPHAN_ID, CLIENT_ID = 0x5100, 0x5200, 0x5300


def _fragments(src: str, dst: str, ident: int) -> list[bytes]:
    """The IPv4 fragments (of CHUNK bytes) of one TCP segment with 1,200 bytes of data to
    dst:8080, first fragment first."""
    source, target = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    segment = pk.tcp_segment(source, target, 40_000 + ident % 1000, PORT, pk.TCP_SYN, b"x" * 1200)
    chunks = [segment[i : i + CHUNK] for i in range(0, len(segment), CHUNK)]
    assert len(chunks) == 3
    return [
        pk.ipv4(
            source,
            target,
            socket.IPPROTO_TCP,
            chunk,
            fragment_offset=n * CHUNK,
            more_fragments=n < len(chunks) - 1,
            ident=ident,
        )
        for n, chunk in enumerate(chunks)
    ]


def _send(packets: list[bytes], dst: str) -> None:
    """From inside a pod: the IP packets as they are (IPPROTO_RAW: the header is ours)."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for packet in packets:
            raw.sendto(packet, (dst, 0))


def _seen(capture: socket.socket) -> set[tuple[str, int, int]]:
    """(source, identification, fragment offset) of the IPv4 fragments that reached web's
    interface (a set: a capture may see a frame more than once)."""
    seen: set[tuple[str, int, int]] = set()
    deadline = time.monotonic() + 0.5
    capture.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            frame = capture.recv(4096)
        except TimeoutError:
            continue
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            continue
        frag = int.from_bytes(ip[6:8], "big")
        if frag & 0x3FFF:  # a fragment: an offset or more to come
            src = socket.inet_ntoa(ip[12:16])
            seen.add((src, int.from_bytes(ip[4:6], "big"), (frag & 0x1FFF) * 8))
    return seen


def _attack(cluster: Cluster) -> set[tuple[str, int, int]]:
    """`other` sends whole fragmented datagrams and orphan tails to web:8080, `client` whole
    fragmented datagrams; what reached web's interface."""
    web, web_ip = cluster.topo.pods["demo/web"], cluster.ip("demo/web")
    other_ip, client_ip = cluster.ip("demo/other"), cluster.ip("demo/client")
    from_other = [f for i in range(DATAGRAMS) for f in _fragments(other_ip, web_ip, FIRST_ID + i)]
    from_other += [
        f for i in range(ORPHANS // 2) for f in _fragments(other_ip, web_ip, ORPHAN_ID + i)[1:]
    ]
    from_client = [
        f for i in range(DATAGRAMS) for f in _fragments(client_ip, web_ip, CLIENT_ID + i)
    ]
    with (
        NetnsExecutor.named(web.netns) as in_web,
        NetnsExecutor.named(cluster.topo.pods["demo/other"].netns) as in_other,
        NetnsExecutor.named(cluster.topo.pods["demo/client"].netns) as in_client,
    ):
        capture = in_web.run(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        with capture:
            in_web.run(capture.bind, (web.pod_ifname, 0))
            in_other.run(_send, from_other, web_ip)
            in_client.run(_send, from_client, web_ip)
            return _seen(capture)


def _whole(src: str, first_id: int) -> set[tuple[str, int, int]]:
    return {(src, first_id + i, n * CHUNK) for i in range(DATAGRAMS) for n in range(3)}


def _tails(src: str, first_id: int, count: int) -> set[tuple[str, int, int]]:
    return {(src, first_id + i, n * CHUNK) for i in range(count) for n in (1, 2)}


def _drops(reader: EventReader) -> list[Event]:
    return [e for e in reader.poll(0) if e.kind is EventKind.DROP]


def test_with_fragments_pass_a_refused_peers_fragments_reach_the_victim(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    # The attack is real: with the old default every non-first fragment passes unjudged.
    _, cluster, procs = serving_scenario(topology, pod_processes)
    shape = Shape(fragments=FragmentPolicy.PASS)
    with (
        pin_root() as root1,
        pin_root() as root2,
        node_agent(cluster, "node-1", root1, shape),
        node_agent(cluster, "node-2", root2, shape),
    ):
        assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
        seen = _attack(cluster)
    other, client = cluster.ip("demo/other"), cluster.ip("demo/client")
    from_other = {s for s in seen if s[0] == other}
    # the first fragments are judged and dropped; every tail gets through
    assert from_other == _tails(other, FIRST_ID, DATAGRAMS) | _tails(other, ORPHAN_ID, ORPHANS // 2)
    assert _whole(client, CLIENT_ID) <= seen


def test_with_fragments_track_no_fragment_of_a_refused_peer_reaches_the_victim(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    _, cluster, procs = serving_scenario(topology, pod_processes)
    shape = Shape()
    assert shape.fragments is FragmentPolicy.TRACK  # the default
    with (
        pin_root() as root1,
        pin_root() as root2,
        node_agent(cluster, "node-1", root1, shape) as node1,
        node_agent(cluster, "node-2", root2, shape) as node2,
    ):
        assert node1.maps is not None and node2.maps is not None
        reader1 = EventReader(node1.maps.fd("events"))
        reader2 = EventReader(node2.maps.fd("events"))
        try:
            reader1.poll(0)
            reader2.poll(0)
            seen = _attack(cluster)
            at_web, at_other = _drops(reader1), _drops(reader2)
        finally:
            reader1.close()
            reader2.close()
        assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
    other, client = cluster.ip("demo/other"), cluster.ip("demo/client")
    assert {s for s in seen if s[0] == other} == set()
    assert _whole(client, CLIENT_ID) <= seen  # an allowed fragmented datagram arrives whole
    # at web's hook: each denied first fragment by policy, its two tails following it
    policy = [
        e for e in at_web if e.reason is DropReason.POLICY and e.src == ipaddress.ip_address(other)
    ]
    tails = [e for e in at_web if e.reason is DropReason.FRAGMENT]
    assert len(policy) == DATAGRAMS
    assert len(tails) == 2 * DATAGRAMS
    assert {e.rule_id for e in tails} == {e.rule_id for e in policy} != {0}
    # at other's own hook: the orphans, which no first fragment precedes
    orphans = [e for e in at_other if e.reason is DropReason.FRAGMENT]
    assert len(orphans) == ORPHANS
    assert {e.rule_id for e in orphans} == {0}
