"""The agent flags the addresses of the node's own stack (a CNI gateway) as the local node."""

from __future__ import annotations

import ipaddress

from stockade.agent.nodestack import with_node_stack
from stockade.compiler import ir

NODE, GATEWAY, POD = (ipaddress.ip_address(a) for a in ("172.18.0.11", "10.244.1.1", "10.244.1.2"))
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(POD, 1),),
    classes=(
        ir.ClassEntry(ipaddress.ip_network("10.0.0.0/8"), 3),
        ir.ClassEntry(ipaddress.ip_network(f"{NODE}/32"), 4, ir.ClassFlag.LOCAL_NODE),
    ),
    policy=(),
)


def test_a_gateway_joins_its_class_with_the_local_node_flag() -> None:
    tables = with_node_stack(TABLES, [NODE, GATEWAY, POD])
    got = ir.classify(tables, GATEWAY)
    assert got == ir.ClassEntry(ipaddress.ip_network(f"{GATEWAY}/32"), 3, ir.ClassFlag.LOCAL_NODE)
    assert ir.classify(tables, POD) == TABLES.classes[0]  # a pod's address is never the node's
    assert ir.classify(tables, NODE) == TABLES.classes[1]
    assert len(tables.classes) == 3


def test_known_addresses_change_nothing() -> None:
    assert with_node_stack(TABLES, [NODE]) is TABLES


def test_a_host_entry_of_a_policy_keeps_its_class() -> None:
    named = ir.ClassEntry(ipaddress.ip_network(f"{GATEWAY}/32"), 7)
    tables = ir.NodeTables(TABLES.endpoints, (*TABLES.classes, named), ())
    got = ir.classify(with_node_stack(tables, [GATEWAY]), GATEWAY)
    assert got is not None and (got.class_id, got.flags) == (7, ir.ClassFlag.LOCAL_NODE)
