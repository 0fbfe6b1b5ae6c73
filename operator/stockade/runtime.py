"""Process plumbing the operator and the agent share: how they find the API server, and the
small HTTP server for `/metrics` and the probes the Helm chart uses (`/healthz`, `/readyz`).

Called by `stockade.control.app` and `stockade.agent.app`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes.client
import kubernetes.config


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


def serve_http(
    port: int, metrics: Callable[[], str], ready: Callable[[], bool] = lambda: True
) -> ThreadingHTTPServer:
    """Serve `metrics()` at http://0.0.0.0:<port>/metrics, `/healthz` (the process serves) and
    `/readyz` (`ready()`), in a daemon thread; the caller shuts it down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
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

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="stockade-http", daemon=True).start()
    return server
