"""On a real veth: a frame with two 802.1Q tags of VLAN ID 0 around a datagram to a denied port,
sent from the pod with an AF_PACKET socket, is delivered as IP by the kernel when nothing
judges it (the kernel strips VLAN ID 0 tags), and is dropped with reason UNPARSED by the
from-pod program of a shape that does not parse VLANs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import attach as at
from stockade.datapath import events
from tests.bpf import datapath_netns as netns
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import datapath

DENIED_PORT = 9999
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(ipaddress.ip_address(netns.POD_IP), 1),),
    classes=(ir.ClassEntry(ipaddress.ip_network(f"{netns.NODE_IP}/32"), 3),),
    policy=(ir.PolicyEntry(1, Direction.EGRESS, 96, 3, ir.PROTO_UDP, DENIED_PORT, Action.DENY, 7),),
)


@pytest.fixture
def pod() -> Iterator[netns.Namespaces]:
    with netns.routed_pod() as spaces:
        yield spaces


def _mac(ifname: str) -> bytes:
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifname=ifname)
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def _double_tagged_datagram(spaces: netns.Namespaces, seq: int) -> bytes:
    src, dst = pk.addr(netns.POD_IP), pk.addr(netns.NODE_IP)
    datagram = pk.ipv4(
        src,
        dst,
        ir.PROTO_UDP,
        pk.udp_datagram(src, dst, 40000, DENIED_PORT, struct.pack("!I", seq)),
    )
    frame = spaces.run("node").run(_mac, "vh0") + spaces.run("pod").run(_mac, "vp0")
    frame += struct.pack("!H", pk.ETH_P_IP) + datagram
    return pk.tagged(frame, (pk.ETH_P_8021Q, pk.ETH_P_8021Q), vid=0)


def _send_raw(frames: list[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind(("vp0", 0))
        for frame in frames:
            raw.send(frame)


def _delivered(spaces: netns.Namespaces, count: int = 5) -> int:
    """Send `count` double-tagged datagrams from the pod; how many the node's socket got."""
    frames = [_double_tagged_datagram(spaces, i) for i in range(count)]
    with netns.udp_socket(spaces.run("node"), (netns.NODE_IP, DENIED_PORT)) as rx:
        spaces.run("pod").run(_send_raw, frames)
        return len(netns.drain(rx, 0.3))


def test_the_kernel_delivers_a_double_tagged_vlan_0_frame_as_ip(pod: netns.Namespaces) -> None:
    assert _delivered(pod) == 5


def test_a_double_tagged_vlan_0_frame_is_dropped_unjudged_on_a_real_veth(
    pod: netns.Namespaces,
) -> None:
    with datapath(Shape(vlan=False)) as dp:
        dp.write(TABLES)
        ifindex = pod.ifindex("node", "vh0")
        pin = dp.pin_root / "links" / "vh0-ingress"
        prog = dp.program(Hook.FROM_POD)
        pod.run("node").run(at.attach_tcx, ifindex, at.AttachPoint.INGRESS, prog.fd, pin)
        dp.events()
        assert _delivered(pod) == 0
        got = [e for e in dp.events() if e.ifindex == ifindex]
        assert got
        assert {(e.kind, e.reason) for e in got} == {
            (events.EventKind.DROP, events.DropReason.UNPARSED)
        }
        assert at.detach_tcx(pin)
