"""What the sandbox kubelet reads from a Pod and writes back, as pure functions of the Pod.

`containers` turns a Pod's containers into what the kubelet runs: the image table `IMAGES` maps
an image (its name without tag or digest) to a kind of process; every image not in it runs as
the podagent echo helper serving the container's declared ports (one helper per pod for all of
them). `pod_status` is the status a kubelet writes for a running pod: phase Running, the four
conditions, podIP(s), hostIP(s), one containerStatus per container and startTime. Called by
`stockade.sandbox.node.kubelet`; no I/O here.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["echo", "dns"]
DNS_IMAGE = "stockade.invalid/sandbox-dns"
# image (without tag or digest) -> how its container runs; anything else is the echo helper.
IMAGES: dict[str, Kind] = {DNS_IMAGE: "dns"}
# Set on Pods that `stockade.sandbox.node.registration.register_pod` wires itself: the kubelet
# leaves them.
DIRECT_ANNOTATION = "stockade.io/sandbox-direct"
PROTOCOLS = ("TCP", "UDP", "SCTP")
CONDITION_TYPES = ("PodScheduled", "Initialized", "ContainersReady", "Ready")


class PodSpecError(ValueError):
    """A Pod the kubelet cannot run as written; the message names the field."""


def image_name(image: str) -> str:
    """`image` without its digest (@sha256:...) or tag (:tag after the last '/')."""
    base = image.split("@", 1)[0]
    slash = base.rfind("/")
    colon = base.rfind(":")
    return base[:colon] if colon > slash else base


def image_kind(image: str) -> Kind:
    return IMAGES.get(image_name(image), "echo")


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    kind: Kind
    ports: tuple[tuple[int, str], ...]  # (port, protocol) as declared, protocol upper case


@dataclass(frozen=True)
class ContainerState:
    """How one container runs: ready, or waiting with a reason (as a containerStatus says)."""

    name: str
    image: str
    ready: bool
    reason: str = ""
    message: str = ""


def containers(pod: Mapping[str, Any]) -> list[Container]:
    """The Pod's containers with their kinds and declared ports; bad ports name the field."""
    spec = pod.get("spec") or {}
    found = []
    for i, c in enumerate(spec.get("containers") or []):
        ports = []
        for j, p in enumerate(c.get("ports") or []):
            where = f"spec.containers[{i}].ports[{j}]"
            number = p.get("containerPort")
            if not isinstance(number, int) or not 1 <= number <= 65535:
                raise PodSpecError(f"{where}.containerPort must be 1..65535, got {number!r}")
            proto = str(p.get("protocol") or "TCP").upper()
            if proto not in PROTOCOLS:
                raise PodSpecError(f"{where}.protocol must be one of {PROTOCOLS}, got {proto!r}")
            ports.append((number, proto))
        image = str(c.get("image") or "")
        found.append(
            Container(str(c.get("name") or f"c{i}"), image, image_kind(image), tuple(ports))
        )
    return found


def echo_ports(found: Sequence[Container]) -> list[tuple[int, str]]:
    """Every port the pod's echo helper serves (all echo containers together, no duplicates)."""
    seen: dict[tuple[int, str], None] = {}
    for c in found:
        if c.kind == "echo":
            for port in c.ports:
                seen.setdefault(port, None)
    return list(seen)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_status(
    uid: str,
    pod_ips: Sequence[str],
    host_ips: Sequence[str],
    states: Sequence[ContainerState],
    started: str,
) -> dict[str, Any]:
    """The status of a running pod whose containers are in `states` (merge-patch body)."""
    all_ready = all(s.ready for s in states)
    conditions = []
    for kind in CONDITION_TYPES:
        ok = all_ready or kind in ("PodScheduled", "Initialized")
        condition: dict[str, Any] = {
            "type": kind,
            "status": "True" if ok else "False",
            "lastTransitionTime": started,
        }
        if not ok:
            waiting = sorted(s.name for s in states if not s.ready)
            condition["reason"] = "ContainersNotReady"
            condition["message"] = f"containers with unready status: [{' '.join(waiting)}]"
        conditions.append(condition)
    statuses = []
    for s in states:
        entry: dict[str, Any] = {
            "name": s.name,
            "image": s.image,
            "imageID": "",
            "containerID": f"stockade://{uid}/{s.name}",
            "ready": s.ready,
            "started": s.ready,
            "restartCount": 0,
        }
        if s.ready:
            entry["state"] = {"running": {"startedAt": started}}
        else:
            entry["state"] = {"waiting": {"reason": s.reason, "message": s.message}}
        statuses.append(entry)
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": conditions,
        "startTime": started,
        "containerStatuses": statuses,
    }
    if pod_ips:
        status["podIP"] = pod_ips[0]
        status["podIPs"] = [{"ip": ip} for ip in pod_ips]
    if host_ips:
        status["hostIP"] = host_ips[0]
        status["hostIPs"] = [{"ip": ip} for ip in host_ips]
    return status


def pending_status(reason: str, message: str, started: str) -> dict[str, Any]:
    """The status of a pod whose sandbox could not be made (network setup failed)."""
    return {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
            {
                "type": "Ready",
                "status": "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": started,
            },
        ],
    }
