"""A Prometheus text endpoint for the operator (`--metrics-port`): reconcile passes, objects
written, statuses written, leadership; and the probes the chart uses (`--health-port`):
`/healthz` (the process serves) and `/readyz` (kopf is up). Started by `stockade.control.app`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Gauges = Callable[[], dict[str, float]]


def serve_metrics(
    port: int, gauges: Gauges, ready: Callable[[], bool] = lambda: True
) -> ThreadingHTTPServer:
    """Serve `gauges()` at http://0.0.0.0:<port>/metrics (and the probes) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/metrics", "/healthz", "/readyz"):
                self.send_error(404)
                return
            if self.path == "/readyz" and not ready():
                self.send_error(503, "not ready")
                return
            text = "ok\n"
            if self.path == "/metrics":
                text = "".join(f"{k} {v}\n" for k, v in sorted(gauges().items()))
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="stockade-metrics", daemon=True).start()
    return server
