"""Peer classes: a node's remote address space cut into regions that policy cannot tell apart.

Two remote addresses are in the same class when every peer that any policy of the node's
endpoints names (pod sets, CIDRs with `except`, node selectors) contains both or neither, their
named ports agree where egress rules name ports, and both or neither are the node's own. Then no
rule can treat them differently, so one policy entry per class is exact.

The classes become the `peer_classes` LPM trie: every CIDR and `except` of a peer, each pod and
node address whose class differs from the region around it, and the two default routes (::/0 and
::ffff:0:0/96). The longest prefix containing an address gives its class; for a CIDR region that
means "the addresses of this prefix outside every longer prefix in the trie", which is what
`_region_signature` computes. Called by `stockade.compiler.lower`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace

from stockade.model.cluster import ClusterState
from stockade.model.matching import peer_matches
from stockade.model.policy import AnyPeer, CidrPeer, IPAddress, IPNetwork, Peer, Protocol

# (family, membership per peer, named ports of the remote pod, is the local node)
Signature = tuple[int, tuple[bool, ...], tuple[tuple[str, int, str], ...], bool]

DEFAULT_ROUTES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


@dataclass(frozen=True)
class Region:
    """One trie prefix, its signature, and an address that the prefix decides (or None)."""

    network: IPNetwork
    signature: Signature
    representative: IPAddress | None


def _contains_net(outer: IPNetwork, inner: IPNetwork) -> bool:
    return outer.version == inner.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _region_signature(network: IPNetwork, peers: Sequence[Peer]) -> tuple[bool, ...]:
    """Membership of the generic point of a CIDR region: only address blocks can contain it.

    A CIDR peer contains the region when its block contains the whole prefix and no `except`
    does; a longer prefix inside the region is its own trie entry, so it does not count here.
    """
    out: list[bool] = []
    for peer in peers:
        if isinstance(peer, CidrPeer):
            out.append(
                _contains_net(peer.cidr, network)
                and not any(_contains_net(e, network) for e in peer.excepts)
            )
        else:
            out.append(False)  # pod sets and node selectors hold single addresses only
    return tuple(out)


def _named_ports(
    state: ClusterState, address: IPAddress, names: frozenset[str]
) -> tuple[tuple[str, int, str], ...]:
    pod = state.pod_at(address)
    if pod is None or not names:
        return ()
    return tuple(
        (name, number, proto.value)
        for name, (number, proto) in sorted(pod.named_ports.items())
        if name in names
    )


def _representative(network: IPNetwork, children: list[IPNetwork]) -> IPAddress | None:
    """The first address of `network` outside every longer prefix in `children`, if any."""
    candidate = int(network.network_address)
    last = int(network.broadcast_address)
    spans = sorted(
        (int(c.network_address), int(c.broadcast_address))
        for c in children
        if c != network and _contains_net(network, c)
    )
    for start, end in spans:
        if start > candidate:
            break
        candidate = max(candidate, end + 1)
    if candidate > last:
        return None
    return (
        ipaddress.ip_address(candidate)
        if network.version == 4
        else ipaddress.IPv6Address(candidate)
    )


def build_regions(
    state: ClusterState,
    node: str,
    peers: Sequence[Peer],
    egress_port_names: frozenset[str],
) -> list[Region]:
    """Every trie prefix for one node with its signature (see the module docstring)."""
    peers = [p for p in peers if not isinstance(p, AnyPeer)]
    local_ips = set(state.node_ips(node))
    hosts: set[IPAddress] = set(local_ips)
    hosts.update(ip for pod in state.pods if not pod.host_network for ip in pod.ips)
    hosts.update(ip for n in state.nodes.values() for ip in n.ips)
    prefixes: set[IPNetwork] = set(DEFAULT_ROUTES)
    for peer in peers:
        if isinstance(peer, CidrPeer):
            prefixes.add(peer.cidr)
            prefixes.update(peer.excepts)
    prefixes.update(ipaddress.ip_network(h) for h in hosts)
    ordered = sorted(prefixes, key=lambda n: (n.version, n.prefixlen, int(n.network_address)))

    regions: list[Region] = []
    kept: dict[IPNetwork, int] = {}  # network -> index in regions
    lengths: dict[int, set[int]] = {4: set(), 6: set()}  # prefix lengths kept, per family
    for net in ordered:
        address = net.network_address
        if net.prefixlen == net.max_prefixlen and address in hosts:
            signature: Signature = (
                address.version,
                tuple(peer_matches(p, address, state) for p in peers),
                _named_ports(state, address, egress_port_names),
                address in local_ips,
            )
            region = Region(net, signature, address)
        else:
            signature = (net.version, _region_signature(net, peers), (), False)
            region = Region(net, signature, _representative(net, ordered))
        around = _enclosing(kept, lengths[net.version], net)
        if around is not None and regions[around].signature == signature:
            # The prefix around it already says the same; its addresses fall to that prefix.
            if regions[around].representative is None and region.representative is not None:
                regions[around] = replace(regions[around], representative=region.representative)
            continue
        kept[net] = len(regions)
        lengths[net.version].add(net.prefixlen)
        regions.append(region)
    return regions


def _enclosing(kept: dict[IPNetwork, int], lengths: set[int], net: IPNetwork) -> int | None:
    """The index of the longest kept region strictly containing `net`: one dict look-up per
    prefix length in use, so a node with many pod addresses stays linear."""
    for length in sorted((n for n in lengths if n < net.prefixlen), reverse=True):
        found = kept.get(net.supernet(new_prefix=length))
        if found is not None:
            return found
    return None


def protocols_for(version: int) -> tuple[Protocol, ...]:
    icmp = Protocol.ICMP if version == 4 else Protocol.ICMPV6
    return (Protocol.TCP, Protocol.UDP, Protocol.SCTP, icmp)
