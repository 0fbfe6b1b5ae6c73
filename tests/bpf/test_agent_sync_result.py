"""What the agent's sync tells its runner: True when it changed the datapath, False when it
changed nothing (an incomplete set, the set already applied, a new shard that no manifest lists
yet), so that only syncs that did work hold the next one back (`stockade.runtime.runner`)."""

from __future__ import annotations

import dataclasses

from stockade import handoff
from stockade.sandbox.workloads.traffic import Outcome
from tests.bpf.agent_harness import pin_root, probe_web, running_syncer, serving_scenario
from tests.fixtures.netns import MakeProcesses, MakeTopology


def test_a_sync_says_whether_it_changed_the_datapath(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes)
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):
        assert syncer.sync() is True  # programs loaded, maps written, links attached
        assert syncer.sync() is False  # the same set again
        # A shard of the next generation arrives before the manifest that lists it.
        listed = objects[handoff.object_name(cluster.node_name, handoff.POLICY, 0)]
        early = dataclasses.replace(listed, name=f"{cluster.node_name}.policy.9", shard=9)
        objects[early.name] = early
        assert syncer.sync() is False
        # The label change arrives shard by shard: incomplete until its program object.
        cluster.labels["demo/other"] = "client"
        changed = cluster.table_objects()
        program = handoff.object_name(cluster.node_name, handoff.PROGRAM, 0)
        objects.update({n: o for n, o in changed.items() if n != program})
        assert syncer.sync() is False
        assert syncer.stats.waiting
        objects[program] = changed[program]
        assert syncer.sync() is True
        assert syncer.stats.last_write.total > 0
        assert probe_web(procs, cluster) == {
            "client": Outcome.CONNECTED,
            "other": Outcome.CONNECTED,
        }
