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

import heapq
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from stockade.model.cluster import ClusterState
from stockade.model.policy import (
    CidrPeer,
    IPAddress,
    IPNetwork,
    NodePeer,
    Peer,
    PodPeer,
    Protocol,
)

# (family, indices of the peers that contain it, named ports of the remote pod, is the local node)
Signature = tuple[int, tuple[int, ...], tuple[tuple[str, int, str], ...], bool]

DEFAULT_ROUTES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)

_OrderKey = tuple[int, int, int]


def _order(net: IPNetwork) -> _OrderKey:
    """Trie order: family, then shorter prefixes first, then by address."""
    return (net.version, net.prefixlen, int(net.network_address))


def _host_network(address: IPAddress) -> IPNetwork:
    if address.version == 4:
        return ipaddress.IPv4Network((int(address), 32))
    return ipaddress.IPv6Network((int(address), 128))


@dataclass(frozen=True)
class Region:
    """One trie prefix, its signature, and an address that the prefix decides (or None)."""

    network: IPNetwork
    signature: Signature
    representative: IPAddress | None


class Addresses:
    """What every node's regions share in one state: the member addresses of each pod and node
    peer (found through the state's label indexes, cached per peer) and the pods by named port."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self._members: dict[Peer, frozenset[IPAddress]] = {}
        self._named: dict[str, set[IPAddress]] | None = None

    def members(self, peer: PodPeer | NodePeer) -> frozenset[IPAddress]:
        found = self._members.get(peer)
        if found is None:
            if isinstance(peer, PodPeer):
                pods = self.state.index.pods_in(peer.pods)
                found = frozenset(ip for pod in pods for ip in pod.ips)
            else:
                found = frozenset(
                    ip
                    for node in self.state.nodes.values()
                    if peer.selector.matches(node.labels)
                    for ip in node.ips
                )
            self._members[peer] = found
        return found

    def hits(
        self, peers: Sequence[Peer], hosts: Iterable[IPAddress]
    ) -> dict[IPAddress, tuple[int, ...]]:
        """Host address -> indices (ascending) of the `peers` that contain it, for every member
        of a pod or node peer and every address of `hosts`: membership in CIDR peers included,
        whatever made the host stand out (a host that a named port or the local node singles
        out keeps the CIDR peers around it). Any other address has the signature of the CIDR
        region around it."""
        found: dict[IPAddress, list[int]] = {address: [] for address in hosts}
        for i, peer in enumerate(peers):
            if isinstance(peer, PodPeer | NodePeer):
                for address in self.members(peer):
                    found.setdefault(address, []).append(i)
        cidrs = [(i, p) for i, p in enumerate(peers) if isinstance(p, CidrPeer)]
        for address, indices in found.items():
            indices.extend(i for i, p in cidrs if p.contains(address))
        return {address: tuple(sorted(indices)) for address, indices in found.items()}

    def region_inputs(
        self, node: str, peers: Sequence[Peer], egress_port_names: frozenset[str]
    ) -> tuple[object, ...]:
        """Everything `build_regions` reads for these arguments, as a comparable value."""
        return (
            tuple(self.members(p) if isinstance(p, PodPeer | NodePeer) else p for p in peers),
            tuple(
                sorted(
                    ((a.version, int(a)), _named_ports(self.state, a, egress_port_names))
                    for a in self.named(egress_port_names)
                )
            ),
            self.state.node_ips(node),
        )

    def named(self, names: frozenset[str]) -> set[IPAddress]:
        """The addresses of the pods with a named port called one of `names`."""
        if self._named is None:
            self._named = {}
            for pod in self.state.pods:
                if not pod.host_network:
                    for name in pod.named_ports:
                        self._named.setdefault(name, set()).update(pod.ips)
        return {ip for name in names for ip in self._named.get(name, ())}


def _contains_net(outer: IPNetwork, inner: IPNetwork) -> bool:
    return outer.version == inner.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _region_signature(network: IPNetwork, peers: Sequence[Peer]) -> tuple[int, ...]:
    """Membership of the generic point of a CIDR region: only address blocks can contain it.

    A CIDR peer contains the region when its block contains the whole prefix and no `except`
    does; a longer prefix inside the region is its own trie entry, so it does not count here.
    """
    return tuple(
        i
        for i, peer in enumerate(peers)
        if isinstance(peer, CidrPeer)
        and _contains_net(peer.cidr, network)
        and not any(_contains_net(e, network) for e in peer.excepts)
    )


def _named_ports(
    state: ClusterState, address: IPAddress, names: frozenset[str]
) -> tuple[tuple[str, int, str], ...]:
    pod = state.pod_at(address) if names else None
    if pod is None:
        return ()
    return tuple(
        (name, number, proto.value)
        for name, (number, proto) in sorted(pod.named_ports.items())
        if name in names
    )


def _representative(
    key: _OrderKey, network: IPNetwork, ordered: list[tuple[_OrderKey, IPNetwork]]
) -> IPAddress | None:
    """The first address of `network` (at `key` in `ordered`) outside every longer prefix in
    `ordered`, if any."""
    version, prefixlen, first = key
    bits = network.max_prefixlen
    last = first + (1 << (bits - prefixlen)) - 1
    # Longer prefixes inside the network, as [start, end] spans in address order; the walk stops
    # at the first gap, which on a real network comes after a handful of spans.
    spans = sorted(
        (start, start + (1 << (bits - length)) - 1)
        for (v, length, start), _ in ordered
        if v == version and length > prefixlen and first <= start <= last
    )
    candidate = first
    for start, end in spans:
        if start > candidate:
            break
        candidate = max(candidate, end + 1)
    if candidate > last:
        return None
    return ipaddress.IPv4Address(candidate) if version == 4 else ipaddress.IPv6Address(candidate)


def build_regions(
    addresses: Addresses,
    node: str,
    peers: Sequence[Peer],
    egress_port_names: frozenset[str],
) -> list[Region]:
    """Every trie prefix for one node with its signature (see the module docstring)."""
    state = addresses.state
    local_ips = set(state.node_ips(node))
    # Only a host in a pod or node peer, with a named port that egress rules name, or of the
    # local node can differ from the region around it; any other host falls to that region.
    hits = addresses.hits(peers, addresses.named(egress_port_names) | local_ips)
    hosts = set(hits)
    extra: set[IPNetwork] = set(DEFAULT_ROUTES)
    for peer in peers:
        if isinstance(peer, CidrPeer):
            extra.add(peer.cidr)
            extra.update(peer.excepts)
    extra_ordered = sorted(
        (_order(n), n)
        for n in extra
        if not (n.prefixlen == n.max_prefixlen and n.network_address in hosts)
    )
    ordered = list(
        heapq.merge(
            extra_ordered,
            sorted((_order(n), n) for n in map(_host_network, hosts)),
        )
    )

    regions: list[Region] = []
    kept: dict[_OrderKey, int] = {}  # trie prefix -> index in regions
    lengths: dict[int, set[int]] = {4: set(), 6: set()}  # prefix lengths kept, per family
    for key, net in ordered:
        address = net.network_address
        if net.prefixlen == net.max_prefixlen and address in hosts:
            signature: Signature = (
                address.version,
                hits[address],
                _named_ports(state, address, egress_port_names),
                address in local_ips,
            )
            region = Region(net, signature, address)
        else:
            signature = (net.version, _region_signature(net, peers), (), False)
            region = Region(net, signature, _representative(key, net, ordered))
        around = _enclosing(kept, lengths[net.version], key, net.max_prefixlen)
        if around is not None and regions[around].signature == signature:
            # The prefix around it already says the same; its addresses fall to that prefix.
            if regions[around].representative is None and region.representative is not None:
                regions[around] = replace(regions[around], representative=region.representative)
            continue
        kept[key] = len(regions)
        lengths[net.version].add(net.prefixlen)
        regions.append(region)
    return regions


def _enclosing(
    kept: dict[_OrderKey, int], lengths: set[int], key: _OrderKey, bits: int
) -> int | None:
    """The index of the longest kept region strictly containing the prefix `key`: one dict
    look-up per prefix length in use, so a node with many pod addresses stays linear."""
    version, prefixlen, start = key
    for length in sorted((n for n in lengths if n < prefixlen), reverse=True):
        mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
        found = kept.get((version, length, start & mask))
        if found is not None:
            return found
    return None


def protocols_for(version: int) -> tuple[Protocol, ...]:
    icmp = Protocol.ICMP if version == 4 else Protocol.ICMPV6
    return (Protocol.TCP, Protocol.UDP, Protocol.SCTP, icmp)
