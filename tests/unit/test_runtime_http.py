"""The metrics and probe server holds a bounded number of connections: one past the bound is
answered 503 and closed at once instead of getting a thread, a connection that sends nothing is
closed after the handler's timeout, and a freed slot serves again."""

from __future__ import annotations

import argparse
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer

import pytest

from stockade import runtime
from stockade.agent.config import AgentConfig
from stockade.control.config import OperatorConfig
from stockade.runtime import serve_http
from stockade.runtime.command import add_process_arguments

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


def test_the_server_listens_on_the_address_it_is_given() -> None:
    server = serve_http(0, lambda: "", address="127.0.0.1")
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert get(int(server.server_address[1])) == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "config",
    [
        lambda address: AgentConfig(node="node-1", bind_address=address),
        lambda address: OperatorConfig(bind_address=address),
    ],
    ids=["agent", "operator"],
)
def test_both_processes_take_an_ip_address_to_bind_and_reject_anything_else(
    config: Callable[[str], object],
) -> None:
    for good in ("0.0.0.0", "127.0.0.1", "::", "fd00::1"):
        config(good)
    with pytest.raises(ValueError, match="--bind-address: 'localhost' is not an IPv4"):
        config("localhost")


def test_the_bind_address_flag_defaults_to_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCKADE_BIND_ADDRESS", "10.0.0.7")
    parser = argparse.ArgumentParser()
    add_process_arguments(parser)
    assert parser.parse_args([]).bind_address == "10.0.0.7"
    assert parser.parse_args(["--bind-address", "::1"]).bind_address == "::1"
