"""The agent of one scenario node, run in this process on its own pins: what the attack tests
put on each node so that the crafted packets meet the real programs on the real veths.

Scenario: tests/bpf/agent_harness.py (`web` on node-1; `client` and `other` on node-2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from stockade import handoff
from stockade.agent.attachments import Attachments
from stockade.agent.programs import Programs
from stockade.agent.sync import Syncer
from stockade.compiler.lower import lower_node
from stockade.compiler.shape import Shape
from stockade.datapath.clang import Compiler
from stockade.datapath.netns import NetnsExecutor
from stockade.handoff import TableObject
from stockade.model.parse import parse_policy
from tests.bpf.agent_harness import CACHE_DIR, POLICY, Cluster


def node_objects(cluster: Cluster, node: str, shape: Shape | None = None) -> dict[str, TableObject]:
    """The published objects of `node` ("node-1" or "node-2") of the scenario."""
    name = cluster._node(node)
    lowered = lower_node(cluster.state(), [parse_policy(POLICY)], name, None)
    built = [
        TableObject.build(name, part, number, len(shards), 1, shard)
        for part, shards in handoff.encode(lowered.tables, shape).items()
        for number, shard in shards.items()
    ]
    return {b.name: b for b in built}


@contextlib.contextmanager
def node_agent(
    cluster: Cluster, node: str, root: Path, shape: Shape | None = None
) -> Iterator[Syncer]:
    """The node's agent sync, applied once; closed (pins left to `root`'s owner) afterwards."""
    executor = NetnsExecutor.named(cluster.topo.node(node).netns)
    objects = node_objects(cluster, node, shape)
    programs = Programs(Compiler(CACHE_DIR), root)
    syncer = Syncer(
        cluster._node(node), lambda: objects, programs, Attachments(root, executor), None, root
    )
    try:
        syncer.sync()
        yield syncer
    finally:
        syncer.close()
        executor.close()
