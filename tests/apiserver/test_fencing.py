"""Fencing against a real API server: a deposed leader's late write does not land over the new
leader's tables. Two replicas share one Lease (`LeaseElector`, its rounds driven here rather than
by its thread); the first stops renewing without releasing, as a paused or cut-off process does,
and the second takes the lease over once the record has not changed for the lease's duration.

Two ways a late write is stopped: the publisher asks whether it still leads before each wave of
writes (`NotLeader`), and a write whose check passed before the takeover carries the
resourceVersion the writer last saw, so the server refuses it (409) once the new leader has
written the object (`WriteConflict`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest

from stockade import handoff
from stockade.control import publish
from stockade.control.lease import LeaseElector
from stockade.control.plan import NodeParts
from stockade.control.publish import Publisher
from stockade.model.crd_schema import GROUP, VERSION
from tests.apiserver.test_publish import PLURAL, assembled
from tests.fixtures.controlplane import wait_for
from tests.fixtures.handoff_tables import same, tables

DURATION = 1.0  # seconds: the takeover waits this out


@pytest.fixture
def electors(api_client: Any) -> Iterator[tuple[LeaseElector, LeaseElector]]:
    """Two candidates for a fresh lease; the first leads."""
    lease = f"stockade-fence-{secrets.token_hex(4)}"
    made = tuple(
        LeaseElector(
            api_client,
            namespace="default",
            name=lease,
            identity=identity,
            duration=DURATION,
            renew_period=DURATION / 4,
        )
        for identity in ("one", "two")
    )
    one, two = made
    one.round()
    assert one.is_leader
    two.round()
    assert not two.is_leader
    yield one, two
    for elector in made:
        elector.release()
    kubernetes.client.CoordinationV1Api(api_client).delete_namespaced_lease(lease, "default")


def desired(names: list[str], port: int) -> dict[str, NodeParts]:
    return {node: handoff.encode(tables(port), inline_max=0) for node in names}


def take_over(two: LeaseElector) -> None:
    """`two` runs rounds until it holds the lease (the first no longer renews)."""

    def leads() -> bool:
        two.round()
        return two.is_leader

    wait_for("two takes the lease over", leads)


def test_a_write_checked_before_the_takeover_is_refused_by_its_resource_version(
    api_client: Any, table_nodes: list[str], electors: tuple[LeaseElector, LeaseElector]
) -> None:
    _, two = electors
    first = Publisher(api_client)  # its wave's leader check passed: it led when it checked
    first.apply(first.plan(desired(table_nodes, 80)))
    late = first.plan(desired(table_nodes, 443))  # planned while one led, lands after the takeover
    take_over(two)
    second = Publisher(api_client)  # two leads now
    second.resync()
    second.apply(second.plan(desired(table_nodes, 8080)))
    for node in table_nodes:
        generation, got = assembled(api_client, node)
        assert generation == 2 and same(got, tables(8080))

    try:
        first.apply(late)
        refused: Exception | None = None
    except Exception as exc:  # what it raised is checked below
        refused = exc
    for node in table_nodes:
        generation, got = assembled(api_client, node)
        assert generation == 2 and same(got, tables(8080)), "the late write landed"
    assert isinstance(refused, publish.WriteConflictError), refused
    assert first.conflicts == len(late.writes)
    assert not set(first.published) & {w.name for w in late.writes}  # forgotten: listed again
    assert first.stale


def test_a_deposed_leader_writes_nothing_once_it_knows_it_no_longer_leads(
    api_client: Any, table_nodes: list[str], electors: tuple[LeaseElector, LeaseElector]
) -> None:
    one, two = electors
    first = Publisher(api_client, is_leader=lambda: one.is_leader)
    first.apply(first.plan(desired(table_nodes, 80)))
    late = first.plan(desired(table_nodes, 443))
    take_over(two)
    assert not one.is_leader  # its last renewal is older than two thirds of the duration
    second = Publisher(api_client, is_leader=lambda: two.is_leader)
    second.resync()
    second.apply(second.plan(desired(table_nodes, 8080)))
    writes = first.writes
    with pytest.raises(publish.NotLeaderError):
        first.apply(late)
    assert first.writes == writes
    for node in table_nodes:
        generation, got = assembled(api_client, node)
        assert generation == 2 and same(got, tables(8080))


def test_an_agents_status_write_does_not_make_the_next_write_a_conflict(
    api_client: Any, table_nodes: list[str]
) -> None:
    publisher = Publisher(api_client)
    publisher.apply(publisher.plan(desired(table_nodes, 80)))
    custom = kubernetes.client.CustomObjectsApi(api_client)
    program = handoff.program_name(table_nodes[0])
    before = publisher.stamps[program]
    custom.patch_cluster_custom_object_status(  # the agent reports; no watch tells the publisher
        GROUP,
        VERSION,
        PLURAL,
        program,
        {"status": {"appliedGeneration": 1, "endpointsAttached": 0, "errors": []}},
        _content_type="application/merge-patch+json",
    )
    publisher.apply(publisher.plan(desired(table_nodes, 443)))
    assert publisher.conflicts == 0 and not publisher.stale
    assert publisher.stamps[program].version != before.version
    for node in table_nodes:
        generation, got = assembled(api_client, node)
        assert generation == 2 and same(got, tables(443))
