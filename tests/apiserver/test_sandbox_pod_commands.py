"""`stockade sandbox exec` and `probe` work on real pod namespaces found through the API server:
exec runs in the pod and passes its exit status through; probe says connected, refused or
timed out (a pod-CIDR address with no pod is blackholed by its node) over TCP, UDP and SCTP, to
an IP, to NS/POD, and to a Service name resolved by the cluster DNS from inside the pod (the
node DNATs the DNS and Service ClusterIPs with nft, as kube-proxy would); missing, not Running
and kubelet-run pods are told apart."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from stockade import cli
from stockade.sandbox import netns
from stockade.sandbox.cluster import dns
from stockade.sandbox.cluster.dnswire import RType
from stockade.sandbox.cluster.pods import PodError, kubelet_netns, lookup, pod_netns
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.node.registration import create_pod, register_node, register_pod
from stockade.sandbox.topology import PodNet, Topology
from stockade.sandbox.workloads.traffic import PodProcesses
from tests.fixtures.controlplane import wait_for
from tests.fixtures.netns import MakeTopology

NO_POD_V4 = "10.244.1.250"  # in node-1's pod CIDR, no pod: the routed node blackholes it


@dataclass
class Bed:
    topo: Topology
    namespace: str
    state_dir: Path
    client: PodNet
    server: PodNet
    dns_pod: PodNet


@pytest.fixture
def bed(
    topology: MakeTopology,
    control_plane: ControlPlane,
    api_client: Any,
    k8s_namespace: str,
    tmp_path: Path,
) -> Iterator[Bed]:
    """One routed node with a client, an echo server (TCP 8080, UDP 9090, SCTP 7777) and a DNS
    pod, a sandbox state directory pointing at the test control plane and the topology."""
    topo = topology(nodes=1, mode="routed")
    register_node(api_client, topo.nodes[0])
    client = topo.add_pod(f"{k8s_namespace}/client", "node-1")
    server = topo.add_pod(f"{k8s_namespace}/server", "node-1")
    dns_pod = topo.add_pod("kube-system/dns", "node-1")
    register_pod(api_client, k8s_namespace, "client", client, {"app": "client"}, [])
    register_pod(api_client, k8s_namespace, "server", server, {"app": "server"}, [])
    state_dir = tmp_path / "sandbox"
    state_dir.mkdir()
    (state_dir / "controlplane").symlink_to(control_plane.workdir)
    topo.save(state_dir / "topology.json")
    with PodProcesses(topo, crafted_sctp=True) as procs:
        procs.serve(server.key, [(8080, "tcp"), (9090, "udp"), (7777, "sctp")])
        yield Bed(topo, k8s_namespace, state_dir, client, server, dns_pod)


def stockade(bed: Bed, *argv: str) -> int:
    return cli.main(["sandbox", "--state-dir", str(bed.state_dir), *argv])


def probe(bed: Bed, target: str, port: int, *extra: str) -> int:
    return stockade(
        bed, "probe", "-n", bed.namespace, "client", target, str(port), "--timeout", "1", *extra
    )


def test_probe_tells_connected_refused_and_timed_out_apart(
    bed: Bed, capsys: pytest.CaptureFixture[str]
) -> None:
    ip = bed.server.ip_v4
    results = [
        probe(bed, ip, 8080),
        probe(bed, bed.server.ip_v6, 8080),
        probe(bed, f"{bed.namespace}/server", 8080),
        probe(bed, ip, 8081),
        probe(bed, NO_POD_V4, 8080),
        probe(bed, ip, 9090, "--protocol", "UDP"),
        probe(bed, ip, 9091, "--protocol", "udp"),
        probe(bed, ip, 7777, "--protocol", "SCTP"),
        probe(bed, ip, 7778, "--protocol", "SCTP"),
    ]
    printed = capsys.readouterr().out.split()
    assert results == [0, 0, 0, 3, 4, 0, 3, 0, 3]
    assert " ".join(printed) == (
        "connected connected connected refused timed out connected refused connected refused"
    )


def test_exec_runs_in_the_pod_and_passes_the_exit_status_through(
    bed: Bed, capfd: pytest.CaptureFixture[str]
) -> None:
    assert stockade(bed, "exec", "-n", bed.namespace, "client", "--", "ip", "-o", "addr") == 0
    out = capfd.readouterr().out
    assert f"{bed.client.ip_v4}/32" in out
    assert bed.server.ip_v4 not in out
    status = stockade(bed, "exec", "-n", bed.namespace, "client", "--", "sh", "-c", "exit 7")
    assert status == 7


def _answers(ns: str, name: str) -> list[str] | None:
    try:
        return lookup(ns, name, RType.A, dns.CLUSTER_IP, timeout=1.0)[1] or None
    except (TimeoutError, OSError):
        return None


def _nft(ns: str, rules: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True
    )


def test_probe_resolves_a_service_name_with_the_cluster_dns_from_inside_the_pod(
    bed: Bed,
    control_plane: ControlPlane,
    api_client: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing answers at 10.96.0.10 yet: a clear error, exit 1.
    assert probe(bed, "web.nowhere", 8080) == 1
    assert "did not answer" in capsys.readouterr().err
    service = kubernetes.client.CoreV1Api(api_client).create_namespaced_service(
        bed.namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80}], "selector": {"app": "server"}},
        },
    )
    cluster_ip = service.spec.cluster_ip
    dns_ip, server_ip = bed.dns_pod.ip_v4, bed.server.ip_v4
    _nft(
        bed.topo.nodes[0].netns,
        f"""table ip stktest {{
  chain pre {{
    type nat hook prerouting priority -100;
    ip daddr {dns.CLUSTER_IP} udp dport 53 dnat to {dns_ip}:53
    ip daddr {dns.CLUSTER_IP} tcp dport 53 dnat to {dns_ip}:53
    ip daddr {cluster_ip} tcp dport 80 dnat to {server_ip}:8080
  }}
}}
""",
    )
    with (tmp_path / "dns.log").open("wb") as log:
        resolver = subprocess.Popen(
            dns.command(control_plane.kubeconfig, bed.dns_pod.netns), stdout=log, stderr=log
        )
    try:
        wait_for(
            "the cluster DNS answers in the pod",
            lambda: _answers(bed.client.netns, f"web.{bed.namespace}.svc.cluster.local"),
        )
        results = [
            probe(bed, f"web.{bed.namespace}", 80),
            probe(bed, f"web.{bed.namespace}.svc", 80),
            probe(bed, f"web.{bed.namespace}.svc.cluster.local", 80),
        ]
        captured = capsys.readouterr()
        assert results == [0, 0, 0], captured.err
        assert probe(bed, f"nope.{bed.namespace}", 80) == 1
        assert "does not resolve (NXDOMAIN" in capsys.readouterr().err
    finally:
        resolver.terminate()
        resolver.wait(timeout=10)


def test_pods_that_are_missing_not_running_or_kubelet_run_are_told_apart(
    bed: Bed, api_client: Any
) -> None:
    with pytest.raises(PodError, match=f"pod {bed.namespace}/ghost not found"):
        pod_netns(api_client, bed.topo, bed.namespace, "ghost")
    core = kubernetes.client.CoreV1Api(api_client)
    create_pod(
        api_client,
        bed.namespace,
        {"metadata": {"name": "waiting"}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
    )
    with pytest.raises(PodError, match=f"pod {bed.namespace}/waiting is Pending, not Running"):
        pod_netns(api_client, bed.topo, bed.namespace, "waiting")
    # A pod the kubelet stand-in runs: only its UID names its namespace.
    stand_in = PodNet("x/k", "node-1", "unused", "10.244.1.99", "fd00:10:244:1::99", "-", "-")
    register_pod(api_client, bed.namespace, "kubelet-run", stand_in, {}, [])
    uid = core.read_namespaced_pod("kubelet-run", bed.namespace).metadata.uid
    with pytest.raises(PodError, match="is Running but has no network namespace"):
        pod_netns(api_client, bed.topo, bed.namespace, "kubelet-run")
    name = kubelet_netns(bed.topo.run_id, uid)
    netns.create(name)
    try:
        assert pod_netns(api_client, bed.topo, bed.namespace, "kubelet-run") == name
        assert pod_netns(api_client, None, bed.namespace, "kubelet-run") == name
    finally:
        netns.remove(name)
    assert pod_netns(api_client, bed.topo, bed.namespace, "client") == bed.client.netns
