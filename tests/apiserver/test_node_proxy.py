"""kube-proxy in the sandbox nodes, on real parts: the real kube-proxy in each node namespace of a
real topology, reaching the session's API server through its node's forwarder, programs the
ClusterIP of a Service whose EndpointSlices the controller manager made from a registered Pod,
in nftables and in iptables mode; a pod then reaches another node's pod through the ClusterIP,
over IPv4 and IPv6. Nothing appears in the machine's own netfilter tables, and stopping (or failing
to start) leaves no process behind."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest

from stockade.sandbox.controlplane.server import SERVICE_IP, ControlPlane
from stockade.sandbox.node.proxy import NodeProxies, ProxyError, ProxyMode
from stockade.sandbox.node.registration import register_node, register_pod
from stockade.sandbox.processes import find_processes, is_alive
from stockade.sandbox.toolchain import KUBERNETES
from stockade.sandbox.topology import Topology, node_net
from stockade.sandbox.workloads.traffic import Outcome
from tests.fixtures.controlplane import wait_for
from tests.fixtures.netns import MakeProcesses, MakeTopology

ECHO_PORT = 8080
SERVICE_PORT = 80


def root_tables() -> str:
    """The machine's own nftables tables (iptables-nft keeps its tables there too)."""
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return listed.stdout


def in_node(topo: Topology, node: str, *argv: str) -> str:
    netns = topo.node(node).netns
    cmd = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def rules(topo: Topology, node: str, mode: ProxyMode, family: int) -> str:
    """What kube-proxy wrote in the node: its nftables table, or the iptables tables."""
    if mode == "nftables":
        table_family = "ip" if family == 4 else "ip6"
        return in_node(topo, node, "nft", "list", "table", table_family, "kube-proxy")
    return in_node(topo, node, "iptables-save" if family == 4 else "ip6tables-save")


@pytest.fixture(params=["nftables", "iptables"])
def proxied(
    request: pytest.FixtureRequest,
    control_plane: ControlPlane,
    api_client: Any,
    topology: MakeTopology,
    tmp_path: Any,
) -> Iterator[tuple[Topology, NodeProxies, str]]:
    """Two routed nodes, registered, each running kube-proxy in the fixture's mode (stopped
    before the topology goes); also the machine's nftables tables from before."""
    before = root_tables()
    topo = topology(nodes=2, mode="routed")
    for node in topo.nodes:
        register_node(api_client, node)
    proxies = NodeProxies(
        tmp_path / "proxy", control_plane.server, control_plane.pki, topo.nodes, request.param
    )
    proxies.start()
    try:
        yield topo, proxies, before
    finally:
        proxies.stop()


def test_kube_proxy_has_written_its_rules_when_started(
    proxied: tuple[Topology, NodeProxies, str],
) -> None:
    """start() returns after the first sync: the `kubernetes` Service is already programmed."""
    topo, proxies, _ = proxied
    for node in topo.nodes:
        assert SERVICE_IP in rules(topo, node.name, proxies.mode, 4)


def test_kube_proxy_sends_a_pod_through_a_cluster_ip_to_another_nodes_pod(
    proxied: tuple[Topology, NodeProxies, str],
    api_client: Any,
    k8s_namespace: str,
    pod_processes: MakeProcesses,
) -> None:
    topo, proxies, root_before = proxied
    ns = k8s_namespace
    server = topo.add_pod(f"{ns}/server", "node-2")
    client = topo.add_pod(f"{ns}/client", "node-1")
    register_pod(api_client, ns, "server", server, {"app": "echo"}, [("echo", ECHO_PORT, "TCP")])
    register_pod(api_client, ns, "client", client, {"app": "client"}, [])
    service: Any = k8s.CoreV1Api(api_client).create_namespaced_service(
        ns,
        {  # type: ignore[arg-type]
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo"},
            "spec": {
                "selector": {"app": "echo"},
                "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"port": SERVICE_PORT, "targetPort": ECHO_PORT, "protocol": "TCP"}],
            },
        },
    )
    ip_v4, ip_v6 = service.spec.cluster_ips

    # The controller manager's EndpointSlices, then kube-proxy's rules in the client's node.
    for family, cluster_ip, endpoint in ((4, ip_v4, server.ip_v4), (6, ip_v6, server.ip_v6)):
        wait_for(
            f"kube-proxy ({proxies.mode}) maps {cluster_ip} to {endpoint} in node-1",
            lambda f=family, c=cluster_ip, e=endpoint: (
                c in (text := rules(topo, "node-1", proxies.mode, f)) and e in text
            ),
            timeout=60,
        )

    procs = pod_processes(topo)
    assert procs.serve(f"{ns}/server", [(ECHO_PORT, "tcp")]) == [(ECHO_PORT, "tcp")]
    for cluster_ip in (ip_v4, ip_v6):
        outcome = procs.probe(f"{ns}/client", cluster_ip, SERVICE_PORT, "tcp", 3.0)
        assert outcome == Outcome.CONNECTED, cluster_ip
    # The translation is kube-proxy's: nothing listens on the service port itself.
    assert procs.probe(f"{ns}/client", server.ip_v4, SERVICE_PORT, "tcp") == Outcome.REFUSED

    assert root_tables() == root_before
    records = proxies.records
    assert len(records) == 4  # a forwarder and a kube-proxy per node
    proxies.stop()
    assert not any(is_alive(r) for r in records)


def test_a_forwarder_that_cannot_start_says_why_and_leaves_no_process(
    control_plane: ControlPlane, tmp_path: Any
) -> None:
    missing = dataclasses.replace(node_net("cpx0", 1), netns="stk-cpx0-missing")
    proxies = NodeProxies(tmp_path, control_plane.server, control_plane.pki, [missing])

    with pytest.raises(ProxyError) as failed:
        proxies.start()

    message = str(failed.value)
    assert "forwarder node-1 exited during start-up" in message
    assert "stk-cpx0-missing" in message  # the forwarder's own words, from its log tail
    assert proxies.records == ()
    binaries = {Path(sys.executable), KUBERNETES.path("kube-proxy")}
    assert find_processes(binaries, tmp_path) == []
