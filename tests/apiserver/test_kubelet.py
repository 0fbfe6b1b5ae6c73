"""The sandbox kubelet stand-in registers Nodes and Pods that look to API clients as if a kubelet
ran them: Ready, schedulable nodes with dual-stack pod CIDRs, InternalIPs and capacity, Running
and Ready pods bound to a node with their IPs and named container ports, label updates, and
immediate deletion."""

from __future__ import annotations

from typing import Any

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from stockade.sandbox.node.registration import (
    delete_pod,
    register_node,
    register_pod,
    set_pod_labels,
)
from stockade.sandbox.topology import PodNet, node_net

NODE = node_net("kt0", 7)
POD = PodNet(
    key="ns/web",
    node=NODE.name,
    netns="stk-kt0-n7p2",
    ip_v4="10.244.7.2",
    ip_v6="fd00:10:244:7::2",
    host_ifname="stkkt0n7p2",
    pod_ifname="eth0",
)
PORTS: list[tuple[str | None, int, str]] = [
    ("web", 80, "TCP"),
    ("dns", 53, "UDP"),
    (None, 8080, "TCP"),
]


def _core(api: Any) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api)


def test_a_registered_node_is_ready_with_dual_stack_pod_cidrs_and_internal_ips(
    api_client: Any,
) -> None:
    register_node(api_client, NODE)
    register_node(api_client, NODE)  # registering again updates in place
    node = _core(api_client).read_node(NODE.name)
    assert node.spec is not None and node.status is not None
    assert node.spec.pod_cidr == "10.244.7.0/24"
    assert node.spec.pod_cidrs == ["10.244.7.0/24", "fd00:10:244:7::/64"]
    ready = [(c.type, c.status) for c in node.status.conditions or []]
    assert ready == [("Ready", "True")]
    assert not node.spec.taints  # schedulable: the API server's not-ready taint is lifted
    assert (node.status.allocatable or {}).get("pods") == "110"
    internal = [a.address for a in node.status.addresses or [] if a.type == "InternalIP"]
    assert internal == [NODE.ip_v4, NODE.ip_v6]


def test_a_registered_pod_is_running_and_ready_on_its_node(
    api_client: Any, k8s_namespace: str
) -> None:
    register_node(api_client, NODE)
    register_pod(api_client, k8s_namespace, "web", POD, {"app": "web"}, PORTS)
    pod = _core(api_client).read_namespaced_pod("web", k8s_namespace)
    assert pod.spec is not None and pod.status is not None and pod.metadata is not None
    assert pod.spec.node_name == NODE.name
    assert pod.metadata.labels == {"app": "web"}
    ports = [(p.name, p.container_port, p.protocol) for p in pod.spec.containers[0].ports or []]
    assert ports == PORTS
    assert pod.status.phase == "Running"
    conditions = {c.type: c.status for c in pod.status.conditions or []}
    assert conditions["Ready"] == "True"
    assert pod.status.pod_ip == POD.ip_v4
    assert [p.ip for p in pod.status.pod_ips or []] == [POD.ip_v4, POD.ip_v6]
    assert pod.status.host_ip == NODE.ip_v4


def test_pod_labels_are_replaced(api_client: Any, k8s_namespace: str) -> None:
    register_node(api_client, NODE)
    register_pod(api_client, k8s_namespace, "web", POD, {"app": "web", "tier": "a"}, PORTS)
    set_pod_labels(api_client, k8s_namespace, "web", {"app": "web", "color": "blue"})
    pod = _core(api_client).read_namespaced_pod("web", k8s_namespace)
    assert pod.metadata is not None
    assert pod.metadata.labels == {"app": "web", "color": "blue"}


def test_a_deleted_pod_is_gone_at_once_and_deleting_it_again_is_fine(
    api_client: Any, k8s_namespace: str
) -> None:
    register_node(api_client, NODE)
    register_pod(api_client, k8s_namespace, "web", POD, {}, PORTS)
    delete_pod(api_client, k8s_namespace, "web")
    with pytest.raises(ApiException) as err:
        _core(api_client).read_namespaced_pod("web", k8s_namespace)
    assert err.value.status == 404
    delete_pod(api_client, k8s_namespace, "web")


def test_a_pod_on_an_unregistered_node_is_refused_with_the_node_name(
    api_client: Any, k8s_namespace: str
) -> None:
    stray = PodNet(**{**POD.__dict__, "node": "node-unknown"})
    with pytest.raises(ValueError, match="node-unknown"):
        register_pod(api_client, k8s_namespace, "web", stray, {}, PORTS)
