"""The hashes in front of the tries answer as the longest-prefix match would, also when they
are full and entries stay in the trie: the kernel agrees with `ir.lookup` for every capacity."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import Shape
from stockade.datapath import maps
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import datapath

IN = Direction.INGRESS
POD = pk.addr("10.0.0.1")
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(POD, 1),),
    classes=(
        ir.ClassEntry(ipaddress.ip_network("10.0.0.7/32"), 5),
        ir.ClassEntry(ipaddress.ip_network("10.0.0.8/32"), 6),
        ir.ClassEntry(ipaddress.ip_network("10.0.0.0/8"), 6),
        ir.ClassEntry(ipaddress.ip_network("0.0.0.0/0"), 7),
    ),
    policy=(
        ir.PolicyEntry(1, IN, 64, 5, action=Action.DENY, rule_id=9),
        ir.PolicyEntry(1, IN, 96, 5, ir.PROTO_TCP, 80, rule_id=1),
        ir.PolicyEntry(1, IN, 90, 5, ir.PROTO_TCP, 1024, rule_id=2),
        ir.PolicyEntry(1, IN, 64, 6, action=Action.ALLOW, rule_id=3),
        ir.PolicyEntry(1, IN, 80, 6, ir.PROTO_TCP, action=Action.DENY, rule_id=4),
        ir.PolicyEntry(1, IN, 96, 6, ir.PROTO_TCP, 443, rule_id=5),
        ir.PolicyEntry(1, IN, 96, 7, ir.PROTO_UDP, 53, rule_id=6),
        ir.PolicyEntry(1, IN, 32, action=Action.DENY, rule_id=7),
    ),
)
REMOTES = ("10.0.0.7", "10.0.0.8", "10.1.2.3", "192.0.2.1")
PORTS = (
    (ir.PROTO_TCP, 80),
    (ir.PROTO_TCP, 1030),
    (ir.PROTO_TCP, 443),
    (ir.PROTO_TCP, 22),
    (ir.PROTO_UDP, 53),
    (ir.PROTO_UDP, 80),
)


@pytest.mark.parametrize("capacity", [1, 2, 3, 1 << 10], ids=lambda c: f"hashes of {c}")
def test_the_kernel_agrees_with_the_spec_whatever_the_hash_capacity(capacity: int) -> None:
    shape = Shape(conntrack=False, hosts_max=capacity, policy_exact_max=capacity)
    with datapath(shape) as dp:
        dp.write(TABLES)
        writer = dp.writer
        assert {n: len(writer.current(n)) for n in maps.TABLE_MAPS} == {
            "endpoints": 1,
            "peer_classes": 4,
            "policy": 8,
        }
        for remote in REMOTES:
            for proto, port in PORTS:
                packet = ir.Packet(pk.addr(remote), POD, proto, port)
                want = ir.lookup(TABLES, packet, IN).action
                got = dp.run(pk.packet_frame(packet), IN)
                assert got is (TcVerdict.DENY if want is Action.DENY else TcVerdict.ALLOW), (
                    remote,
                    proto,
                    port,
                )
