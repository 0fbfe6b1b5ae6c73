"""Masqueraded Service flows into a local backend, on real parts, with generated policies.

kube-proxy masquerades a hairpin (a pod reaching itself through its own Service) and, in most
set-ups, a NodePort: the backend's veth then sees the flow from the node's address. stockade
judges the backend's ingress on the client as it really is (the netfilter program before SNAT),
and the program after SNAT (`stockade_service_nat`) moves the backend's conntrack entry to the
tuple the backend sees. Without that move the backend's veth judged the node's address and
refused what the policy allows.

A node namespace routes a client pod `cli` and a backend pod `b1`, with nftables rules like
kube-proxy's: one Service address DNATed to `cli` itself and masqueraded (the hairpin), one to
`b1` and masqueraded (a NodePort, or kube-proxy's masqueradeAll), one to `b1` as it is. The
generated tables give each pod, in each direction, no policy or a default deny with allow rules
drawn from the client, the backend and the node's address, on the target port or another one,
UDP, TCP or any protocol. For every Service address and both protocols the outcome must be the
composition that `tests/bpf/test_service_differential.py` checks on test runs (egress of the
client toward the backend, then the backend's ingress from the client: `ir.lookup`, the spec
that tests/unit/test_lower_differential.py ties to the reference evaluator), whatever the
masquerade; a policy change that keeps the flow allowed keeps a UDP flow passing (it is judged
again on the real client); the events name the deciding rules only.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.abi import ClassFlag
from stockade.compiler.ir import Action, Direction
from stockade.datapath import maps
from stockade.datapath.events import EventKind
from tests.bpf import datapath_netns as netns
from tests.bpf.datapath_harness import Datapath
from tests.bpf.test_service_differential import expected
from tests.bpf.test_service_netfilter import (
    CLIENT,
    FAMILIES,
    SVC_PORT,
    TARGET_PORT,
    Family,
    enforced,
    service_node,
)
from tests.fixtures.scenarios import examples

B1 = 2
CLASS_CLIENT, CLASS_B1, CLASS_NODE = 13, 11, 14
OTHER_PORT = 9090
MARK_MASQ = 0x4000  # kube-proxy's masquerade mark
PROTOCOLS = {ir.PROTO_UDP: "udp", ir.PROTO_TCP: "tcp"}
# written between two rounds of a UDP flow: a policy write (the epoch moves) that changes no
# verdict, so the flow is judged again and must stay allowed
UNRELATED = ir.PolicyEntry(99, Direction.EGRESS, 32, action=Action.DENY, rule_id=999)


@dataclasses.dataclass(frozen=True)
class Route:
    """A Service address of the node: where DNAT sends it, and whether it is masqueraded."""

    name: str
    vip: str
    backend: str  # a pod role
    masquerade: bool


def routes(fam: Family) -> tuple[Route, ...]:
    prefix = fam.vip1[:-1]  # the family's test Service addresses end in one digit
    return (
        Route("hairpin", f"{prefix}7", "cli", True),
        Route("masqueraded", f"{prefix}8", "b1", True),
        Route("plain", f"{prefix}9", "b1", False),
    )


def _addr(fam: Family, role: str) -> str:
    return {"cli": fam.client, "b1": fam.b1, "node": fam.gateway}[role]


def _nft(fam: Family) -> str:
    """kube-proxy's shape: DNAT at prerouting, the masquerade mark set there, masquerade at
    srcnat (100) for marked packets."""
    lines = []
    for r in routes(fam):
        backend = _addr(fam, r.backend)
        to = backend if fam.af == socket.AF_INET else f"[{backend}]"
        mark = f"meta mark set {MARK_MASQ:#x} " if r.masquerade else ""
        lines.append(
            f"{fam.nft} daddr {r.vip} meta l4proto {{ tcp, udp }} th dport {SVC_PORT} "
            f"{mark}dnat {fam.nft} to {to}:{TARGET_PORT}"
        )
    rules = "\n    ".join(lines)
    return f"""
table inet stkmasq {{
  chain pre {{
    type nat hook prerouting priority -100;
    {rules}
  }}
  chain post {{
    type nat hook postrouting priority 100;
    meta mark & {MARK_MASQ:#x} == {MARK_MASQ:#x} masquerade
  }}
}}
"""


@contextmanager
def masquerading_node(fam: Family) -> Iterator[netns.Namespaces]:
    with service_node(fam) as spaces:
        subprocess.run(
            ["ip", "netns", "exec", spaces.ns("node"), "nft", "-f", "-"],
            input=_nft(fam),
            text=True,
            check=True,
            capture_output=True,
        )
        yield spaces


PEERS = {"cli": CLASS_CLIENT, "b1": CLASS_B1, "node": CLASS_NODE}


@st.composite
def side(draw: st.DrawFn, endpoint: int, direction: Direction) -> tuple[ir.PolicyEntry, ...]:
    """One endpoint's policy in one direction: none, or a default deny and allow rules."""
    if draw(st.integers(0, 3)) == 0:  # most sides have a policy: it is what they test
        return ()
    rule = 100 + 10 * endpoint + 5 * int(direction is Direction.INGRESS)
    entries = [ir.PolicyEntry(endpoint, direction, 32, action=Action.DENY, rule_id=rule)]
    allowed = draw(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(PEERS)),
                st.sampled_from([0, ir.PROTO_UDP, ir.PROTO_TCP]),
                st.sampled_from([TARGET_PORT, OTHER_PORT]),
            ),
            max_size=3,
            unique=True,
        )
    )
    # the class alone (prefix 64), or class, protocol and port (96)
    keys = sorted({(peer, proto, port if proto else 0) for peer, proto, port in allowed})
    for i, (peer, proto, port) in enumerate(keys, start=1):
        entries.append(
            ir.PolicyEntry(
                endpoint,
                direction,
                64 if proto == 0 else 96,
                PEERS[peer],
                proto,
                port,
                Action.ALLOW,
                rule + i,
            )
        )
    return tuple(entries)


@st.composite
def policies(draw: st.DrawFn) -> tuple[ir.PolicyEntry, ...]:
    return tuple(
        entry
        for endpoint in (CLIENT, B1)
        for direction in (Direction.EGRESS, Direction.INGRESS)
        for entry in draw(side(endpoint, direction))
    )


def tables(fam: Family, policy: tuple[ir.PolicyEntry, ...]) -> ir.NodeTables:
    net = ipaddress.ip_network
    return ir.NodeTables(
        endpoints=(
            ir.EndpointEntry(ipaddress.ip_address(fam.client), CLIENT),
            ir.EndpointEntry(ipaddress.ip_address(fam.b1), B1),
        ),
        classes=(
            ir.ClassEntry(net(f"{fam.client}/{fam.host_bits}"), CLASS_CLIENT),
            ir.ClassEntry(net(f"{fam.b1}/{fam.host_bits}"), CLASS_B1),
            ir.ClassEntry(net(f"{fam.gateway}/{fam.host_bits}"), CLASS_NODE, ClassFlag.LOCAL_NODE),
        ),
        policy=policy,
        services=(ir.ServiceEntry(net(fam.service_cidr)),),
    )


@contextmanager
def _server(spaces: netns.Namespaces, fam: Family, role: str, kind: int) -> Iterator[socket.socket]:
    sock = spaces.run(role).run(socket.socket, fam.af, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_addr(fam, role), TARGET_PORT))
        if kind == socket.SOCK_STREAM:
            sock.listen(8)
        sock.settimeout(0.3)
        yield sock
    finally:
        sock.close()


def _udp_rounds(
    spaces: netns.Namespaces,
    fam: Family,
    route: Route,
    rounds: int,
    between: Callable[[], object],
) -> list[bool]:
    """One client socket, `rounds` request/answer rounds through `route`; whether each was
    answered. `between` runs after the first round."""
    out = []
    with _server(spaces, fam, route.backend, socket.SOCK_DGRAM) as rx:
        tx = spaces.run("cli").run(socket.socket, fam.af, socket.SOCK_DGRAM)
        try:
            tx.bind((fam.client, 0))
            tx.settimeout(0.3)
            for i in range(rounds):
                if i == 1:
                    between()
                tx.sendto(b"ping", (route.vip, SVC_PORT))
                try:
                    data, peer = rx.recvfrom(64)
                    rx.sendto(data, peer)
                    _, answered_by = tx.recvfrom(64)
                    assert ipaddress.ip_address(answered_by[0]) == ipaddress.ip_address(route.vip)
                    out.append(True)
                except TimeoutError:
                    out.append(False)
        finally:
            tx.close()
    return out


def _tcp_connects(spaces: netns.Namespaces, fam: Family, route: Route) -> bool:
    with _server(spaces, fam, route.backend, socket.SOCK_STREAM) as listener:
        client = spaces.run("cli").run(socket.socket, fam.af, socket.SOCK_STREAM)
        try:
            client.settimeout(0.5)
            code = client.connect_ex((route.vip, SVC_PORT))
            if code != 0:
                assert code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ETIMEDOUT), code
                return False
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"x")
                return client.recv(1) == b"x"
        except TimeoutError:
            return False
        finally:
            client.close()


def _ip(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.IPv6Address(raw)
    return addr.ipv4_mapped or addr


def _forget(dp: Datapath) -> None:
    assert dp.maps is not None
    maps.flush_conntrack(dp.maps)


@pytest.fixture(scope="module", params=FAMILIES)
def node(request: pytest.FixtureRequest) -> Iterator[tuple[Family, netns.Namespaces, Datapath]]:
    fam: Family = request.param
    with masquerading_node(fam) as spaces, enforced(spaces, fam, egress=True) as dp:
        yield fam, spaces, dp


@settings(max_examples=examples(15), deadline=None)
@given(policy=policies())
def test_a_masqueraded_flow_into_a_local_backend_is_judged_on_the_real_client(
    node: tuple[Family, netns.Namespaces, Datapath], policy: tuple[ir.PolicyEntry, ...]
) -> None:
    fam, spaces, dp = node
    written = tables(fam, policy)
    dp.write(written)
    _forget(dp)
    dp.events()
    addresses = {"cli": fam.client, "b1": fam.b1}
    for route in routes(fam):
        backend = ipaddress.ip_address(addresses[route.backend])
        client = ipaddress.ip_address(fam.client)
        for proto, name in PROTOCOLS.items():
            probe = ir.Packet(client, backend, proto, TARGET_PORT)
            action, seen = expected(written, probe)
            why = f"{route.name} {name}: expected {action.name}"
            if proto == ir.PROTO_UDP:
                changed = dataclasses.replace(written, policy=(*policy, UNRELATED))
                got = _udp_rounds(spaces, fam, route, 2, partial(dp.write, changed))
                assert got == [action is Action.ALLOW] * 2, why
            else:
                assert _tcp_connects(spaces, fam, route) is (action is Action.ALLOW), why
            events = {(e.kind, e.rule_id) for e in dp.events()}
            assert events == set(seen), why
            assert all(kind in (EventKind.DROP, EventKind.AUDIT) for kind, _ in events)


def test_an_allowed_hairpin_passes_and_its_entry_is_where_the_backend_sees_it(
    node: tuple[Family, netns.Namespaces, Datapath],
) -> None:
    """The case seen in the sandbox: a pod whose ingress admits itself reaching itself through
    its Service; the node's address, which kube-proxy masquerades it to, is not admitted."""
    fam, spaces, dp = node
    assert dp.maps is not None
    policy = (
        ir.PolicyEntry(CLIENT, Direction.INGRESS, 32, action=Action.DENY, rule_id=50),
        ir.PolicyEntry(CLIENT, Direction.INGRESS, 64, CLASS_CLIENT, 0, 0, Action.ALLOW, 51),
    )
    dp.write(tables(fam, policy))
    _forget(dp)
    dp.events()
    hairpin = routes(fam)[0]
    changed = tables(fam, (*policy, UNRELATED))
    assert _udp_rounds(spaces, fam, hairpin, 2, lambda: dp.write(changed)) == [True, True]
    assert _tcp_connects(spaces, fam, hairpin)
    assert dp.events() == []
    node_address = ipaddress.ip_address(fam.gateway)
    ingress = {
        (_ip(c.saddr), c.dport, c.protocol, c.rule_id)
        for c in maps.conntrack_entries(dp.maps)
        if c.direction == Direction.INGRESS
    }
    # the backend's entries are under the masqueraded source, none under the client's own
    assert {(src, port, rule) for src, port, _, rule in ingress} == {
        (node_address, TARGET_PORT, 51)
    }
    assert {proto for *_, proto, _ in ingress} == {ir.PROTO_UDP, ir.PROTO_TCP}
    # a policy that no longer admits the client cuts the flow, though it never named the node
    deny = tables(fam, policy[:1])
    assert _udp_rounds(spaces, fam, hairpin, 2, lambda: dp.write(deny)) == [True, False]
    assert {(e.kind, e.rule_id) for e in dp.events()} == {(EventKind.DROP, 50)}
