"""Parse policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy specs.

The upstream kind is validated by its own CRD; this checks what the internal representation
needs. stockade's ClusterNetworkPolicy (upstream's spec plus ICMP matches and `spec.mode`) maps
itself (`stockade.model.crd_scnp`). Semantics quoted from upstream
`apis/v1alpha2/clusternetworkpolicy_types.go`. Called by `stockade.model.parse.parse_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping

from stockade.model import fields
from stockade.model.fields import Problems
from stockade.model.parse_common import (
    parse_cidr,
    parse_port_number,
    port_name_problem,
)
from stockade.model.policy import (
    AnyPort,
    CidrPeer,
    Direction,
    Mode,
    NamedPort,
    NodePeer,
    Peer,
    PodPeer,
    PodSet,
    Policy,
    PolicyKind,
    PortRange,
    PortSpec,
    Protocol,
    Rule,
    RuleAction,
    RuleRef,
    Tier,
)
from stockade.model.selectors import EVERYTHING, parse_selector

MAX_RULES = 25
MAX_PEERS = 25
_ACTIONS = {"Accept": RuleAction.ALLOW, "Deny": RuleAction.DENY, "Pass": RuleAction.PASS}
_PEER_KINDS = {
    Direction.INGRESS: ("namespaces", "pods"),
    Direction.EGRESS: ("namespaces", "pods", "nodes", "networks", "domainNames"),
}
_PORT_PROTOCOLS = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP}


def parse_cluster_network_policy(
    name: str, spec: Mapping[str, object], problems: Problems
) -> Policy | None:
    kind = PolicyKind.CLUSTER_NETWORK_POLICY
    fields.known_keys(spec, "spec", problems, ("tier", "priority", "subject", "ingress", "egress"))
    tier_text = fields.choice(spec.get("tier"), "spec.tier", problems, ("Admin", "Baseline"))
    priority = fields.integer(spec.get("priority"), "spec.priority", problems, 0, 1000)
    subject = _parse_subject(spec.get("subject"), "spec.subject", problems)
    rules: dict[Direction, tuple[Rule, ...]] = {}
    for direction in Direction:
        key = direction.value.lower()
        parsed: list[Rule] = []
        raw = spec.get(key)
        items = fields.sequence(raw, f"spec.{key}", problems) if raw is not None else []
        if items is not None and len(items) > MAX_RULES:
            problems.add(f"spec.{key}", f"must have at most {MAX_RULES} rules, got {len(items)}")
        for i, item in enumerate(items or []):
            ref = RuleRef(kind, "", name, direction, i)
            rule = _parse_rule(ref, item, f"spec.{key}[{i}]", problems)
            if rule is not None:
                parsed.append(rule)
        rules[direction] = tuple(parsed)
    if tier_text is None or priority is None or subject is None:
        return None
    # "CNPs with no ingress rules do not affect ingress traffic" (and likewise egress).
    directions = frozenset(d for d in Direction if rules[d])
    return Policy(
        kind=kind,
        namespace="",
        name=name,
        tier=Tier(tier_text),
        priority=priority,
        mode=Mode.ENFORCE,
        subject=subject,
        directions=directions,
        ingress=rules[Direction.INGRESS],
        egress=rules[Direction.EGRESS],
    )


def _parse_subject(value: object, path: str, problems: Problems) -> PodSet | None:
    # "Exactly one field must be set. Note that host-networked pods are not included."
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    fields.known_keys(obj, path, problems, ("namespaces", "pods"))
    which = fields.exactly_one(obj, path, problems, ("namespaces", "pods"))
    if which == "namespaces":
        sel = parse_selector(obj["namespaces"], f"{path}.namespaces", problems)
        return PodSet(pod_selector=EVERYTHING, namespace_selector=sel) if sel else None
    if which == "pods":
        return _parse_namespaced_pod(obj["pods"], f"{path}.pods", problems)
    return None


def _parse_namespaced_pod(value: object, path: str, problems: Problems) -> PodSet | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    fields.known_keys(obj, path, problems, ("namespaceSelector", "podSelector"))
    # "NamespaceSelector ... if empty, it selects all Namespaces" (optional, not a pointer).
    ns_sel = EVERYTHING
    if obj.get("namespaceSelector") is not None:
        parsed = parse_selector(obj["namespaceSelector"], f"{path}.namespaceSelector", problems)
        if parsed is None:
            return None
        ns_sel = parsed
    if obj.get("podSelector") is None:
        problems.add(f"{path}.podSelector", "required")
        return None
    pod_sel = parse_selector(obj["podSelector"], f"{path}.podSelector", problems)
    if pod_sel is None:
        return None
    return PodSet(pod_selector=pod_sel, namespace_selector=ns_sel)


def _parse_rule(ref: RuleRef, value: object, path: str, problems: Problems) -> Rule | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    peer_key = "from" if ref.direction is Direction.INGRESS else "to"
    before = len(problems.items)
    fields.known_keys(obj, path, problems, ("name", "action", peer_key, "protocols"))
    name = ""
    if obj.get("name") is not None:
        name = fields.string(obj["name"], f"{path}.name", problems) or ""
        if len(name) > 100:
            problems.add(f"{path}.name", "must be at most 100 characters")
    action_text = fields.choice(obj.get("action"), f"{path}.action", problems, _ACTIONS)
    peers: list[Peer] = []
    raw_peers = fields.sequence(obj.get(peer_key), f"{path}.{peer_key}", problems)
    if raw_peers is not None and not 1 <= len(raw_peers) <= MAX_PEERS:
        problems.add(f"{path}.{peer_key}", f"must have 1 to {MAX_PEERS} peers")
    for i, item in enumerate(raw_peers or []):
        peers.extend(_parse_peer(item, f"{path}.{peer_key}[{i}]", problems, ref.direction))
    ports: list[PortSpec] = []
    if obj.get("protocols") is not None:
        raw_ports = fields.sequence(obj["protocols"], f"{path}.protocols", problems)
        if raw_ports is not None and not 1 <= len(raw_ports) <= MAX_PEERS:
            problems.add(f"{path}.protocols", f"must have 1 to {MAX_PEERS} entries when set")
        for i, item in enumerate(raw_ports or []):
            port = _parse_protocol(item, f"{path}.protocols[{i}]", problems)
            if port is not None:
                ports.append(port)
    named = any(isinstance(p, NamedPort) for p in ports)
    if named and any(isinstance(p, CidrPeer | NodePeer) for p in peers):
        problems.add(
            f"{path}.protocols",
            "destinationNamedPort cannot be used with networks or nodes peers (they have no "
            "named ports)",
        )
    if len(problems.items) != before or action_text is None:
        return None
    return Rule(
        ref=ref,
        action=_ACTIONS[action_text],
        peers=tuple(dict.fromkeys(peers)),
        # "If unspecified, protocol-specific attributes will not be used to match traffic."
        ports=tuple(dict.fromkeys(ports)) or (AnyPort(),),
        name=name,
    )


def _parse_peer(value: object, path: str, problems: Problems, direction: Direction) -> list[Peer]:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return []
    kinds = _PEER_KINDS[direction]
    fields.known_keys(obj, path, problems, kinds)
    which = fields.exactly_one(obj, path, problems, kinds)
    if which is None:
        return []
    sub = f"{path}.{which}"
    if which == "namespaces":
        # "Namespaces defines a way to select all pods within a set of Namespaces."
        sel = parse_selector(obj[which], sub, problems)
        return [PodPeer(PodSet(pod_selector=EVERYTHING, namespace_selector=sel))] if sel else []
    if which == "pods":
        pods = _parse_namespaced_pod(obj[which], sub, problems)
        return [PodPeer(pods)] if pods else []
    if which == "nodes":
        # "It selects the nodeIPs as the peer type by matching on the IPs present in the
        # node.Status.Addresses field of the node."
        sel = parse_selector(obj[which], sub, problems)
        return [NodePeer(sel)] if sel else []
    if which == "networks":
        nets = fields.sequence(obj[which], sub, problems)
        if nets is not None and not 1 <= len(nets) <= MAX_PEERS:
            problems.add(sub, f"must have 1 to {MAX_PEERS} CIDRs")
        found = [parse_cidr(n, f"{sub}[{i}]", problems) for i, n in enumerate(nets or [])]
        return [CidrPeer(n) for n in found if n is not None]
    problems.add(sub, "domainNames peers are not supported by stockade", unsupported=True)
    return []


def _parse_protocol(value: object, path: str, problems: Problems) -> PortSpec | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    kinds = ("tcp", "udp", "sctp", "destinationNamedPort")
    fields.known_keys(obj, path, problems, kinds)
    which = fields.exactly_one(obj, path, problems, kinds)
    if which is None:
        return None
    sub = f"{path}.{which}"
    if which == "destinationNamedPort":
        name = fields.string(obj[which], sub, problems)
        if name is None:
            return None
        if problem := port_name_problem(name):
            problems.add(sub, problem)
            return None
        # "selects a destination port on a pod based on the ContainerPort name": the named
        # container port's own protocol applies.
        return NamedPort(name, None)
    protocol = _PORT_PROTOCOLS[which]
    body = fields.mapping(obj[which], sub, problems)
    if body is None:
        return None
    fields.known_keys(body, sub, problems, ("destinationPort",))
    if body.get("destinationPort") is None:
        problems.add(f"{sub}.destinationPort", "required")
        return None
    port_path = f"{sub}.destinationPort"
    port = fields.mapping(body["destinationPort"], port_path, problems)
    if port is None:
        return None
    fields.known_keys(port, port_path, problems, ("number", "range"))
    choice = fields.exactly_one(port, port_path, problems, ("number", "range"))
    if choice == "number":
        number = parse_port_number(port["number"], f"{port_path}.number", problems)
        return PortRange(protocol, number, number) if number is not None else None
    if choice == "range":
        rng_path = f"{port_path}.range"
        rng = fields.mapping(port["range"], rng_path, problems)
        if rng is None:
            return None
        fields.known_keys(rng, rng_path, problems, ("start", "end"))
        start = parse_port_number(rng.get("start"), f"{rng_path}.start", problems)
        end = parse_port_number(rng.get("end"), f"{rng_path}.end", problems)
        if start is None or end is None:
            return None
        # The upstream CRD also insists on start < end; a range of one port is harmless here.
        if start > end:
            problems.add(f"{rng_path}.end", f"must be at least start ({start}), got {end}")
            return None
        return PortRange(protocol, start, end)
    return None
