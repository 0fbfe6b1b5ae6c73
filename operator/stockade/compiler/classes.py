"""Peer classes: a node's remote address space cut into regions that policy cannot tell apart.

Two remote addresses are in the same class when every rule of the node's endpoints' policies
matches both or neither by its peers (a rule matches when any of its peers, pod sets, CIDRs with
`except` or node selectors, contains the address: rules with the same peers are one peer group),
their named ports agree where egress rules name ports, and both or neither are the node's own.
Then no rule can treat them differently, so one policy entry per class is exact; and a rule with a
few hundred ipBlocks is one class, not one per block, so the policy entries stay linear in the
rule's size (`stockade.compiler.lower`).

The classes become the `peer_classes` LPM trie: every CIDR and `except` of a peer, each pod and
node address whose class differs from the region around it, and the two default routes (::/0 and
::ffff:0:0/96). The longest prefix containing an address gives its class; for a CIDR region that
means "the addresses of this prefix outside every longer prefix in the trie", which is what
`_region_signature` computes. Called by `stockade.compiler.lower`.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from stockade.compiler.membership import Membership
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

# (family, indices of the peer groups that contain it, named ports of the remote pod, is the local
# node)
Signature = tuple[int, tuple[int, ...], tuple[tuple[str, int, str], ...], bool]

DEFAULT_ROUTES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)

_OrderKey = tuple[int, int, int]


def _order(net: IPNetwork) -> _OrderKey:
    """Trie order: family, then shorter prefixes first, then by address."""
    return (net.version, net.prefixlen, int(net.network_address))


# address -> its host prefix. Building an ipaddress network takes microseconds, and every node's
# regions hold each address its peers' sets hold: at 10,000 pods and 100 nodes, two million
# times per whole lowering. Cleared when full, so it never holds more than HOST_NETWORKS.
HOST_NETWORKS = 1 << 17
_host_networks: dict[IPAddress, IPNetwork] = {}


def _host_network(address: IPAddress) -> IPNetwork:
    found = _host_networks.get(address)
    if found is None:
        if len(_host_networks) >= HOST_NETWORKS:
            _host_networks.clear()
        if address.version == 4:
            found = ipaddress.IPv4Network((int(address), 32))
        else:
            found = ipaddress.IPv6Network((int(address), 128))
        _host_networks[address] = found
    return found


@dataclass(frozen=True)
class Region:
    """One trie prefix, its signature, and an address that the prefix decides (or None)."""

    network: IPNetwork
    signature: Signature
    representative: IPAddress | None


class Addresses:
    """What every node's regions share in one state: the member addresses of each pod and node
    peer (found through the state's label indexes, cached per peer) and the pods by named port."""

    def __init__(self, state: ClusterState, membership: Membership | None = None) -> None:
        """`membership`, when given, has been updated to `state` and answers pod sets."""
        self.state = state
        self._membership = membership
        self._members: dict[Peer, frozenset[IPAddress]] = {}
        self._named: dict[str, set[IPAddress]] | None = None

    def members(self, peer: PodPeer | NodePeer) -> frozenset[IPAddress]:
        found = self._members.get(peer)
        if found is None:
            if isinstance(peer, PodPeer):
                pods = (
                    self._membership.pods_in(self.state, peer.pods)
                    if self._membership is not None
                    else self.state.index.pods_in(peer.pods)
                )
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
        cidrs = CidrIndex(peers)
        if not cidrs:  # each list is ascending already: one index per peer that holds it
            return {address: tuple(indices) for address, indices in found.items()}
        for address, indices in found.items():
            indices.extend(cidrs.containing(_host_network(address), address))
        return {address: tuple(sorted(set(indices))) for address, indices in found.items()}

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


class CidrIndex:
    """The CIDR peers of a peer list by block: the peers whose block contains a prefix are found
    with one dict look-up per prefix length in use, not a scan of every peer, so that a rule
    with thousands of ipBlocks costs linear time to cut into regions."""

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._blocks: dict[tuple[int, int, int], list[int]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}
        self._peers = peers
        for i, peer in enumerate(peers):
            if isinstance(peer, CidrPeer):
                net = peer.cidr
                key = (net.version, net.prefixlen, int(net.network_address))
                self._blocks.setdefault(key, []).append(i)
        for version, length, _ in self._blocks:
            if length not in self._lengths[version]:
                self._lengths[version].append(length)

    def __bool__(self) -> bool:
        """Whether any peer is a CIDR peer."""
        return bool(self._blocks)

    def containing(self, network: IPNetwork, address: IPAddress | None = None) -> list[int]:
        """Indices (ascending) of the CIDR peers that contain `network` whole and none of whose
        `except`s contains it (for a host, `address`: the peer contains the address)."""
        bits, start = network.max_prefixlen, int(network.network_address)
        out: list[int] = []
        for length in self._lengths[network.version]:
            if length > network.prefixlen:
                continue
            mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
            for i in self._blocks.get((network.version, length, start & mask), ()):
                peer = self._peers[i]
                assert isinstance(peer, CidrPeer)
                if address is not None:
                    if peer.contains(address):
                        out.append(i)
                elif not any(_contains_net(e, network) for e in peer.excepts):
                    out.append(i)
        return sorted(out)


def _region_signature(network: IPNetwork, cidrs: CidrIndex) -> tuple[int, ...]:
    """Membership of the generic point of a CIDR region: only address blocks can contain it.

    A CIDR peer contains the region when its block contains the whole prefix and no `except`
    does; a longer prefix inside the region is its own trie entry, so it does not count here.
    """
    return tuple(cidrs.containing(network))


def peer_groups(
    rules_peers: Iterable[Sequence[Peer]], index: Mapping[Peer, int]
) -> list[frozenset[int]]:
    """The distinct peer sets of the rules (each as indices, by `index`, of the peers), in
    first-seen order: a rule matches an address when any of its peers contains it, so two
    addresses that every peer set holds both or neither of are the same to every rule."""
    seen: dict[frozenset[int], None] = {}
    for rule_peers in rules_peers:
        if rule_peers:
            seen.setdefault(frozenset(index[p] for p in rule_peers), None)
    return list(seen)


def _grouped(indices: tuple[int, ...], groups: Sequence[frozenset[int]] | None) -> tuple[int, ...]:
    if groups is None:
        return indices
    inside = set(indices)
    return tuple(g for g, members in enumerate(groups) if not members.isdisjoint(inside))


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


class _Prefixes:
    """The trie prefixes by (family, length) -> their starts, to find the first address of a
    prefix outside every longer one without scanning the whole list per prefix."""

    def __init__(self, ordered: list[tuple[_OrderKey, IPNetwork]]) -> None:
        self._starts: dict[tuple[int, int], set[int]] = {}
        for (version, length, start), _ in ordered:
            self._starts.setdefault((version, length), set()).add(start)

    def representative(self, key: _OrderKey, network: IPNetwork) -> IPAddress | None:
        """The first address of `network` (at `key`) outside every longer prefix, if any: walk
        from the first address, past the longest prefix that holds the candidate, until none
        does; each step passes one prefix."""
        version, prefixlen, first = key
        bits = network.max_prefixlen
        last = first + (1 << (bits - prefixlen)) - 1
        lengths = sorted(n for (v, n) in self._starts if v == version and n > prefixlen)
        candidate = first
        moved = True
        while moved and candidate <= last:
            moved = False
            for length in lengths:  # the shortest first: it skips the most
                mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
                start = candidate & mask
                if start in self._starts[(version, length)]:
                    candidate = start + (1 << (bits - length))
                    moved = True
                    break
        if candidate > last:
            return None
        if version == 4:
            return ipaddress.IPv4Address(candidate)
        return ipaddress.IPv6Address(candidate)


def build_regions(
    addresses: Addresses,
    node: str,
    peers: Sequence[Peer],
    egress_port_names: frozenset[str],
    groups: Sequence[frozenset[int]] | None = None,
) -> list[Region]:
    """Every trie prefix for one node with its signature (see the module docstring); with
    `groups` (`peer_groups`), a signature holds the indices of the groups that contain the
    region, else those of the peers."""
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

    cidrs = CidrIndex(peers)
    prefixes = _Prefixes(ordered)
    # the peers' indices -> the groups' (the hosts of one workload share one: asked once)
    grouped: dict[tuple[int, ...], tuple[int, ...]] = {}
    regions: list[Region] = []
    kept: dict[_OrderKey, int] = {}  # trie prefix -> index in regions
    # prefix lengths kept, per family, longest first
    lengths: dict[int, list[int]] = {4: [], 6: []}
    for key, net in ordered:
        address = net.network_address
        if net.prefixlen == net.max_prefixlen and address in hosts:
            indices = hits[address]
            in_groups = grouped.get(indices)
            if in_groups is None:
                in_groups = grouped[indices] = _grouped(indices, groups)
            signature: Signature = (
                address.version,
                in_groups,
                _named_ports(state, address, egress_port_names),
                address in local_ips,
            )
            region = Region(net, signature, address)
        else:
            signature = (net.version, _grouped(_region_signature(net, cidrs), groups), (), False)
            region = Region(net, signature, prefixes.representative(key, net))
        around = _enclosing(kept, lengths[net.version], key, net.max_prefixlen)
        if around is not None and regions[around].signature == signature:
            # The prefix around it already says the same; its addresses fall to that prefix.
            if regions[around].representative is None and region.representative is not None:
                regions[around] = replace(regions[around], representative=region.representative)
            continue
        kept[key] = len(regions)
        if net.prefixlen not in lengths[net.version]:
            lengths[net.version].append(net.prefixlen)
            lengths[net.version].sort(reverse=True)
        regions.append(region)
    return regions


def _enclosing(
    kept: dict[_OrderKey, int], lengths: list[int], key: _OrderKey, bits: int
) -> int | None:
    """The index of the longest kept region strictly containing the prefix `key`: one dict
    look-up per prefix length in use (`lengths`, longest first), so a node with many pod
    addresses stays linear."""
    version, prefixlen, start = key
    for length in lengths:
        if length >= prefixlen:
            continue
        mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
        found = kept.get((version, length, start & mask))
        if found is not None:
            return found
    return None


def protocols_for(version: int) -> tuple[Protocol, ...]:
    icmp = Protocol.ICMP if version == 4 else Protocol.ICMPV6
    return (Protocol.TCP, Protocol.UDP, Protocol.SCTP, icmp)
