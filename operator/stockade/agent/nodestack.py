"""The node's own stack in the tables: the addresses the node sends from toward its pods.

The lowering flags the node's addresses from its Node object (ClassFlag.LOCAL_NODE): traffic the
node's own stack sends from one of them skips ingress policy (bpf/policy.h), as kubelet probes
must. But on bridge and ptp CNIs the node reaches a pod from the CNI's gateway address, which no
Node object lists. The agent lists the addresses of the node's network namespace
(`datapath.iface.node_addresses`) and adds each as a host class entry with the flag, in the
class the tables give that address (so a policy that names it still sees its class).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from stockade.compiler import ir


def with_node_stack(tables: ir.NodeTables, addresses: Iterable[ir.IPAddress]) -> ir.NodeTables:
    """`tables` with every address of `addresses` flagged LOCAL_NODE as a host class entry;
    addresses of endpoints (pods) are never flagged."""
    pods = {ir.to_v6(e.address) for e in tables.endpoints}
    hosts = {
        ir.to_v6(e.network.network_address): i
        for i, e in enumerate(tables.classes)
        if e.network.prefixlen == e.network.max_prefixlen
    }
    classes = list(tables.classes)
    changed = False
    for address in addresses:
        if ir.to_v6(address) in pods:
            continue
        cls = ir.classify(tables, address)
        if cls is not None and cls.flags & ir.ClassFlag.LOCAL_NODE:
            continue
        entry = ir.ClassEntry(
            ipaddress.ip_network(address),
            cls.class_id if cls is not None else 0,
            (cls.flags if cls is not None else 0) | ir.ClassFlag.LOCAL_NODE,
        )
        at = hosts.get(ir.to_v6(address))
        if at is not None:
            classes[at] = entry
        else:
            classes.append(entry)
        changed = True
    return dataclasses.replace(tables, classes=tuple(classes)) if changed else tables
