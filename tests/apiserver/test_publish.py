"""The publisher against a real API server: it writes a node's table shards before the program
object whose manifest lists them (the shards of one publish go out concurrently), and a node one
of whose shards the server refuses keeps its old program object while the other nodes publish.

Write order is read from the objects' resourceVersions: one etcd, so they grow with every write.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from stockade.compiler import handoff
from stockade.control.plan import Plan, table_object
from stockade.control.publish import Publisher
from stockade.model.crd_schema import GROUP, VERSION
from stockade.sandbox.controlplane import ControlPlane
from tests.apiserver.test_crd_validation import install_crds

PLURAL = "datapathtables"
UNPROCESSABLE = 422


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane) -> None:
    with control_plane.api_client() as client:
        install_crds(client)


@pytest.fixture
def nodes(crds: None, api_client: Any) -> Iterator[list[str]]:
    """Two node names of this test; their DatapathTables are deleted afterwards."""
    names = [f"publish-{secrets.token_hex(3)}-{i}" for i in range(2)]
    yield names
    custom = kubernetes.client.CustomObjectsApi(api_client)
    for node in names:
        custom.delete_collection_cluster_custom_object(
            GROUP, VERSION, PLURAL, label_selector=f"{handoff.NODE_LABEL}={node}"
        )


def node_objects(node: str, generation: int, *, bad: bool = False) -> list[dict[str, Any]]:
    """Three table shards and the program object of `node`; with `bad`, the API server refuses
    the second shard (an entry longer than the schema allows)."""
    shards = [
        table_object(node, handoff.POLICY, 0, 2, generation, (f"policy {generation}",)),
        table_object(
            node, handoff.POLICY, 1, 2, generation, ("x" * 2000 if bad else f"p1 {generation}",)
        ),
        table_object(node, handoff.RULES, 0, 1, generation, (f"rules {generation}",)),
    ]
    program = table_object(node, handoff.PROGRAM, 0, 1, generation, (f"manifest {generation}",))
    return [*shards, program]


def listed(api_client: Any, node: str) -> dict[str, dict[str, Any]]:
    custom = kubernetes.client.CustomObjectsApi(api_client)
    listing: Any = custom.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, label_selector=f"{handoff.NODE_LABEL}={node}"
    )
    return {item["metadata"]["name"]: item for item in listing["items"]}


def plan_of(*objects: list[dict[str, Any]]) -> Plan:
    tables = [o for objs in objects for o in objs if o["spec"]["part"] != handoff.PROGRAM]
    programs = [o for objs in objects for o in objs if o["spec"]["part"] == handoff.PROGRAM]
    return Plan(tuple(tables + programs), (), {})


def test_every_shard_is_written_before_the_program_object_that_lists_it(
    api_client: Any, nodes: list[str]
) -> None:
    publisher = Publisher(api_client)
    for generation in (1, 2):  # creates, then patches
        publisher.apply(plan_of(*(node_objects(node, generation) for node in nodes)))
        for node in nodes:
            objects = listed(api_client, node)
            assert {o["spec"]["generation"] for o in objects.values()} == {generation}
            program = objects.pop(handoff.object_name(node, handoff.PROGRAM, 0))
            version = int(program["metadata"]["resourceVersion"])
            assert len(objects) == 3
            assert all(int(o["metadata"]["resourceVersion"]) < version for o in objects.values())
    assert publisher.writes == 16
    assert set(publisher.published) == {name for node in nodes for name in listed(api_client, node)}


def test_a_refused_shard_keeps_its_node_on_the_old_program_while_other_nodes_publish(
    api_client: Any, nodes: list[str]
) -> None:
    publisher = Publisher(api_client)
    publisher.apply(plan_of(*(node_objects(node, 1) for node in nodes)))
    broken, fine = nodes
    with pytest.raises(ApiException) as refused:
        publisher.apply(plan_of(node_objects(broken, 2, bad=True), node_objects(fine, 2)))
    assert refused.value.status == UNPROCESSABLE
    program = handoff.object_name(broken, handoff.PROGRAM, 0)
    assert listed(api_client, broken)[program]["spec"]["generation"] == 1
    assert publisher.published[program].generation == 1
    assert {o["spec"]["generation"] for o in listed(api_client, fine).values()} == {2}
