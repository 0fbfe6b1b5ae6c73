"""The sandbox's cluster DNS: an authoritative resolver for `cluster.local`, of stockade's own.

It runs as a process in the machine's own namespace, so that it reaches the API server on
loopback, with its UDP and TCP sockets opened inside the DNS pod's network namespace:

    python -m stockade.sandbox.cluster.dns --kubeconfig K --netns NS [--port 53]

The sockets are created by a short-lived thread that enters NS and leaves again before any other
thread starts (setns is per thread; a socket stays in the namespace it was created in), and then
served from the main thread with asyncio. Services and EndpointSlices are watched (list, then
watch from the list's resourceVersion, relist when the watch expires or fails) and the zone is
rebuilt in memory on every change (`stockade.sandbox.cluster.names` says what it answers).

`install(api)` creates the `kube-dns` Service (ClusterIP 10.96.0.10) and a one-replica Deployment
whose container image is `DNS_IMAGE`: the sandbox's kubelet stand-in runs `command(...)` for that
container instead of the pod helper. `examples/allow-dns-egress.yaml` selects these pods by
`k8s-app: kube-dns` in namespace kube-system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.watch
from kubernetes.client import V1Deployment, V1Service
from kubernetes.client.exceptions import ApiException

from stockade.runtime import load_client_configuration
from stockade.sandbox import netns
from stockade.sandbox.cluster.dnswire import Malformed, error_response, parse_query
from stockade.sandbox.cluster.names import Zone, answer
from stockade.sandbox.controlplane.server import SERVICE_CIDR

DNS_IMAGE = "stockade.invalid/sandbox-dns"
NAMESPACE = "kube-system"
SERVICE_NAME = "kube-dns"
LABELS = {"k8s-app": "kube-dns"}
CLUSTER_IP = str(ipaddress.ip_network(SERVICE_CIDR)[10])  # 10.96.0.10, as kubeadm picks it
PORT = 53
TCP_IDLE_S = 10.0
TCP_MAX_CONNECTIONS = 64
# The UDP socket's receive buffer: queries that arrive while the resolver is not scheduled wait
# there, and the kernel's default (208 KiB, about 190 small datagrams) drops the rest of a burst,
# so one pod's flood would cost other pods their queries. 4 MiB holds about 3,500.
UDP_RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value; Python 3.11 lacks it
WATCH_TIMEOUT_S = 60
RELIST_BACKOFF_S = 1.0
HTTP_CONFLICT = 409
HTTP_NOT_FOUND = 404


class DnsError(RuntimeError):
    """The cluster DNS could not be installed or did not come up; the message says what."""


SERVICE_NAME_LABEL = "kubernetes.io/service-name"

log = logging.getLogger("stockade.sandbox.dns")


def command(kubeconfig: Path, netns_name: str, port: int = PORT) -> list[str]:
    """The command line that runs the resolver for the DNS pod in `netns_name`."""
    return [
        sys.executable,
        "-m",
        "stockade.sandbox.cluster.dns",
        "--kubeconfig",
        str(kubeconfig),
        "--netns",
        netns_name,
        "--port",
        str(port),
    ]


# -- the zone, from the API server -----------------------------------------------------------------


class ZoneState:
    """Services and EndpointSlices as last seen; `zone` is rebuilt after every change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[tuple[str, str], tuple[str, ...] | None] = {}  # None: headless
        self._ports: dict[tuple[str, str], tuple[tuple[str, str, int], ...]] = {}
        self._slices: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
        self._serial = 0
        self.zone = Zone()
        self.synced = {"services": threading.Event(), "endpointslices": threading.Event()}

    def _rebuild(self) -> None:
        services: dict[tuple[str, str], tuple[str, ...]] = {}
        for (ns, name), ips in self._services.items():
            if ips is None:
                found = [
                    address
                    for (slice_ns, _), (svc, addresses) in sorted(self._slices.items())
                    if slice_ns == ns and svc == name
                    for address in addresses
                ]
                services[(ns, name)] = tuple(dict.fromkeys(found))
            else:
                services[(ns, name)] = ips
        self._serial += 1
        ports = {key: self._ports.get(key, ()) for key in services}
        self.zone = Zone(services=services, ports=ports, serial=self._serial)

    def set_services(self, items: list[Any]) -> None:
        with self._lock:
            self._services = dict(_service_entry(obj) for obj in items)
            self._ports = {_key(obj): _service_ports(obj) for obj in items}
            self._rebuild()

    def service_event(self, kind: str, obj: Any) -> None:
        key, value = _service_entry(obj)
        with self._lock:
            if kind == "DELETED":
                self._services.pop(key, None)
                self._ports.pop(key, None)
            else:
                self._services[key] = value
                self._ports[key] = _service_ports(obj)
            self._rebuild()

    def set_slices(self, items: list[Any]) -> None:
        with self._lock:
            self._slices = dict(_slice_entry(obj) for obj in items)
            self._rebuild()

    def slice_event(self, kind: str, obj: Any) -> None:
        key, value = _slice_entry(obj)
        with self._lock:
            if kind == "DELETED":
                self._slices.pop(key, None)
            else:
                self._slices[key] = value
            self._rebuild()


def _key(obj: Any) -> tuple[str, str]:
    return str(obj.metadata.namespace), str(obj.metadata.name)


def _service_ports(obj: Any) -> tuple[tuple[str, str, int], ...]:
    """(name, protocol in lower case, port) of each named port, for SRV answers."""
    ports = (obj.spec.ports if obj.spec is not None else None) or []
    return tuple(
        (str(p.name).lower(), str(p.protocol or "TCP").lower(), int(p.port))
        for p in ports
        if p.name
    )


def _service_entry(obj: Any) -> tuple[tuple[str, str], tuple[str, ...] | None]:
    key = _key(obj)
    spec = obj.spec
    if spec is None or spec.type == "ExternalName":
        return key, ()
    ips = [ip for ip in (spec.cluster_ips or [spec.cluster_ip]) if ip]
    if "None" in ips:
        return key, None
    return key, tuple(ips)


def _slice_entry(obj: Any) -> tuple[tuple[str, str], tuple[str, tuple[str, ...]]]:
    key = _key(obj)
    service = ((obj.metadata.labels or {}).get(SERVICE_NAME_LABEL)) or ""
    addresses: list[str] = []
    for endpoint in obj.endpoints or []:
        conditions = endpoint.conditions
        # A nil `ready` means ready (EndpointConditions in discovery.k8s.io/v1).
        if conditions is not None and conditions.ready is False:
            continue
        addresses += list(endpoint.addresses or [])
    return key, (service, tuple(addresses))


def _watch_forever(
    what: str,
    list_all: Callable[..., Any],
    reset: Callable[[list[Any]], None],
    event: Callable[[str, Any], None],
    synced: threading.Event,
    stop: threading.Event,
) -> None:
    """List, then watch from the list's resourceVersion; relist when the watch ends in error
    (410 Gone when it expired) or the API server cannot be reached."""
    while not stop.is_set():
        try:
            listed = list_all()
            reset(list(listed.items))
            synced.set()
            version = listed.metadata.resource_version
            while not stop.is_set():
                watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
                for item in watch.stream(  # type: ignore[no-untyped-call]
                    list_all, resource_version=version, timeout_seconds=WATCH_TIMEOUT_S
                ):
                    kind, obj = item["type"], item["object"]
                    if kind == "ERROR":
                        raise ApiException(status=getattr(obj, "code", 0) or 410)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        event(kind, obj)
                    version = watch.resource_version or version
                    if stop.is_set():
                        return
        except Exception as exc:  # any failure: log and relist
            log.warning("watch of %s failed (%s); relisting", what, exc)
            stop.wait(RELIST_BACKOFF_S)


def start_watches(api: Any, state: ZoneState, stop: threading.Event) -> list[threading.Thread]:
    core = kubernetes.client.CoreV1Api(api)
    discovery = kubernetes.client.DiscoveryV1Api(api)
    threads = [
        threading.Thread(
            target=_watch_forever,
            args=(
                "services",
                core.list_service_for_all_namespaces,
                state.set_services,
                state.service_event,
                state.synced["services"],
                stop,
            ),
            name="watch-services",
            daemon=True,
        ),
        threading.Thread(
            target=_watch_forever,
            args=(
                "endpointslices",
                discovery.list_endpoint_slice_for_all_namespaces,
                state.set_slices,
                state.slice_event,
                state.synced["endpointslices"],
                stop,
            ),
            name="watch-endpointslices",
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()
    return threads


# -- sockets inside the pod's namespace -----------------------------------------------------------


def open_sockets(netns_name: str, port: int) -> tuple[socket.socket, socket.socket]:
    """(udp, tcp) bound to [::]:port, dual stack, created inside namespace `netns_name` by a
    thread of their own, so that no other thread ever runs in that namespace."""
    try:
        return netns.made_inside(netns_name, lambda: _bind(port))
    except Exception as exc:
        raise OSError(f"cannot listen on port {port} in netns {netns_name!r}: {exc}") from exc


def _bind(port: int) -> tuple[socket.socket, socket.socket]:
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        for sock in (udp, tcp):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.setblocking(False)
        _set_receive_buffer(udp, UDP_RECEIVE_BUFFER)
        tcp.listen(TCP_MAX_CONNECTIONS)
    except BaseException:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


def _set_receive_buffer(sock: socket.socket, size: int) -> None:
    """Give `sock` a receive buffer of `size` bytes: past net.core.rmem_max when the process may
    (SO_RCVBUFFORCE needs CAP_NET_ADMIN, which the resolver has as the sandbox runs it), else as
    much as rmem_max allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# -- serving ---------------------------------------------------------------------------------------


def handle(state: ZoneState, data: bytes, *, tcp: bool) -> bytes | None:
    """The response to one message, or None to drop it. Never raises."""
    try:
        parsed = parse_query(data)
        if parsed is None:
            return None
        if isinstance(parsed, Malformed):
            return error_response(parsed)
        return answer(state.zone, parsed, tcp=tcp)
    except Exception:  # a bug must not take the server down; the message is dropped
        log.exception("unexpected failure answering a query")
        return None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, state: ZoneState) -> None:
        self.state = state

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = handle(self.state, data, tcp=False)
        if reply is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


async def _tcp_client(
    state: ZoneState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S))
            data = await asyncio.wait_for(reader.readexactly(size[0]), TCP_IDLE_S)
            reply = handle(state, data, tcp=True)
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve(state: ZoneState, udp: socket.socket, tcp: socket.socket) -> None:
    """Answer on `udp` and `tcp` until cancelled."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(state), sock=udp)
    open_connections = 0

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        if open_connections >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        open_connections += 1
        try:
            await _tcp_client(state, reader, writer)
        finally:
            open_connections -= 1

    server = await asyncio.start_server(client, sock=tcp)
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
        transport.close()


# -- installing the DNS Service and Deployment ----------------------------------------------


def service_body() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE_NAME, "namespace": NAMESPACE, "labels": dict(LABELS)},
        "spec": {
            "selector": dict(LABELS),
            "clusterIP": CLUSTER_IP,
            "ports": [
                {"name": "dns", "port": PORT, "protocol": "UDP", "targetPort": PORT},
                {"name": "dns-tcp", "port": PORT, "protocol": "TCP", "targetPort": PORT},
            ],
        },
    }


def deployment_body() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "coredns", "namespace": NAMESPACE, "labels": dict(LABELS)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(LABELS)},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "dns",
                            "image": DNS_IMAGE,
                            "ports": [
                                {"name": "dns", "containerPort": PORT, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": PORT, "protocol": "TCP"},
                            ],
                        }
                    ],
                },
            },
        },
    }


def install(api: Any) -> None:
    """Create the `kube-dns` Service and its Deployment in kube-system (idempotent: objects that
    exist are left as they are)."""
    core = kubernetes.client.CoreV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    service, deployment = service_body(), deployment_body()
    _ensure(
        lambda: core.read_namespaced_service(SERVICE_NAME, NAMESPACE),
        lambda: core.create_namespaced_service(NAMESPACE, V1Service.model_validate(service)),
    )
    _ensure(
        lambda: apps.read_namespaced_deployment(deployment["metadata"]["name"], NAMESPACE),
        lambda: apps.create_namespaced_deployment(
            NAMESPACE, V1Deployment.model_validate(deployment)
        ),
    )


def wait_available(api: Any, timeout: float = 90.0) -> None:
    """Wait until the DNS Deployment has an available replica (the scheduler placed its pod, a
    kubelet stand-in runs it and reported it Ready); DnsError naming what is missing if not."""
    apps = kubernetes.client.AppsV1Api(api)
    name = deployment_body()["metadata"]["name"]
    deadline = time.monotonic() + timeout
    while True:
        status = apps.read_namespaced_deployment(name, NAMESPACE).status
        if status is not None and (status.available_replicas or 0) >= 1:
            return
        if time.monotonic() > deadline:
            raise DnsError(
                f"deployment {NAMESPACE}/{name} has no available replica after {timeout:.0f}s: "
                "is a kubelet stand-in running on some node?"
            )
        time.sleep(0.25)


def _ensure(read: Callable[[], object], create: Callable[[], object]) -> None:
    """Create unless it exists. Read first: creating the Service again would fail on its taken
    ClusterIP (422), not as a conflict."""
    try:
        read()
        return
    except ApiException as exc:
        if exc.status != HTTP_NOT_FOUND:
            raise
    try:
        create()
    except ApiException as exc:
        if exc.status != HTTP_CONFLICT:
            raise


# -- the process ----------------------------------------------------------------------------


def _api_client(kubeconfig: Path) -> Any:
    return kubernetes.client.ApiClient(load_client_configuration(str(kubeconfig)))


def _wait_synced(state: ZoneState, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(e.wait(max(0.0, deadline - time.monotonic())) for e in state.synced.values())


@contextlib.contextmanager
def _watching(api: Any, state: ZoneState) -> Iterator[None]:
    stop = threading.Event()
    threads = start_watches(api, state, stop)
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stockade.sandbox.cluster.dns",
        description="The sandbox's cluster DNS for cluster.local, listening inside a netns.",
    )
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--netns", required=True, help="the DNS pod's network namespace")
    parser.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be within 1..65535, got {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.kubeconfig.is_file():
        parser.error(f"--kubeconfig {args.kubeconfig}: no such file")
    # The sockets first, while this is the only thread.
    try:
        udp, tcp = open_sockets(args.netns, args.port)
    except OSError as exc:
        parser.exit(1, f"{parser.prog}: error: --netns/--port: {exc}\n")
    state = ZoneState()
    with _api_client(args.kubeconfig) as api, _watching(api, state):
        if not _wait_synced(state, 30.0):
            log.warning("Services/EndpointSlices not listed yet; answering from what is known")
        log.info("serving cluster.local on port %d in netns %s", args.port, args.netns)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(state, udp, tcp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
