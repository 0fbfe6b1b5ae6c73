"""The kubelet stand-in against a real API server and real namespaces: a Pod bound to a node
becomes Running with addresses from CNI and serves its container ports to other pods; deleting
it unwires it and removes the object; a restarted kubelet keeps the pods it wired and tears down
those deleted meanwhile; host-network pods use the node's addresses; an image without a runner
leaves its container not ready with a reason."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from stockade.sandbox import netns
from stockade.sandbox.node.kubelet import (
    DNS_MODULE,
    module_available,
    node_state_dir,
    pod_netns_name,
)
from stockade.sandbox.node.podspec import DNS_IMAGE
from stockade.sandbox.node.registration import create_pod
from stockade.sandbox.workloads.traffic import Agent
from tests.fixtures.controlplane import wait_for
from tests.node.kubelet_harness import Node


def _create(
    api: Any,
    namespace: str,
    name: str,
    node: str,
    ports: list[tuple[int, str]],
    *,
    host_network: bool = False,
    image: str = "stockade.invalid/echo:1",
    grace: int | None = None,
) -> str:
    spec: dict[str, Any] = {
        "nodeName": node,
        "hostNetwork": host_network,
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "main",
                "image": image,
                "ports": [{"containerPort": p, "protocol": proto} for p, proto in ports],
            }
        ],
    }
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    body = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    pod = create_pod(api, namespace, body)
    assert pod.metadata is not None and pod.metadata.uid is not None
    return str(pod.metadata.uid)


def _read(api: Any, namespace: str, name: str) -> Any:
    try:
        return kubernetes.client.CoreV1Api(api).read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _running(api: Any, namespace: str, name: str) -> Any:
    def probe() -> Any:
        pod = _read(api, namespace, name)
        ok = pod is not None and pod.status is not None and pod.status.phase == "Running"
        return pod if ok else None

    return wait_for(f"pod {namespace}/{name} Running", probe, timeout=60)


def _probe(netns_name: str, dst: str, port: int, proto: str) -> str:
    agent = Agent(netns_name, "probe")
    try:
        agent.wait_ready()
        reply = agent.request("probe", proto=proto, dst=dst, port=port, timeout=2.0, src=None)
        return str(reply.result(timeout=10)["outcome"])
    finally:
        agent.close()


def _leases(nodes: Node, node: str) -> set[str]:
    d = node_state_dir(nodes.state_dir, node) / "ipam" / "stockade"
    skip = {"lock", "last_reserved_ip.0", "last_reserved_ip.1"}
    return {p.name for p in d.iterdir() if p.name not in skip} if d.is_dir() else set()


def _veths(node_netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-j", "-n", node_netns, "link"], capture_output=True, text=True, check=True
    )
    return [str(x["ifname"]) for x in json.loads(out.stdout) if str(x["ifname"]).startswith("veth")]


@pytest.mark.parametrize("kubelets", ["routed", "bridge"], indirect=True)
def test_a_pod_runs_serves_its_ports_and_is_unwired_when_deleted(
    kubelets: Node, api_client: Any, k8s_namespace: str
) -> None:
    run_id, (node1, node2) = kubelets.topology.run_id, kubelets.topology.nodes
    server_uid = _create(
        api_client, k8s_namespace, "server", node1.name, [(8080, "TCP"), (5353, "UDP")]
    )
    client_uid = _create(api_client, k8s_namespace, "client", node2.name, [])
    server = _running(api_client, k8s_namespace, "server")
    _running(api_client, k8s_namespace, "client")

    status = server.status
    assert status.pod_ip == "10.244.1.128"
    assert [p.ip for p in status.pod_ips] == ["10.244.1.128", "fd00:10:244:1::1:1"]
    assert [p.ip for p in status.host_ips] == [node1.ip_v4, node1.ip_v6]
    assert {(c.type, c.status) for c in status.conditions} == {
        ("PodScheduled", "True"),
        ("Initialized", "True"),
        ("ContainersReady", "True"),
        ("Ready", "True"),
    }
    (main,) = status.container_statuses
    assert main.ready and main.started and main.state.running is not None
    assert status.start_time is not None

    server_ns = pod_netns_name(run_id, server_uid)
    client_ns = pod_netns_name(run_id, client_uid)
    assert netns.exists(server_ns) and netns.exists(client_ns)
    for dst in ("10.244.1.128", "fd00:10:244:1::1:1"):
        assert _probe(client_ns, dst, 8080, "tcp") == "connected"
        assert _probe(client_ns, dst, 5353, "udp") == "connected"
    assert _probe(client_ns, "10.244.1.128", 8081, "tcp") == "refused"

    # A graceful delete: the kubelet stops the pod, unwires it and removes the object.
    kubernetes.client.CoreV1Api(api_client).delete_namespaced_pod("server", k8s_namespace)
    wait_for("server Pod object gone", lambda: _read(api_client, k8s_namespace, "server") is None)
    wait_for("server netns gone", lambda: not netns.exists(server_ns))
    assert _veths(node1.netns) == []
    assert _leases(kubelets, node1.name) == set()
    assert _probe(client_ns, "10.244.1.128", 8080, "tcp") != "connected"


def test_a_restarted_kubelet_keeps_its_pods_and_unwires_those_deleted_meanwhile(
    kubelets: Node, api_client: Any, k8s_namespace: str
) -> None:
    run_id, node1 = kubelets.topology.run_id, kubelets.topology.nodes[0]
    kept_uid = _create(api_client, k8s_namespace, "kept", node1.name, [(80, "TCP")])
    gone_uid = _create(api_client, k8s_namespace, "gone", node1.name, [])
    client_uid = _create(api_client, k8s_namespace, "client", kubelets.topology.nodes[1].name, [])
    kept_ip = _running(api_client, k8s_namespace, "kept").status.pod_ip
    _running(api_client, k8s_namespace, "gone")
    _running(api_client, k8s_namespace, "client")
    kept_ns, gone_ns = pod_netns_name(run_id, kept_uid), pod_netns_name(run_id, gone_uid)
    inode = netns.netns_inode(kept_ns)

    kubelets.kill(node1.name)
    kubernetes.client.CoreV1Api(api_client).delete_namespaced_pod(
        "gone", k8s_namespace, grace_period_seconds=0
    )
    assert netns.exists(gone_ns)  # nobody unwired it yet
    kubelets.start(node1.name)

    wait_for("the deleted pod's netns torn down", lambda: not netns.exists(gone_ns))
    assert netns.netns_inode(kept_ns) == inode
    leases = _leases(kubelets, node1.name)
    assert kept_ip in leases and len(leases) == 2
    client_ns = pod_netns_name(run_id, client_uid)
    wait_for(
        "the kept pod serving again",
        lambda: _probe(client_ns, kept_ip, 80, "tcp") == "connected",
        timeout=30,
    )


def test_a_host_network_pod_serves_on_its_nodes_addresses(
    kubelets: Node, api_client: Any, k8s_namespace: str
) -> None:
    run_id, (node1, node2) = kubelets.topology.run_id, kubelets.topology.nodes
    _create(api_client, k8s_namespace, "host", node2.name, [(9090, "TCP")], host_network=True)
    client_uid = _create(api_client, k8s_namespace, "client", node1.name, [])
    host = _running(api_client, k8s_namespace, "host")
    _running(api_client, k8s_namespace, "client")
    assert [p.ip for p in host.status.pod_ips] == [node2.ip_v4, node2.ip_v6]
    assert netns.list_names(f"stk-{run_id}-pod-") == [pod_netns_name(run_id, client_uid)]
    assert _probe(pod_netns_name(run_id, client_uid), node2.ip_v4, 9090, "tcp") == "connected"


def test_a_container_whose_runner_is_missing_is_not_ready_with_a_reason(
    kubelets: Node, api_client: Any, k8s_namespace: str
) -> None:
    node1 = kubelets.topology.nodes[0]
    _create(api_client, k8s_namespace, "dns", node1.name, [(53, "UDP")], image=f"{DNS_IMAGE}:1")
    pod = _running(api_client, k8s_namespace, "dns")
    (main,) = pod.status.container_statuses
    if not module_available(DNS_MODULE):
        assert not main.ready
        assert main.state.waiting.reason == "RunContainerError"
        assert DNS_MODULE in main.state.waiting.message
        ready = {c.type: c.status for c in pod.status.conditions}
        assert ready["Ready"] == "False" and ready["ContainersReady"] == "False"
    else:
        assert main.ready
    assert pod.status.pod_ip == "10.244.1.128"  # the pod is wired all the same


def test_a_stopped_kubelet_unwires_its_pods(
    kubelets: Node, api_client: Any, k8s_namespace: str
) -> None:
    run_id, node1 = kubelets.topology.run_id, kubelets.topology.nodes[0]
    uid = _create(api_client, k8s_namespace, "web", node1.name, [(80, "TCP")])
    _running(api_client, k8s_namespace, "web")
    assert _leases(kubelets, node1.name) and _veths(node1.netns)
    kubelets.stop(node1.name)
    assert not netns.exists(pod_netns_name(run_id, uid))
    assert _veths(node1.netns) == []
    assert _leases(kubelets, node1.name) == set()
    cache = node_state_dir(kubelets.state_dir, node1.name) / "cache" / "results"
    assert sorted(p.name for p in cache.iterdir()) == []
