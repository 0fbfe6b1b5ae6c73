"""Rule tables for the datapath benchmark (bench/datapath.py).

The policy: one pod (the server, 10.0.0.1 on node n1) and a standard NetworkPolicy that selects it
with N ingress rules, rule i allowing TCP and UDP port 5201 from the /32 ipBlock 10.128.0.0 + i.

Up to LOWERED_MAX rules the tables come from the real lowering (`lower_node`). The lowering is
superlinear in rules of one endpoint (1,000 rules take about 30 s here), so larger tables are
built by `synthetic()`, which writes the entries the lowering writes for this policy (per rule a
host class, a /64 isolation entry and a /96 allow entry per protocol; the two default routes
and the node's own address).
`check_synthetic()` proves the two agree at LOWERED_MAX rules: same entry counts by prefix length
and the same `ir.lookup` verdicts for the benchmark's packets.
`RawEntry` and `RawTables` (map entries as bytes) carry `with_peer_entries()`'s million peer
classes; the datapath scale test (tests/bpf/test_datapath_scale.py) builds its tables with them too.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from dataclasses import dataclass

from stockade.compiler import abi, ir
from stockade.compiler.lower import lower_node
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.parse import parse_policy

SERVER = ipaddress.IPv4Address("10.0.0.1")
PEER_BASE = int(ipaddress.IPv4Address("10.128.0.0"))
OUTSIDER = ipaddress.IPv4Address("10.250.0.9")  # in no rule: the isolation default drops it
PORT = 5201
LOWERED_MAX = 100
STATE = ClusterState(
    [Namespace("bench")],
    [Pod("bench", "server", {}, (SERVER,), "n1")],
    [Node("n1", (ipaddress.IPv4Address("172.18.0.11"),))],
)


def peer(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(PEER_BASE + i)


def policy_object(n: int) -> dict[str, object]:
    ports = [{"protocol": "TCP", "port": PORT}, {"protocol": "UDP", "port": PORT}]
    rules = [{"from": [{"ipBlock": {"cidr": f"{peer(i)}/32"}}], "ports": ports} for i in range(n)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": rules},
    }


def lowered(n: int) -> ir.NodeTables:
    return lower_node(STATE, [parse_policy(policy_object(n))], "n1").tables


def synthetic(n: int) -> ir.NodeTables:
    """The tables `lowered(n)` gives, built directly (ids differ, structure and verdicts agree)."""
    isolation = n + 1  # rule id of the policy's isolation default
    node = ipaddress.ip_network("172.18.0.11/32")
    classes = [
        ir.ClassEntry(ipaddress.ip_network("0.0.0.0/0"), 1),
        ir.ClassEntry(ipaddress.ip_network("::/0"), 2),  # no IPv6 on the pod: no entries
        ir.ClassEntry(node, 3, ir.ClassFlag.LOCAL_NODE),
    ]
    ingress = ir.Direction.INGRESS
    policy = [
        ir.PolicyEntry(1, ingress, 64, 1, action=ir.Action.DENY, rule_id=isolation),
        # the node's addresses are judged by policy: only the node's own packets are exempt,
        # by the class flag in the datapath (bpf/policy.h)
        ir.PolicyEntry(1, ingress, 64, 3, action=ir.Action.DENY, rule_id=isolation),
    ]
    for i in range(n):
        cid = i + 4
        classes.append(ir.ClassEntry(ipaddress.ip_network(f"{peer(i)}/32"), cid))
        policy.append(
            ir.PolicyEntry(
                1, ir.Direction.INGRESS, 64, cid, action=ir.Action.DENY, rule_id=isolation
            )
        )
        for proto in (ir.PROTO_TCP, ir.PROTO_UDP):
            policy.append(
                ir.PolicyEntry(
                    1, ir.Direction.INGRESS, 96, cid, proto, PORT, ir.Action.ALLOW, rule_id=i + 1
                )
            )
    return ir.NodeTables((ir.EndpointEntry(SERVER, 1),), tuple(classes), tuple(policy))


def tables(n: int) -> ir.NodeTables:
    return lowered(n) if n <= LOWERED_MAX else synthetic(n)


def packets(n: int) -> dict[str, ir.Packet]:
    """match_first: from the first rule's peer to the allowed port; no_match: from an address
    in no rule (dropped by the isolation default)."""
    return {
        "match_first": ir.Packet(peer(0), SERVER, ir.PROTO_TCP, PORT),
        "match_last": ir.Packet(peer(n - 1), SERVER, ir.PROTO_TCP, PORT),
        "no_match": ir.Packet(OUTSIDER, SERVER, ir.PROTO_TCP, PORT),
    }


def _shape_of(t: ir.NodeTables) -> Counter[tuple[int, int, int]]:
    return Counter((e.prefixlen, e.protocol, int(e.action)) for e in t.policy)


def check_synthetic(n: int = LOWERED_MAX) -> None:
    real, synth = lowered(n), synthetic(n)
    if _shape_of(real) != _shape_of(synth) or len(real.classes) != len(synth.classes):
        raise AssertionError(f"synthetic tables differ from the lowering's at {n} rules")
    for name, packet in packets(n).items():
        want = ir.lookup(real, packet, ir.Direction.INGRESS).action
        got = ir.lookup(synth, packet, ir.Direction.INGRESS).action
        if want != got:
            raise AssertionError(f"{name}: lowering says {want}, synthetic tables {got}")


@dataclass(frozen=True)
class RawEntry:
    """A map entry as bytes, for tables too large for a dataclass per entry."""

    k: bytes
    v: bytes

    def key(self) -> bytes:
        return self.k

    def value(self) -> bytes:
        return self.v


@dataclass(frozen=True)
class RawTables:
    endpoints: tuple[RawEntry, ...]
    classes: tuple[RawEntry, ...]
    policy: tuple[RawEntry, ...]


def with_peer_entries(base: ir.NodeTables, count: int) -> RawTables:
    """`base` plus `count` host classes (pod addresses of one peer set, 10.64.0.0 up)."""
    start = int(ipaddress.IPv4Address("10.64.0.0"))
    mapped = b"\0" * 10 + b"\xff\xff"
    cid = max(e.class_id for e in base.classes) + 1
    value = abi.CLASS_VALUE.pack(cid, 0)
    extra = tuple(
        RawEntry(
            abi.CLASS_KEY.pack(abi.CLASS_KEY_BITS, mapped + struct.pack("!I", start + i)), value
        )
        for i in range(count)
    )

    def raw(
        entries: tuple[ir.EndpointEntry, ...]
        | tuple[ir.ClassEntry, ...]
        | tuple[ir.PolicyEntry, ...],
    ) -> tuple[RawEntry, ...]:
        return tuple(RawEntry(e.key(), e.value()) for e in entries)

    allow = ir.PolicyEntry(
        1, ir.Direction.INGRESS, 96, cid, ir.PROTO_TCP, PORT, ir.Action.ALLOW, rule_id=60_000
    )
    return RawTables(
        raw(base.endpoints), raw(base.classes) + extra, raw(base.policy) + raw((allow,))
    )


def peer_set_member(count: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.64.0.0")) + count // 2)
