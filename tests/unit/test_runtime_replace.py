"""`replace_latest`: a whole-object replace on the server's current resourceVersion, tried again
when another writer (the operator's status write) got in between the read and the write."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from stockade.runtime import replace_latest

OBJ = {"metadata": {"name": "p", "namespace": "x"}, "spec": {"priority": 3}}


class Server:
    """An object store that bumps the version on every write and refuses stale writes; before
    each of the first `interleaved` replaces another writer bumps the version too."""

    def __init__(self, interleaved: int, status: int = 409) -> None:
        self.version = 7
        self.interleaved = interleaved
        self.status = status
        self.written: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": str(self.version)}}

    def write(self, body: dict[str, Any]) -> None:
        if self.interleaved:
            self.interleaved -= 1
            self.version += 1  # the status write between our read and our write
        if body["metadata"]["resourceVersion"] != str(self.version):
            raise ApiException(status=self.status, reason="Conflict")
        self.version += 1
        self.written.append(body)


def test_a_replace_with_no_other_writer_goes_through_once() -> None:
    server = Server(interleaved=0)
    replace_latest(server.read, server.write, OBJ)
    assert server.written == [
        {
            "metadata": {"name": "p", "namespace": "x", "resourceVersion": "7"},
            "spec": {"priority": 3},
        }
    ]


def test_a_conflict_reads_again_and_replaces_on_the_new_version() -> None:
    server = Server(interleaved=2)
    replace_latest(server.read, server.write, OBJ)
    assert [b["metadata"]["resourceVersion"] for b in server.written] == ["9"]
    assert server.written[0]["spec"] == OBJ["spec"]
    assert "resourceVersion" not in OBJ["metadata"]  # the caller's object is left as it was


def test_conflicts_past_the_attempts_reach_the_caller() -> None:
    server = Server(interleaved=3)
    with pytest.raises(ApiException) as err:
        replace_latest(server.read, server.write, OBJ, attempts=3)
    assert err.value.status == 409
    assert server.written == []


def test_other_refusals_are_not_retried() -> None:
    server = Server(interleaved=1, status=422)
    with pytest.raises(ApiException) as err:
        replace_latest(server.read, server.write, OBJ)
    assert err.value.status == 422
    assert server.interleaved == 0 and server.written == []
