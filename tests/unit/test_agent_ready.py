"""The agent's `/readyz` means "this node's tables are applied": not before the first complete
published set has been applied, and then for good (a later failed sync leaves the last applied
set in force, so the node still enforces policy)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from stockade.agent.sync import Syncer
from stockade.handoff import TableObject
from stockade.runtime import serve_http


def idle_syncer(objects: Callable[[], Mapping[str, TableObject]] = dict) -> Syncer:
    """A Syncer with nothing published: it never reaches the programs or the attachments."""
    none = cast(Any, None)
    return Syncer("node-1", objects, none, none, None, Path("/sys/fs/bpf/stockade-unused"))


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], bool]], int]]:
    servers = []

    def start(ready: Callable[[], bool]) -> int:
        server = serve_http(0, lambda: "", ready=ready)
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_new_agent_has_applied_nothing() -> None:
    assert not idle_syncer().applied


def test_an_agent_waiting_for_a_complete_published_set_has_applied_nothing() -> None:
    syncer = idle_syncer()
    assert syncer.sync() is False
    assert syncer.stats.waiting
    assert not syncer.applied


def test_an_agent_that_applied_a_set_once_has_applied_tables() -> None:
    syncer = idle_syncer()
    syncer.stats.applied_generation = 0  # what _apply records for the first generation
    assert syncer.applied


def test_readyz_answers_503_until_ready_and_200_after(
    serve: Callable[[Callable[[], bool]], int],
) -> None:
    syncer = idle_syncer()
    port = serve(lambda: syncer.applied)
    assert (status(port, "/readyz"), status(port, "/healthz")) == (503, 200)
    syncer.stats.applied_generation = 4
    assert status(port, "/readyz") == 200
