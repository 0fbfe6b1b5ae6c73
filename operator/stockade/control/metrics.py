"""A Prometheus text endpoint for the operator (`--metrics-port`): reconcile passes, objects
written, statuses written, leadership. Started by `stockade.control.app`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Gauges = Callable[[], dict[str, float]]


def serve_metrics(port: int, gauges: Gauges) -> ThreadingHTTPServer:
    """Serve `gauges()` at http://0.0.0.0:<port>/metrics in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in ("/metrics", "/healthz"):
                self.send_error(404)
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
