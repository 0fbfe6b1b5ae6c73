"""What the sandbox kubelet reads from a Pod and writes back: container kinds by image (tags and
digests ignored), the ports its echo helper serves, bad ports named by field, the status of a
running pod (ready or not), and the pod namespace's name."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.sandbox.node import podspec
from stockade.sandbox.node.kubelet import pod_netns_name
from stockade.sandbox.node.podspec import ContainerState, PodSpecError


@pytest.mark.parametrize(
    ("image", "kind"),
    [
        ("stockade.invalid/sandbox-dns", "dns"),
        ("stockade.invalid/sandbox-dns:v1", "dns"),
        ("stockade.invalid/sandbox-dns@sha256:abc", "dns"),
        ("registry:5000/nginx:1.27", "echo"),
        ("busybox", "echo"),
    ],
    ids=["dns", "dns-tag", "dns-digest", "registry-port", "bare"],
)
def test_an_image_maps_to_its_kind_of_process(image: str, kind: str) -> None:
    assert podspec.image_kind(image) == kind


def _pod(*containers: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"containers": list(containers)}}


def test_the_echo_helper_serves_every_declared_port_of_every_echo_container_once() -> None:
    pod = _pod(
        {
            "name": "a",
            "image": "x",
            "ports": [{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}],
        },
        {
            "name": "b",
            "image": "y",
            "ports": [
                {"containerPort": 80, "protocol": "TCP"},
                {"containerPort": 9, "protocol": "SCTP"},
            ],
        },
        {
            "name": "dns",
            "image": podspec.DNS_IMAGE,
            "ports": [{"containerPort": 5353, "protocol": "UDP"}],
        },
        {"name": "none", "image": "z"},
    )
    found = podspec.containers(pod)
    assert [c.kind for c in found] == ["echo", "echo", "dns", "echo"]
    assert podspec.echo_ports(found) == [(80, "TCP"), (53, "UDP"), (9, "SCTP")]


@pytest.mark.parametrize(
    ("port", "field"),
    [
        ({"containerPort": 0}, r"spec.containers\[0\].ports\[0\].containerPort"),
        ({"containerPort": 80, "protocol": "ICMP"}, r"spec.containers\[0\].ports\[0\].protocol"),
    ],
    ids=["port", "protocol"],
)
def test_a_bad_port_is_rejected_naming_the_field(port: dict[str, Any], field: str) -> None:
    with pytest.raises(PodSpecError, match=field):
        podspec.containers(_pod({"name": "a", "image": "x", "ports": [port]}))


def test_a_running_pod_with_ready_containers_is_ready_with_its_addresses() -> None:
    status = podspec.pod_status(
        "u1", ["10.0.0.2", "fd00::2"], ["172.18.0.11"], [ContainerState("a", "x", True)], "T"
    )
    assert status["phase"] == "Running"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PodScheduled": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    assert status["podIP"] == "10.0.0.2"
    assert status["podIPs"] == [{"ip": "10.0.0.2"}, {"ip": "fd00::2"}]
    assert status["hostIPs"] == [{"ip": "172.18.0.11"}]
    (main,) = status["containerStatuses"]
    assert main["ready"] and main["started"] and main["state"] == {"running": {"startedAt": "T"}}


def test_a_container_that_did_not_start_keeps_the_pod_not_ready_with_its_reason() -> None:
    states = [
        ContainerState("a", "x", True),
        ContainerState("dns", "d", False, "RunContainerError", "no dns"),
    ]
    status = podspec.pod_status("u1", ["10.0.0.2"], [], states, "T")
    ready = {c["type"]: c for c in status["conditions"]}
    assert ready["Ready"]["status"] == "False"
    assert ready["ContainersReady"]["message"] == "containers with unready status: [dns]"
    dns = status["containerStatuses"][1]
    assert dns["ready"] is False
    assert dns["state"] == {"waiting": {"reason": "RunContainerError", "message": "no dns"}}


def test_the_pod_namespace_is_named_after_the_run_and_the_uid() -> None:
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert pod_netns_name("ab1c2", uid) == "stk-ab1c2-pod-0f1e2d3c4b5a"
