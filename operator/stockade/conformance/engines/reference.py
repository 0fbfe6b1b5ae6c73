"""The `reference` engine: conformance cases judged by the pure-Python evaluator.

No kernel, no API server: the engine places pods on made-up nodes, gives them addresses, keeps
the case's world in a `World`, and answers each check with `stockade.model.evaluator.evaluate`.
A connection the evaluator allows reaches a server only when the destination pod serves that
port and protocol (otherwise it is refused, as a real probe would be). It is the oracle the
datapath and e2e engines are compared with.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from stockade.conformance.casefile import Action, Case, Check, Topology
from stockade.conformance.engine import Addresses, Observed, Outcome
from stockade.conformance.world import World, default_placement
from stockade.model.evaluator import evaluate
from stockade.model.flow import Flow
from stockade.model.policy import IPAddress, Protocol

DEFAULT_NODES = ("node-1", "node-2")
ECHO_TYPE = {Protocol.ICMP: 8, Protocol.ICMPV6: 128}  # echo request


def _node_address(family: int, index: int) -> IPAddress:
    if family == 4:
        return ipaddress.ip_address(f"172.18.0.{index + 2}")
    return ipaddress.ip_address(f"fd01:172:18::{index + 2:x}")  # outside fd00::/16 of pods


def _pod_address(family: int, node_index: int, pod_index: int) -> IPAddress:
    # Every pod inside 10.240.0.0/12 (IPv4) so that one /4 holds them all (FORMAT.md).
    if family == 4:
        return ipaddress.ip_address(f"10.244.{node_index + 1}.{pod_index + 10}")
    return ipaddress.ip_address(f"fd00:10:244:{node_index + 1:x}::{pod_index + 10:x}")


class ReferenceEngine:
    name = "reference"

    def __init__(self, ip_family: int = 4) -> None:
        if ip_family not in (4, 6):
            raise ValueError(f"ip_family must be 4 or 6, got {ip_family}")
        self.family = ip_family
        self.world: World | None = None
        self.addresses: Addresses | None = None

    def unsupported(self, case: Case) -> str | None:
        return None  # the evaluator implements every feature of the policy API

    def setup(self, topology: Topology, case: Case) -> Addresses:
        world = World(topology, case)
        nodes = [n.name for n in topology.nodes] or list(DEFAULT_NODES)
        world.placement = default_placement(topology, nodes)
        node_ips = {name: (_node_address(self.family, i),) for i, name in enumerate(nodes)}
        pod_ips: dict[str, tuple[IPAddress, ...]] = {}
        per_node = dict.fromkeys(nodes, 0)
        for pod in topology.pods:
            node = world.placement[pod.key]
            if pod.host_network:
                pod_ips[pod.key] = node_ips[node]
                continue
            pod_ips[pod.key] = (_pod_address(self.family, nodes.index(node), per_node[node]),)
            per_node[node] += 1
        self.world = world
        self.addresses = Addresses(pod_ips, node_ips, self.family)
        return self.addresses

    def apply(self, action: Action) -> None:
        self._world().apply(action)

    def probe(self, checks: Sequence[Check]) -> list[Observed]:
        world, addresses = self._world(), self.addresses
        assert addresses is not None
        state = world.cluster_state(addresses)
        policies = list(world.policies.values())
        observed: list[Observed] = []
        for check in checks:
            flow = self._flow(check, addresses)
            decision = evaluate(state, policies, flow)
            if not decision.allowed:
                outcome = Outcome.TIMEOUT
            elif self._served(world, check):
                outcome = Outcome.CONNECTED
            else:
                outcome = Outcome.REFUSED
            observed.append(Observed(check, outcome, decision.reason))
        return observed

    def teardown(self) -> None:
        self.world = None
        self.addresses = None

    def close(self) -> None:
        pass  # nothing outlives a case

    def _world(self) -> World:
        if self.world is None:
            raise RuntimeError("reference engine: setup() was not called")
        return self.world

    def _flow(self, check: Check, addresses: Addresses) -> Flow:
        src, dst = addresses.pod_ip(check.src), addresses.pod_ip(check.dst)
        if check.protocol.has_ports:
            return Flow(src, dst, check.protocol, check.port)
        protocol = Protocol.ICMP if self.family == 4 else Protocol.ICMPV6
        return Flow(src, dst, protocol, None, ECHO_TYPE[protocol], 0)

    @staticmethod
    def _served(world: World, check: Check) -> bool:
        if not check.protocol.has_ports:
            return True  # every host answers an echo request
        return any(
            s.port == check.port and s.protocol is check.protocol for s in world.serves(check.dst)
        )
