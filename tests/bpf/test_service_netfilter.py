"""Service traffic judged on the backend, on real parts: a node namespace routing a client pod and
two backend pods (veths), nftables DNAT rules like kube-proxy's (ClusterIP:80 -> backend:8080)
made in that namespace, stockade's veth programs on the three host-side veths and its netfilter
program linked at POST_ROUTING and LOCAL_IN, both families.

What it shows: the allowed backend answers through its ClusterIP (and the reply, un-DNATed to
the ClusterIP, passes the client's veth); the denied backend's first packet never leaves the
node toward its veth (an nftables counter after stockade's hook, on the backend's veth, stays
at 0) and nothing reaches its socket; the denial is counted for the deciding rule and reported
with the backend's real address; the flow is recorded in conntrack under the original tuple. A
third ClusterIP DNATed to the node's own address is judged at LOCAL_IN.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest

from stockade.agent import services
from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import attach as at
from stockade.datapath import events, maps
from stockade.datapath.events import EventKind
from tests.bpf import datapath_netns as netns
from tests.bpf.datapath_harness import Datapath, datapath

CLIENT, B1, B2 = 1, 2, 3  # endpoint ids
CLASS_B1, CLASS_B2, CLASS_CLIENT = 11, 12, 13
RULE_EGRESS_DEFAULT, RULE_EGRESS_B1 = 30, 31
RULE_INGRESS_DEFAULT, RULE_INGRESS_CLIENT = 40, 41
SVC_PORT, TARGET_PORT = 80, 8080


@dataclass(frozen=True)
class Family:
    name: str
    af: int
    gateway: str
    client: str
    b1: str
    b2: str
    vip1: str
    vip2: str
    vip3: str  # DNATed to the node's own address: judged at LOCAL_IN
    service_cidr: str
    host_bits: int
    nft: str  # nftables family keyword of addresses


V4 = Family(
    "ipv4",
    socket.AF_INET,
    "10.203.255.1",
    "10.203.0.2",
    "10.203.1.2",
    "10.203.1.3",
    "10.96.50.1",
    "10.96.50.2",
    "10.96.50.3",
    "10.96.0.0/16",
    32,
    "ip",
)
V6 = Family(
    "ipv6",
    socket.AF_INET6,
    "fd20:203::ffff",
    "fd20:203::2",
    "fd20:203:1::2",
    "fd20:203:1::3",
    "fd96:50::1",
    "fd96:50::2",
    "fd96:50::3",
    "fd96:50::/112",
    128,
    "ip6",
)
PODS = (("cli", "hc"), ("b1", "hb1"), ("b2", "hb2"))


def _addr(fam: Family, role: str) -> str:
    return {"cli": fam.client, "b1": fam.b1, "b2": fam.b2, "node": fam.gateway}[role]


def _nft_dnat(fam: Family) -> str:
    b1 = fam.b1 if fam.af == socket.AF_INET else f"[{fam.b1}]"
    b2 = fam.b2 if fam.af == socket.AF_INET else f"[{fam.b2}]"
    node = fam.gateway if fam.af == socket.AF_INET else f"[{fam.gateway}]"
    return f"""
table inet stksvc {{
  counter to_b2 {{ }}
  chain pre {{
    type nat hook prerouting priority -100;
    {fam.nft} daddr {fam.vip1} udp dport {SVC_PORT} dnat {fam.nft} to {b1}:{TARGET_PORT}
    {fam.nft} daddr {fam.vip2} udp dport {SVC_PORT} dnat {fam.nft} to {b2}:{TARGET_PORT}
    {fam.nft} daddr {fam.vip3} udp dport {SVC_PORT} dnat {fam.nft} to {node}:{TARGET_PORT}
  }}
  chain post {{
    type filter hook postrouting priority 200;
    oifname "hb2" udp dport {TARGET_PORT} counter name to_b2
  }}
}}
"""


def _no_dad(ns: str) -> None:
    """No duplicate address detection: link-local addresses are usable at once, so neighbour
    discovery works from the first packet."""
    for scope in ("default", "all"):
        netns.sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.{scope}.accept_dad=0")


@contextmanager
def service_node(fam: Family) -> Iterator[netns.Namespaces]:
    """`node` routes `cli`, `b1`, `b2` (each behind a veth, like the ptp CNI plugin) and DNATs
    the two ClusterIPs to the two backends."""
    with netns.namespaces() as spaces:
        node = spaces.add("node")
        _no_dad(node)
        flag = "-6 " if fam.af == socket.AF_INET6 else ""
        nodad = " nodad" if fam.af == socket.AF_INET6 else ""
        netns.sh(
            f"ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1",
            f"ip netns exec {node} sysctl -qw net.ipv6.conf.all.forwarding=1",
        )
        for role, host_if in PODS:
            pod = spaces.add(role)
            _no_dad(pod)
            ip = _addr(fam, role)
            netns.sh(
                f"ip -n {node} link add {host_if} type veth peer name eth0 netns {pod}",
                f"ip -n {node} addr add {fam.gateway}/{fam.host_bits} dev {host_if}{nodad}",
                f"ip -n {node} link set {host_if} up",
                f"ip -n {pod} addr add {ip}/{fam.host_bits} dev eth0{nodad}",
                f"ip -n {pod} link set eth0 up",
                f"ip {flag}-n {node} route add {ip}/{fam.host_bits} dev {host_if}",
                f"ip {flag}-n {pod} route add {fam.gateway}/{fam.host_bits} dev eth0",
                f"ip {flag}-n {pod} route add default via {fam.gateway} dev eth0",
            )
            netns.wait_carrier((node, host_if), (pod, "eth0"))
        subprocess.run(
            ["ip", "netns", "exec", node, "nft", "-f", "-"],
            input=_nft_dnat(fam),
            text=True,
            check=True,
            capture_output=True,
        )
        yield spaces


def _tables(fam: Family, egress: bool) -> ir.NodeTables:
    net = ipaddress.ip_network
    ep = ir.EndpointEntry
    if egress:  # the client may send to backend 1 only
        policy = (
            ir.PolicyEntry(
                CLIENT, Direction.EGRESS, 32, action=Action.DENY, rule_id=RULE_EGRESS_DEFAULT
            ),
            ir.PolicyEntry(
                CLIENT,
                Direction.EGRESS,
                96,
                CLASS_B1,
                ir.PROTO_UDP,
                TARGET_PORT,
                Action.ALLOW,
                RULE_EGRESS_B1,
            ),
        )
    else:  # backend 1 admits the client, backend 2 admits no one
        policy = (
            ir.PolicyEntry(
                B1, Direction.INGRESS, 32, action=Action.DENY, rule_id=RULE_INGRESS_DEFAULT
            ),
            ir.PolicyEntry(
                B2, Direction.INGRESS, 32, action=Action.DENY, rule_id=RULE_INGRESS_DEFAULT
            ),
            ir.PolicyEntry(
                B1,
                Direction.INGRESS,
                96,
                CLASS_CLIENT,
                ir.PROTO_UDP,
                TARGET_PORT,
                Action.ALLOW,
                RULE_INGRESS_CLIENT,
            ),
        )
    return ir.NodeTables(
        endpoints=(
            ep(ipaddress.ip_address(fam.client), CLIENT),
            ep(ipaddress.ip_address(fam.b1), B1),
            ep(ipaddress.ip_address(fam.b2), B2),
        ),
        classes=(
            ir.ClassEntry(net(f"{fam.b1}/{fam.host_bits}"), CLASS_B1),
            ir.ClassEntry(net(f"{fam.b2}/{fam.host_bits}"), CLASS_B2),
            ir.ClassEntry(net(f"{fam.client}/{fam.host_bits}"), CLASS_CLIENT),
        ),
        policy=policy,
        services=(ir.ServiceEntry(net(fam.service_cidr)),),
    )


@contextmanager
def enforced(spaces: netns.Namespaces, fam: Family, egress: bool) -> Iterator[Datapath]:
    """The three programs on the node, tables written, everything detached on exit."""
    node = spaces.run("node")
    with datapath(Shape(services=True)) as dp, ExitStack() as stack:
        assert dp.maps is not None
        dp.write(_tables(fam, egress))
        bindings = maps.Bindings(dp.maps)
        for (_, host_if), endpoint in zip(PODS, (CLIENT, B1, B2), strict=True):
            ifindex = spaces.ifindex("node", host_if)
            bindings.bind(ifindex, endpoint)
            for hook, point in (
                (Hook.FROM_POD, at.AttachPoint.INGRESS),
                (Hook.TO_POD, at.AttachPoint.EGRESS),
            ):
                pin = dp.pin_root / "links" / f"{host_if}-{point.name.lower()}"
                node.run(at.attach_tcx, ifindex, point, dp.program(hook).fd, pin)
                stack.callback(at.detach_tcx, pin)
        programs = {point: dp.program(hook).fd for point, hook in services.HOOK_PROGRAMS.items()}
        pins = node.run(at.attach_netfilter, programs, dp.pin_root / "links")
        for pin in pins:
            stack.callback(at.detach_netfilter, pin)
        yield dp


@contextmanager
def _udp(
    spaces: netns.Namespaces, role: str, fam: Family, port: int = 0
) -> Iterator[socket.socket]:
    sock = spaces.run(role).run(socket.socket, fam.af, socket.SOCK_DGRAM)
    try:
        sock.bind((_addr(fam, role), port))
        yield sock
    finally:
        sock.close()


def _exchange(spaces: netns.Namespaces, fam: Family, vip: str, backend: str) -> tuple[int, int]:
    """Send 3 datagrams from the client to vip:80; the backend echoes what it gets. Returns
    (datagrams the backend got, replies the client got from vip:80)."""
    with _udp(spaces, backend, fam, TARGET_PORT) as rx, _udp(spaces, "cli", fam) as tx:
        for i in range(3):
            tx.sendto(b"ping%d" % i, (vip, SVC_PORT))
        rx.settimeout(0.5)
        got = 0
        try:
            while True:
                data, peer = rx.recvfrom(2048)
                got += 1
                rx.sendto(data, peer)
        except TimeoutError:
            pass
        tx.settimeout(0.5)
        replies = 0
        try:
            while True:
                _, peer = tx.recvfrom(2048)
                assert ipaddress.ip_address(peer[0]) == ipaddress.ip_address(vip)
                assert peer[1] == SVC_PORT
                replies += 1
        except TimeoutError:
            pass
        return got, replies


def _to_b2(spaces: netns.Namespaces) -> int:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            spaces.ns("node"),
            "nft",
            "-j",
            "list",
            "counter",
            "inet",
            "stksvc",
            "to_b2",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise AssertionError(f"no counter in {out}")


def _ip(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


FAMILIES = [pytest.param(V4, id="ipv4"), pytest.param(V6, id="ipv6")]


@pytest.mark.parametrize("fam", FAMILIES)
def test_without_stockade_both_backends_answer_through_their_clusterip(fam: Family) -> None:
    with service_node(fam) as spaces:
        assert _exchange(spaces, fam, fam.vip1, "b1") == (3, 3)
        assert _exchange(spaces, fam, fam.vip2, "b2") == (3, 3)
        assert _to_b2(spaces) == 3
        assert _exchange(spaces, fam, fam.vip3, "node") == (3, 3)


@pytest.mark.parametrize("fam", FAMILIES)
def test_egress_through_a_clusterip_is_judged_on_the_backend_it_reaches(fam: Family) -> None:
    with service_node(fam) as spaces, enforced(spaces, fam, egress=True) as dp:
        assert dp.maps is not None
        # default deny egress plus an allow to backend 1: the ClusterIP itself matches no peer
        assert _exchange(spaces, fam, fam.vip1, "b1") == (3, 3)
        assert _exchange(spaces, fam, fam.vip2, "b2") == (0, 0)
        assert _to_b2(spaces) == 0  # not one packet went out toward backend 2's veth
        drops = [e for e in dp.events() if e.kind is EventKind.DROP]
        # a backend in the node's own namespace: judged at LOCAL_IN, denied by the default
        assert _exchange(spaces, fam, fam.vip3, "node") == (0, 0)
        to_node = [e for e in dp.events() if e.kind is EventKind.DROP]
        assert {(e.rule_id, str(e.dst), e.dport) for e in to_node} == {
            (RULE_EGRESS_DEFAULT, str(ipaddress.ip_address(fam.gateway)), TARGET_PORT)
        }
        counted = events.read_counters(
            dp.maps.fd("counters"), [RULE_EGRESS_DEFAULT, RULE_EGRESS_B1]
        )
        assert counted[RULE_EGRESS_B1].packets == 1  # the first packet, judged once, after DNAT
        assert counted[RULE_EGRESS_DEFAULT].packets == 6  # each datagram of the denied flows
        assert len(drops) == 3
        assert {(e.rule_id, e.endpoint_id, e.direction) for e in drops} == {
            (RULE_EGRESS_DEFAULT, CLIENT, Direction.EGRESS)
        }
        assert {(str(e.src), str(e.dst), e.dport) for e in drops} == {
            (str(ipaddress.ip_address(fam.client)), str(ipaddress.ip_address(fam.b2)), TARGET_PORT)
        }
        flows = {(_ip(c.daddr), c.dport, c.direction) for c in maps.conntrack_entries(dp.maps)}
        assert (str(ipaddress.ip_address(fam.vip1)), SVC_PORT, Direction.EGRESS) in flows
        assert not any(dst == str(ipaddress.ip_address(fam.vip2)) for dst, _, _ in flows)


@pytest.mark.parametrize("fam", FAMILIES)
def test_ingress_of_a_local_backend_is_judged_before_its_veth(fam: Family) -> None:
    with service_node(fam) as spaces, enforced(spaces, fam, egress=False) as dp:
        assert dp.maps is not None
        assert _exchange(spaces, fam, fam.vip1, "b1") == (3, 3)
        assert _exchange(spaces, fam, fam.vip3, "node") == (3, 3)  # LOCAL_IN, replies pass
        assert _exchange(spaces, fam, fam.vip2, "b2") == (0, 0)
        assert _to_b2(spaces) == 0
        drops = [e for e in dp.events() if e.kind is EventKind.DROP]
        assert drops and {(e.rule_id, e.endpoint_id, e.direction) for e in drops} == {
            (RULE_INGRESS_DEFAULT, B2, Direction.INGRESS)
        }
        counted = events.read_counters(dp.maps.fd("counters"), [RULE_INGRESS_CLIENT])
        assert (
            counted[RULE_INGRESS_CLIENT].packets == 1
        )  # judged at netfilter, not again at the veth
