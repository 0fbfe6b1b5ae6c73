"""The publisher against a real API server: the objects of one publish go out together, and
whatever order they land in, an agent assembles either the previous complete set or the new
one, never a mix. A node one of whose shards the server refuses stays incomplete (its agent keeps
the set it applied) while the other nodes publish, and the next publish completes it.

The agent's side is `stockade.handoff.Assembler` reading the objects back from the server.
The tables are published in shards (`inline_max=0`), as a large node's are.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import kubernetes.client
import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.compiler import ir
from stockade.control.plan import Plan, plan
from stockade.control.publish import Publisher
from stockade.handoff import Assembler, IncompleteError, TableObject
from stockade.model.crd_schema import GROUP, VERSION
from tests.fixtures.handoff_tables import same, tables

PLURAL = "datapathtables"
UNPROCESSABLE = 422


def listed(api_client: Any, node: str) -> dict[str, TableObject]:
    custom = kubernetes.client.CustomObjectsApi(api_client)
    listing: Any = custom.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, label_selector=f"{handoff.NODE_LABEL}={node}"
    )
    return {i["metadata"]["name"]: TableObject.from_api(i) for i in listing["items"]}


def assembled(api_client: Any, node: str) -> tuple[int, ir.NodeTables]:
    found = Assembler(node).assemble(listed(api_client, node))
    return found.generation, found.tables


def refusing(planned: Plan, node: str) -> Plan:
    """`planned` with one of `node`'s table shards made too long for the schema."""
    writes = list(planned.writes)
    index = next(i for i, o in enumerate(writes) if o.node == node and o.part == handoff.POLICY)
    writes[index] = dataclasses.replace(writes[index], entries=("x" * 2000,))
    return Plan(tuple(writes), planned.deletes, planned.generations)


def test_a_publish_writes_every_changed_object_and_each_node_assembles_the_new_set(
    api_client: Any, table_nodes: list[str]
) -> None:
    publisher = Publisher(api_client)
    for generation, port in ((1, 80), (2, 443)):  # creates, then patches
        desired = {node: handoff.encode(tables(port), inline_max=0) for node in table_nodes}
        planned = plan(publisher.published, desired, generation)
        publisher.apply(planned)
        for node in table_nodes:
            got_generation, got = assembled(api_client, node)
            assert got_generation == generation
            assert same(got, tables(port))
    assert set(publisher.published) == {
        name for node in table_nodes for name in listed(api_client, node)
    }
    writes = publisher.writes
    publisher.apply(plan(publisher.published, desired, 3))
    assert publisher.writes == writes  # nothing changed, nothing written


def test_a_refused_shard_leaves_its_node_incomplete_until_the_next_publish(
    api_client: Any, table_nodes: list[str]
) -> None:
    publisher = Publisher(api_client)
    publisher.apply(
        plan(
            publisher.published,
            {n: handoff.encode(tables(80), inline_max=0) for n in table_nodes},
            1,
        )
    )
    broken, fine = table_nodes
    desired = {n: handoff.encode(tables(443), inline_max=0) for n in table_nodes}
    with pytest.raises(ApiException) as refused:
        publisher.apply(refusing(plan(publisher.published, desired, 2), broken))
    assert refused.value.status == UNPROCESSABLE
    # The refusal holds back its own node only: the other node's generation goes on (the
    # policies there can be reported Programmed), the broken one's stays.
    assert publisher.generations == {fine: 2, broken: 1}
    # The broken node's manifest may be new, but the shard it lists is not there: its agent
    # finds the set incomplete and keeps enforcing what it applied (generation 1).
    with pytest.raises(IncompleteError, match=handoff.object_name(broken, handoff.POLICY, 0)):
        Assembler(broken).assemble(listed(api_client, broken))
    generation, got = assembled(api_client, fine)
    assert generation == 2 and same(got, tables(443))
    # The refused shard is not recorded as published, so the next publish writes it.
    publisher.apply(plan(publisher.published, desired, 3))
    _, got = assembled(api_client, broken)
    assert same(got, tables(443))


@pytest.mark.parametrize("recompute", [True, False], ids=["digest-recomputed", "digest-stale"])
def test_a_listing_finds_a_hand_edited_table_and_the_next_publish_restores_it(
    api_client: Any, table_nodes: list[str], recompute: bool
) -> None:
    publisher = Publisher(api_client)
    desired = {n: handoff.encode(tables(80), inline_max=0) for n in table_nodes}
    publisher.apply(plan(publisher.published, desired, 1))
    custom = kubernetes.client.CustomObjectsApi(api_client)
    name = handoff.object_name(table_nodes[0], handoff.POLICY, 0)
    entries = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)["spec"]["entries"]
    spec: dict[str, Any] = {"entries": entries[:-1]}
    if recompute:
        spec["digest"] = handoff.digest(entries[:-1])
    custom.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
    )
    assert publisher.plan(desired).empty  # no watch here: only a listing shows the edit
    publisher.resync()
    restore = publisher.plan(desired)
    assert [w.name for w in restore.writes] == [name]
    publisher.apply(restore)
    assert custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)["spec"]["entries"] == (
        entries
    )
    generation, got = assembled(api_client, table_nodes[0])
    assert generation == 1 and same(got, tables(80))


def test_the_change_time_reaches_the_assembled_set_and_a_write_without_one_removes_it(
    api_client: Any, table_nodes: list[str]
) -> None:
    publisher = Publisher(api_client)
    node = table_nodes[0]
    at = 1_796_212_800_123_456_789
    for port, changed_at in ((80, at), (443, None), (8080, at + 1)):
        desired = {node: handoff.encode(tables(port), inline_max=0)}
        publisher.apply(publisher.plan(desired, changed_at))
        found = Assembler(node).assemble(listed(api_client, node))
        assert same(found.tables, tables(port))
        assert found.changed_at == changed_at  # None: the merge patch removed the old one


def test_a_watch_sees_no_drift_in_the_publishers_own_writes_and_deletes(
    api_client: Any, table_nodes: list[str]
) -> None:
    """The server sends a write's watch event as soon as it stores it, often before the
    publisher has read the write's answer: those events, fed to `observe` as the operator's
    watch feeds them, must not be taken for drift (each one asked for another pass)."""
    publisher = Publisher(api_client)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    query = f"{handoff.NODE_LABEL} in ({','.join(table_nodes)})"
    listing: Any = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, label_selector=query)
    version = listing["metadata"]["resourceVersion"]
    seen: list[tuple[str, str, bool]] = []  # (event, name, taken for drift)
    watch = kubernetes.watch.Watch()

    stopping = threading.Event()
    failed: list[BaseException] = []

    def follow() -> None:
        try:
            for event in watch.stream(
                custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
                label_selector=query,
                resource_version=version,
                timeout_seconds=60,
            ):
                obj, name = event["object"], event["object"]["metadata"]["name"]
                if event["type"] == "DELETED":
                    seen.append((event["type"], name, publisher.observe_deleted(name)))
                else:
                    seen.append((event["type"], name, publisher.observe(obj)))
        except Exception as exc:  # the connection is closed under a stopped watch
            if not stopping.is_set():
                failed.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    writes = deletes = 0
    try:
        for generation, port in enumerate((80, 443, 8080, 80, 443, 8080, 9090, 80), start=1):
            desired = {n: handoff.encode(tables(port), inline_max=0) for n in table_nodes}
            planned = publisher.plan(desired)
            assert planned.generations == dict.fromkeys(table_nodes, generation)
            publisher.apply(planned)
            writes += len(planned.writes)
        gone = publisher.plan({})  # every node removed: every object deleted
        publisher.apply(gone)
        deletes = len(gone.deletes)
        deadline = time.monotonic() + 30
        while len(seen) < writes + deletes and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stopping.set()
        watch.stop()
    assert not failed
    assert deletes > 0 and len(seen) >= writes + deletes  # the watch saw every write
    assert [s for s in seen if s[2]] == []
    assert publisher.plan({}).empty
