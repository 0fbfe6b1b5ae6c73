"""Attack: traffic that is not the node's own passes as the node's, and the node's own is not
recognised. Ingress policy does not apply to what the node a pod runs on sends it (kubelet
probes); deciding that by the source address alone is both too broad and too narrow.

Scenario (tests/bpf/agent_harness.py): `web` on node-1 admits only `client` on TCP 8080; `client`
and `other` live on node-2. node-1 runs the agent's sync.
- Too broad: node-1 SNATs other's connections to web to its own address (as a NodePort with
  externalTrafficPolicy Cluster, or masquerading, does). Exempted by address, other reached web,
  which its policy refuses. Now only packets the node's own stack sends are exempt (they arrive
  on no interface): the forwarded ones are judged, and dropped (reason policy), while the node's
  own connection to web still passes.
- Too narrow: on a bridge CNI the node reaches a pod from the CNI gateway's address (on the
  bridge), which no Node object lists, so default-deny broke readiness probes. The agent now
  flags the addresses of the node's own stack too: the node connects.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess

from stockade.datapath.events import DropReason, EventKind, EventReader
from stockade.datapath.netns import NetnsExecutor
from tests.attacks.node_agents import node_agent
from tests.bpf.agent_harness import PORT, pin_root, serving_scenario
from tests.fixtures.netns import MakeProcesses, MakeTopology


def _connect(dst: str) -> tuple[bool, str]:
    """(whether a TCP connection to dst:8080 opens within a second, the source it used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((dst, PORT))
        except OSError:
            return False, ""
        return True, sock.getsockname()[0]


def test_local_node_exemption_does_not_cover_traffic_snated_to_the_node(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, _ = serving_scenario(topology, pod_processes)
    node1, web, other = topo.node("node-1"), topo.pods["demo/web"], topo.pods["demo/other"]
    rule = ["-s", other.ip_v4, "-d", web.ip_v4, "-p", "tcp", "--dport", str(PORT)]
    rule += ["-j", "SNAT", "--to-source", node1.ip_v4]
    iptables = ["ip", "netns", "exec", node1.netns, "iptables", "-t", "nat"]
    subprocess.run([*iptables, "-A", "POSTROUTING", *rule], check=True)  # gone with the netns
    with (
        pin_root() as root,
        node_agent(cluster, "node-1", root) as agent,
        NetnsExecutor.named(other.netns) as in_other,
        NetnsExecutor.named(node1.netns) as in_node,
    ):
        assert agent.maps is not None
        reader = EventReader(agent.maps.fd("events"))
        try:
            reader.poll(0)
            connected, _ = in_other.run(_connect, web.ip_v4)
            drops = [
                e
                for e in reader.poll(0)
                if e.kind is EventKind.DROP and e.src == ipaddress.ip_address(node1.ip_v4)
            ]
        finally:
            reader.close()
        assert not connected
        assert drops and {e.reason for e in drops} == {DropReason.POLICY}
        own, source = in_node.run(_connect, web.ip_v4)
        assert own and source == node1.ip_v4  # the node's own connection is still exempt


def test_local_node_exemption_covers_the_cni_gateway(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, _ = serving_scenario(topology, pod_processes, mode="bridge")
    node1, web = topo.node("node-1"), topo.pods["demo/web"]
    with (
        pin_root() as root,
        node_agent(cluster, "node-1", root),
        NetnsExecutor.named(node1.netns) as in_node,
    ):
        connected, source = in_node.run(_connect, web.ip_v4)
        assert source != node1.ip_v4 or not connected  # the gateway, not a Node address
        assert connected
        assert source not in (node1.ip_v4, "")
