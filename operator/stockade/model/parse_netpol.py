"""Parse networking.k8s.io/v1 NetworkPolicy specs.

The standard kind is validated by the API server's own schema; this checks what the internal
representation needs, more leniently than stockade's CRD (no count bounds, `podSelector`
optional). stockade's NetworkPolicy maps itself (`stockade.model.crd_snp`).
Called by `stockade.model.parse.parse_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping

from stockade.model import fields
from stockade.model.fields import Problems
from stockade.model.parse_common import (
    parse_cidr,
    parse_excepts,
    parse_port_number,
    port_name_problem,
)
from stockade.model.policy import (
    AnyPeer,
    AnyPort,
    CidrPeer,
    Direction,
    IPNetwork,
    Mode,
    NamedPort,
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

_PORT_PROTOCOLS = (Protocol.TCP.value, Protocol.UDP.value, Protocol.SCTP.value)
_PEER_KEYS = {
    Direction.INGRESS: "from",
    Direction.EGRESS: "to",
}


def parse_network_policy(
    namespace: str, name: str, spec: Mapping[str, object], problems: Problems
) -> Policy | None:
    kind = PolicyKind.NETWORK_POLICY
    fields.known_keys(spec, "spec", problems, ("podSelector", "ingress", "egress", "policyTypes"))
    subject_selector = EVERYTHING
    if spec.get("podSelector") is not None:
        subject_selector = parse_selector(spec["podSelector"], "spec.podSelector", problems) or (
            EVERYTHING
        )
    directions = _policy_types(spec, problems)
    rules: dict[Direction, tuple[Rule, ...]] = {}
    for direction in Direction:
        key = direction.value.lower()
        raw = spec.get(key)
        parsed: list[Rule] = []
        if raw is not None:
            for i, item in enumerate(fields.sequence(raw, f"spec.{key}", problems) or []):
                ref = RuleRef(kind, namespace, name, direction, i)
                rule = _parse_rule(ref, item, f"spec.{key}[{i}]", problems, namespace=namespace)
                if rule is not None:
                    parsed.append(rule)
        # policyTypes: "If this field is not specified ... policies that contain an egress
        # section are assumed to affect egress". Rules of an unaffected direction do nothing.
        rules[direction] = tuple(parsed) if direction in directions else ()
    return Policy(
        kind=kind,
        namespace=namespace,
        name=name,
        tier=Tier.NAMESPACE,
        priority=0,
        mode=Mode.ENFORCE,
        subject=PodSet(pod_selector=subject_selector, namespace=namespace),
        directions=directions,
        ingress=rules[Direction.INGRESS],
        egress=rules[Direction.EGRESS],
    )


def _policy_types(spec: Mapping[str, object], problems: Problems) -> frozenset[Direction]:
    raw = spec.get("policyTypes")
    if raw is None or raw == []:
        # networking/v1 defaulting (SetDefaults_NetworkPolicySpec): Ingress always; Egress when
        # len(spec.egress) != 0.
        egress = spec.get("egress")
        has_egress = isinstance(egress, list | tuple) and len(egress) > 0
        return frozenset(
            {Direction.INGRESS, Direction.EGRESS} if has_egress else {Direction.INGRESS}
        )
    found: set[Direction] = set()
    for i, item in enumerate(fields.sequence(raw, "spec.policyTypes", problems) or []):
        text = fields.choice(item, f"spec.policyTypes[{i}]", problems, [d.value for d in Direction])
        if text is not None:
            found.add(Direction(text))
    return frozenset(found)


def _parse_rule(
    ref: RuleRef,
    value: object,
    path: str,
    problems: Problems,
    *,
    namespace: str,
) -> Rule | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    peer_key = _PEER_KEYS[ref.direction]
    before = len(problems.items)
    fields.known_keys(obj, path, problems, (peer_key, "ports"))
    peers: list[Peer] = []
    raw_peers = obj.get(peer_key)
    if raw_peers is not None:
        for i, item in enumerate(fields.sequence(raw_peers, f"{path}.{peer_key}", problems) or []):
            peer = _parse_peer(item, f"{path}.{peer_key}[{i}]", problems, namespace)
            if peer is not None:
                peers.append(peer)
    ports: list[PortSpec] = []
    raw_ports = obj.get("ports")
    if raw_ports is not None:
        for i, item in enumerate(fields.sequence(raw_ports, f"{path}.ports", problems) or []):
            port = _parse_port(item, f"{path}.ports[{i}]", problems)
            if port is not None:
                ports.append(port)
    if len(problems.items) != before:
        return None
    # "If this field is empty or missing, this rule matches all sources/destinations" and
    # "... matches all ports".
    return Rule(
        ref=ref,
        action=RuleAction.ALLOW,
        peers=tuple(dict.fromkeys(peers)) or (AnyPeer(),),
        ports=tuple(dict.fromkeys(ports)) or (AnyPort(),),
    )


def _parse_peer(value: object, path: str, problems: Problems, namespace: str) -> Peer | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    fields.known_keys(obj, path, problems, ("podSelector", "namespaceSelector", "ipBlock"))
    pod_raw, ns_raw, block_raw = (
        obj.get("podSelector"),
        obj.get("namespaceSelector"),
        obj.get("ipBlock"),
    )
    if block_raw is not None:
        if pod_raw is not None or ns_raw is not None:
            problems.add(path, "ipBlock may not be combined with podSelector or namespaceSelector")
            return None
        return _parse_ip_block(block_raw, f"{path}.ipBlock", problems)
    if pod_raw is None and ns_raw is None:
        problems.add(path, "must specify at least one of podSelector, namespaceSelector, ipBlock")
        return None
    pod_sel = EVERYTHING
    if pod_raw is not None:
        parsed = parse_selector(pod_raw, f"{path}.podSelector", problems)
        if parsed is None:
            return None
        pod_sel = parsed
    if ns_raw is None:
        # "If namespaceSelector is not set, the podSelector selects pods in the policy's own
        # namespace."
        return PodPeer(PodSet(pod_selector=pod_sel, namespace=namespace))
    ns_sel = parse_selector(ns_raw, f"{path}.namespaceSelector", problems)
    if ns_sel is None:
        return None
    # Both set: "selects particular Pods within particular Namespaces" (AND).
    return PodPeer(PodSet(pod_selector=pod_sel, namespace_selector=ns_sel))


def _parse_ip_block(value: object, path: str, problems: Problems) -> CidrPeer | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    fields.known_keys(obj, path, problems, ("cidr", "except"))
    cidr = parse_cidr(obj.get("cidr"), f"{path}.cidr", problems)
    if cidr is None:
        return None
    excepts: tuple[IPNetwork, ...] = ()
    if obj.get("except") is not None:
        excepts = parse_excepts(cidr, obj["except"], f"{path}.except", problems)
    return CidrPeer(cidr, excepts)


def _parse_port(value: object, path: str, problems: Problems) -> PortSpec | None:
    obj = fields.mapping(value, path, problems)
    if obj is None:
        return None
    fields.known_keys(obj, path, problems, ("protocol", "port", "endPort"))
    protocol = Protocol.TCP  # "If not specified, this field defaults to TCP."
    if obj.get("protocol") is not None:
        text = fields.choice(obj["protocol"], f"{path}.protocol", problems, _PORT_PROTOCOLS)
        if text is None:
            return None
        protocol = Protocol(text)
    port, end_port = obj.get("port"), obj.get("endPort")
    if port is None:
        if end_port is not None:
            problems.add(f"{path}.endPort", "may not be set without port")
            return None
        return PortRange(protocol)
    if isinstance(port, str):
        if end_port is not None:
            problems.add(f"{path}.endPort", "may not be set when port is a named port")
            return None
        if problem := port_name_problem(port):
            problems.add(f"{path}.port", problem)
            return None
        return NamedPort(port, protocol)
    start = parse_port_number(port, f"{path}.port", problems)
    if start is None:
        return None
    if end_port is None:
        return PortRange(protocol, start, start)
    end = parse_port_number(end_port, f"{path}.endPort", problems)
    if end is None:
        return None
    if end < start:
        problems.add(f"{path}.endPort", f"must be >= port ({start}), got {end}")
        return None
    return PortRange(protocol, start, end)
