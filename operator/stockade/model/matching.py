"""Does a rule match a flow? Peer, port and subject matching against cluster state.

The reference evaluator (`stockade.model.evaluator`) is the only caller inside the model; the
compiler may call the same predicates to build peer sets, so that both agree by construction.
"""

from __future__ import annotations

from stockade.model.cluster import ClusterState, Pod
from stockade.model.flow import Flow
from stockade.model.policy import (
    AnyPeer,
    AnyPort,
    CidrPeer,
    IcmpMatch,
    IPAddress,
    NamedPort,
    NodePeer,
    Peer,
    PodPeer,
    Policy,
    PortRange,
    PortSpec,
    Rule,
)


def selects(policy: Policy, pod: Pod, state: ClusterState) -> bool:
    return state.holds(policy.subject, pod)


def peer_matches(peer: Peer, address: IPAddress, state: ClusterState) -> bool:
    """Whether the remote `address` belongs to `peer`."""
    if isinstance(peer, AnyPeer):
        return True
    if isinstance(peer, CidrPeer):
        # ipBlock and networks match by address: pods, nodes and external hosts alike.
        return peer.contains(address)
    if isinstance(peer, NodePeer):
        node = state.node_at(address)
        return node is not None and peer.selector.matches(node.labels)
    if isinstance(peer, PodPeer):
        pod = state.pod_at(address)
        return pod is not None and state.holds(peer.pods, pod)
    raise TypeError(f"unknown peer {peer!r}")


def port_matches(spec: PortSpec, flow: Flow, dst_pod: Pod | None) -> bool:
    """Whether the flow's protocol and destination port (or ICMP type/code) match `spec`.

    Named ports resolve on the destination pod's container ports ("the destination pod's port
    names"); a destination that is not a pod has no named ports.
    """
    if isinstance(spec, AnyPort):
        return True
    if isinstance(spec, PortRange):
        if flow.protocol is not spec.protocol:
            return False
        if spec.start is None:
            return True
        end = spec.end if spec.end is not None else spec.start
        return flow.dst_port is not None and spec.start <= flow.dst_port <= end
    if isinstance(spec, NamedPort):
        if dst_pod is None or spec.name not in dst_pod.named_ports:
            return False
        number, protocol = dst_pod.named_ports[spec.name]
        if spec.protocol is not None and spec.protocol is not protocol:
            return False
        return flow.protocol is protocol and flow.dst_port == number
    if isinstance(spec, IcmpMatch):
        return (
            flow.protocol is spec.protocol
            and flow.icmp_type == spec.type
            and (spec.code is None or flow.icmp_code == spec.code)
        )
    raise TypeError(f"unknown port spec {spec!r}")


def rule_matches(
    rule: Rule, remote: IPAddress, flow: Flow, dst_pod: Pod | None, state: ClusterState
) -> bool:
    """A rule matches when any of its peers and any of its ports match."""
    return any(peer_matches(p, remote, state) for p in rule.peers) and any(
        port_matches(p, flow, dst_pod) for p in rule.ports
    )
