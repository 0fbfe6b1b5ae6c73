"""The metrics and probe server holds a bounded number of connections: one past the bound is
answered 503 and closed at once instead of getting a thread, a connection that sends nothing is
closed after the handler's timeout, and a freed slot serves again."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from stockade import runtime
from stockade.runtime import serve_http

LIMIT = 2


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    monkeypatch.setattr(runtime, "REQUEST_TIMEOUT", 30.0)  # idle connections outlive the test
    server = serve_http(0, lambda: "m 1\n", max_connections=LIMIT)
    yield server
    server.shutdown()
    server.server_close()


def get(port: int, path: str = "/healthz") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def idle(port: int) -> socket.socket:
    """A connection that sends nothing and so holds its slot; the server has accepted it once
    a request sent after it has been answered."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_a_connection_past_the_bound_is_answered_503_and_a_freed_slot_serves_again(
    server: ThreadingHTTPServer,
) -> None:
    port = int(server.server_address[1])
    held = [idle(port) for _ in range(LIMIT)]
    try:
        assert get(port) == 503
        assert get(port, "/metrics") == 503
    finally:
        for conn in held:
            conn.close()
    statuses = [get(port) for _ in range(50)]  # the held slots free as their threads see EOF
    assert statuses[-1] == 200


def test_a_connection_under_the_bound_is_served(server: ThreadingHTTPServer) -> None:
    port = int(server.server_address[1])
    held = idle(port)
    try:
        assert get(port, "/metrics") == 200
    finally:
        held.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "REQUEST_TIMEOUT", 0.2)
    server = serve_http(0, lambda: "", max_connections=1)
    try:
        conn = idle(int(server.server_address[1]))
        conn.settimeout(10)
        assert conn.recv(1) == b""  # closed by the server, not by our timeout
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
