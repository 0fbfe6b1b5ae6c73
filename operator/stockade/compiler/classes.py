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
from typing import NamedTuple

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
_BITS = {4: 32, 6: 128}  # address bits per family


def _order(net: IPNetwork) -> _OrderKey:
    """Trie order: family, then shorter prefixes first, then by address."""
    return (net.version, net.prefixlen, int(net.network_address))


# (family, address as an integer) -> its host prefix. Building an ipaddress network takes
# microseconds, and every node's regions hold each address its peers' sets hold: at 10,000 pods
# and 100 nodes, a million times per whole lowering. Keyed by integers, not by the address
# object, whose hash formats it in hex. Cleared when full, so it never holds more than
# HOST_NETWORKS.
HOST_NETWORKS = 1 << 17
_host_networks: dict[tuple[int, int], IPNetwork] = {}


def _host_network(version: int, value: int) -> IPNetwork:
    key = (version, value)
    found = _host_networks.get(key)
    if found is None:
        if len(_host_networks) >= HOST_NETWORKS:
            _host_networks.clear()
        if version == 4:
            found = ipaddress.IPv4Network((value, 32))
        else:
            found = ipaddress.IPv6Network((value, 128))
        _host_networks[key] = found
    return found


class Region(NamedTuple):
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
            net = _host_network(address.version, int(address))
            indices.extend(cidrs.containing(net, address))
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
        if not names:
            return set()  # no egress rule names a port: no pod is looked at
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

    def __init__(self, ordered: list[_OrderKey]) -> None:
        self._starts: dict[tuple[int, int], set[int]] = {}
        for version, length, start in ordered:
            self._starts.setdefault((version, length), set()).add(start)

    def representative(self, key: _OrderKey) -> IPAddress | None:
        """The first address of the prefix `key` outside every longer prefix, if any: walk
        from the first address, past the longest prefix that holds the candidate, until none
        does; each step passes one prefix."""
        version, prefixlen, first = key
        bits = _BITS[version]
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
    region, else those of the peers.

    A node's trie holds a host prefix for every member of its pod peers (thousands), so the
    hosts go through by their integer keys (family, length, address): the address objects are
    not hashed again, and a host prefix is built only when it is kept."""
    state = addresses.state
    local_ips = set(state.node_ips(node))
    local = {(a.version, int(a)) for a in local_ips}
    # Only a host in a pod or node peer, with a named port that egress rules name, or of the
    # local node can differ from the region around it; any other host falls to that region.
    hits = addresses.hits(peers, addresses.named(egress_port_names) | local_ips)
    # (key, network: None for a host, the host address or None, its peers' indices)
    hosts: list[tuple[_OrderKey, IPNetwork | None, IPAddress | None, tuple[int, ...]]] = sorted(
        ((a.version, a.max_prefixlen, int(a)), None, a, indices) for a, indices in hits.items()
    )
    extra: set[IPNetwork] = set(DEFAULT_ROUTES)
    for peer in peers:
        if isinstance(peer, CidrPeer):
            extra.add(peer.cidr)
            extra.update(peer.excepts)
    host_keys = {h[0] for h in hosts} if any(n.prefixlen == n.max_prefixlen for n in extra) else ()
    # Keys are unique across both lists (a CIDR that is a host's prefix is the host's), so the
    # merge never compares past them.
    ordered = list(
        heapq.merge(
            sorted((_order(n), n, None, ()) for n in extra if _order(n) not in host_keys),
            hosts,
        )
    )

    cidrs = CidrIndex(peers)
    prefixes = _Prefixes([entry[0] for entry in ordered])
    names = egress_port_names
    # the peers' indices -> the groups' (the hosts of one workload share one: asked once)
    grouped: dict[tuple[int, ...], tuple[int, ...]] = {}
    regions: list[Region] = []
    kept: dict[_OrderKey, int] = {}  # trie prefix -> index in regions
    # prefix lengths kept, per family, longest first
    lengths: dict[int, list[int]] = {4: [], 6: []}
    for key, cidr, address, indices in ordered:
        version, prefixlen, start = key
        if address is not None:  # a host
            in_groups = grouped.get(indices)
            if in_groups is None:
                in_groups = grouped[indices] = _grouped(indices, groups)
            signature: Signature = (
                version,
                in_groups,
                _named_ports(state, address, names) if names else (),
                (version, start) in local,
            )
            representative: IPAddress | None = address
        else:
            assert cidr is not None
            signature = (version, _grouped(_region_signature(cidr, cidrs), groups), (), False)
            representative = prefixes.representative(key)
        around = _enclosing(kept, lengths[version], key)
        if around is not None and regions[around].signature == signature:
            # The prefix around it already says the same; its addresses fall to that prefix.
            if regions[around].representative is None and representative is not None:
                regions[around] = regions[around]._replace(representative=representative)
            continue
        kept[key] = len(regions)
        if prefixlen not in lengths[version]:
            lengths[version].append(prefixlen)
            lengths[version].sort(reverse=True)
        network = cidr if cidr is not None else _host_network(version, start)
        regions.append(Region(network, signature, representative))
    return regions


def _enclosing(kept: dict[_OrderKey, int], lengths: list[int], key: _OrderKey) -> int | None:
    """The index of the longest kept region strictly containing the prefix `key`: one dict
    look-up per prefix length in use (`lengths`, longest first), so a node with many pod
    addresses stays linear."""
    version, prefixlen, start = key
    bits = _BITS[version]
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
