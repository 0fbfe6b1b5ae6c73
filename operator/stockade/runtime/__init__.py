"""Process plumbing the operator and the agent share: how they find the API server, and the
small HTTP server for `/metrics` and the probes the Helm chart uses (`/healthz`, `/readyz`);
and the one way the tools that write policies for a user (the sandbox, the conformance engines)
replace a whole object. Beside it: `runner` (the rate-limited runner of the operator's reconcile
and of the agent's sync) and `command` (the command-line and process plumbing of both).

Called by `stockade.control.app`, `stockade.agent.app`, `stockade.sandbox.workloads.running` and
`stockade.conformance.engines.cluster`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kubernetes.client
import kubernetes.config

HTTP_CONFLICT = 409
# NODE=URL,...: where `stockade explain`, `observe`, `usage` and `status` find the agents when
# not through the API server (`stockade.inspect.agents`); `stockade sandbox up` prints it.
AGENTS_ENV = "STOCKADE_AGENTS"


def load_client_configuration(kubeconfig: str | None) -> kubernetes.client.Configuration:
    """A kubeconfig file when given, else the in-cluster service account, else ~/.kube/config."""
    cfg = kubernetes.client.Configuration()
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        return cfg
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return cfg


DEFAULT_BIND_ADDRESS = "0.0.0.0"  # kubelet probes the pod IP, the node's for the agent
MAX_CONNECTIONS = 8  # a kubelet's probes and a scraper or two need far fewer
REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request
# A JSON route: the query's parameters in, a JSON-serialisable answer out; ValueError is the
# caller's mistake (400), naming the parameter.
JsonRoute = Callable[[Mapping[str, str]], object]
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, but at most `limit` at once: a connection past the bound is
    answered 503 and closed by the accepting thread, so that a flood of connections (the agent
    listens on the host network) costs no threads and leaves the probes a slot once it ends."""

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limit: int
    ) -> None:
        if ipaddress.ip_address(address[0]).version == 6:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(limit)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):  # a peer gone already: only close
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def bind_address_error(address: str) -> str | None:
    """Why `address` cannot be the address of `serve_http`, or None."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"--bind-address: {address!r} is not an IPv4 or IPv6 address"
    return None


def serve_http(
    port: int,
    metrics: Callable[[], str],
    ready: Callable[[], bool] = lambda: True,
    address: str = DEFAULT_BIND_ADDRESS,
    max_connections: int = MAX_CONNECTIONS,
    routes: Mapping[str, JsonRoute] | None = None,
) -> ThreadingHTTPServer:
    """Serve `metrics()` at http://<address>:<port>/metrics, `/healthz` (the process serves) and
    `/readyz` (`ready()`), in a daemon thread; the caller shuts it down. At most
    `max_connections` connections are served at once (the rest get 503), and one that has not
    sent its request within REQUEST_TIMEOUT seconds is closed. Each of `routes` (a path and a
    `JsonRoute`) answers GET requests with JSON (the agent's flow log, rule usage and traces)."""
    json_routes = dict(routes or {})

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT

        def _json(self, route: JsonRoute, query: str) -> None:
            try:
                body = json.dumps(route(dict(parse_qsl(query))), sort_keys=True).encode()
            except ValueError as exc:
                self.send_error(400, str(exc))
                return
            except Exception as exc:  # a failing route must not take the server down
                self.send_error(500, str(exc))
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in json_routes:
                self._json(json_routes[url.path], url.query)
                return
            if self.path not in ("/metrics", "/healthz", "/readyz"):
                self.send_error(404)
                return
            if self.path == "/readyz" and not ready():
                self.send_error(503, "not ready")
                return
            try:
                body = (metrics() if self.path == "/metrics" else "ok\n").encode()
            except Exception as exc:  # a broken gauge must not take the probes down
                self.send_error(500, str(exc))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = _BoundedServer((address, port), Handler, max_connections)
    threading.Thread(target=server.serve_forever, name="stockade-http", daemon=True).start()
    return server


def replace_latest(
    read: Callable[[], Mapping[str, Any]],
    write: Callable[[dict[str, Any]], object],
    obj: Mapping[str, Any],
    attempts: int = 5,
) -> None:
    """Replace an object by `obj` on the resourceVersion the server holds now, as `kubectl
    replace` does. A write between the read and the replace (the operator's own status write)
    makes the server refuse with 409 Conflict; the read and replace are then tried again, up to
    `attempts` times, since the replace carries the whole spec and loses nothing by going again."""
    for attempt in range(attempts):
        version = read()["metadata"]["resourceVersion"]
        try:
            write({**obj, "metadata": {**obj["metadata"], "resourceVersion": version}})
        except kubernetes.client.exceptions.ApiException as err:
            if err.status != HTTP_CONFLICT or attempt == attempts - 1:
                raise
        else:
            return


def replace_custom_object(
    api: Any,  # a kubernetes.client.CustomObjectsApi
    group: str,
    version: str,
    plural: str,
    namespace: str,
    name: str,
    obj: Mapping[str, Any],
) -> None:
    """`replace_latest` of a custom object, namespaced when `namespace` is not empty."""
    if namespace:
        where = (group, version, namespace, plural, name)
        replace_latest(
            lambda: api.get_namespaced_custom_object(*where),
            lambda body: api.replace_namespaced_custom_object(*where, body),
            obj,
        )
    else:
        cluster = (group, version, plural, name)
        replace_latest(
            lambda: api.get_cluster_custom_object(*cluster),
            lambda body: api.replace_cluster_custom_object(*cluster, body),
            obj,
        )
