"""The agent's side of stockade-cni: a unix socket on the node where the chained CNI plugin
relays ADD, CHECK and DEL (cni/main.go documents the wire format: one JSON request line per
connection, one JSON answer line back).

`stockade.agent.app` starts a `CniServer` with the agent's `PendingPods`; each connection is
served on its own thread, so parallel ADDs wait on their budgets side by side. The socket is
created mode 0600 (only root on the node may talk to it: a CNI plugin runs as root).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path

from stockade.agent.pending import CniRequest, CniRequestError, PendingPods

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/stockade/cni.sock")
MAX_REQUEST = 1 << 20  # bytes: a configuration with its prevResult is a few KiB
READ_TIMEOUT = 10.0  # seconds for the relay to send its request line


class CniServer:
    def __init__(self, path: Path, pods: PendingPods) -> None:
        self.path = path
        self.pods = pods
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="stockade-cni", daemon=True)
        self._thread.start()
        log.info("CNI relay socket at %s", self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(READ_TIMEOUT)
                line = _read_line(conn)
                conn.settimeout(None)
                req = CniRequest.parse(json.loads(line))
                self.pods.handle(req)
                answer: dict[str, object] = {"ok": True}
            except (CniRequestError, ValueError) as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception as exc:
                log.warning("CNI request failed: %s", exc)
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise CniRequestError(f"request: longer than {MAX_REQUEST} bytes")
    return data
