"""The agent's sync against the kernel, without an API server: published tables (from the
operator's lowering and codec) are enforced on real traffic in both topologies; a label change
is a map write with no recompile; an endpoint that goes away is detached; a second agent on the
same pin root adopts programs, maps and links and changes nothing; a new Shape replaces the
programs in the links in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import libbpf, maps
from stockade.datapath.clock import TickClock
from stockade.harness.loader import conntrack_clock
from stockade.sandbox.workloads.traffic import Outcome
from tests.bpf.agent_harness import (
    Cluster,
    pin_root,
    probe_web,
    running_syncer,
    serving_scenario,
    tcx_programs,
)
from tests.fixtures.netns import MakeProcesses, MakeTopology

ALLOWED_CLIENT = {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_published_tables_are_enforced_on_real_traffic(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes, mode)
    assert probe_web(procs, cluster) == {"client": Outcome.CONNECTED, "other": Outcome.CONNECTED}
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, executor):
        assert not syncer.applied  # the agent's /readyz
        syncer.sync()
        assert syncer.applied
        web_if = topo.pods["demo/web"].host_ifname
        assert syncer.stats.last_attach.attached == {
            e.endpoint_id: web_if
            for e in syncer.current.tables.endpoints  # type: ignore[union-attr]
        }
        programs = syncer.programs.programs
        assert tcx_programs(executor, web_if) == {
            "ingress": [programs[Hook.FROM_POD].id],
            "egress": [programs[Hook.TO_POD].id],
        }
        assert probe_web(procs, cluster) == ALLOWED_CLIENT


def test_a_label_change_is_written_to_the_maps_without_a_recompile(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes)
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):
        syncer.sync()
        assert probe_web(procs, cluster) == ALLOWED_CLIENT
        compiled = (syncer.programs.stats.compile_hits, syncer.programs.stats.compile_misses)
        program_ids = {h: p.id for h, p in syncer.programs.programs.items()}
        cluster.labels["demo/other"] = "client"
        objects.clear()
        objects.update(cluster.table_objects())
        syncer.sync()
        assert syncer.stats.last_write.total > 0
        assert (
            syncer.programs.stats.compile_hits,
            syncer.programs.stats.compile_misses,
        ) == compiled
        assert syncer.programs.stats.renders == 1
        assert {h: p.id for h, p in syncer.programs.programs.items()} == program_ids
        assert probe_web(procs, cluster) == {
            "client": Outcome.CONNECTED,
            "other": Outcome.CONNECTED,
        }


def test_an_endpoint_that_is_gone_has_its_links_detached_and_others_untouched(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo = topology(nodes=2, mode="routed")
    cluster = Cluster.create(topo)
    topo.add_pod("demo/web2", "node-1")
    cluster.labels["demo/web2"] = "web"
    objects = cluster.table_objects()
    web_if = topo.pods["demo/web"].host_ifname
    web2_if = topo.pods["demo/web2"].host_ifname
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, executor):
        syncer.sync()
        assert sorted(syncer.stats.last_attach.attached.values()) == sorted([web_if, web2_if])
        before = tcx_programs(executor, web_if)
        # The pod is deleted in the API: its endpoint leaves the tables, its veth lingers.
        cluster.deleted.add("demo/web2")
        objects.clear()
        objects.update(cluster.table_objects())
        syncer.sync()
        assert syncer.stats.last_attach.detached == [web2_if]
        assert tcx_programs(executor, web2_if) == {"ingress": [], "egress": []}
        assert not (root / "links" / web2_if).exists()
        assert tcx_programs(executor, web_if) == before
        # Then the veth goes too: nothing left to do, nothing fails.
        topo.remove_pod("demo/web2")
        syncer.sync()
        assert syncer.stats.last_attach.failures == []


def test_a_second_agent_adopts_programs_maps_and_links_and_changes_nothing(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes)
    objects = cluster.table_objects()
    web_if = topo.pods["demo/web"].host_ifname
    tick = conntrack_clock()
    # the first agent measured another base (by a few ns, as a restarted agent does)
    earlier = TickClock(tick.tick_ns, tick.base_ns + 7)
    with pin_root() as root:
        with running_syncer(root, topo, objects, clock=earlier) as (first, ex1):
            first.sync()
            assert first.maps is not None and maps.read_clock(first.maps) == earlier
            chain = tcx_programs(ex1, web_if)
            links = {p.name: _link_id(p) for p in (root / "links" / web_if).iterdir()}
        with running_syncer(root, topo, objects) as (second, ex2):
            second.sync()
            assert second.maps is not None and maps.read_clock(second.maps) == tick
            stats = second.programs.stats
            assert (stats.loads, stats.adoptions) == (0, 2)
            assert second.stats.last_write.total == 0
            attach = second.stats.last_attach
            assert (attach.created, attach.updated, attach.unchanged) == (0, 0, 2)
            assert tcx_programs(ex2, web_if) == chain
            assert {p.name: _link_id(p) for p in (root / "links" / web_if).iterdir()} == links
            assert probe_web(procs, cluster) == ALLOWED_CLIENT
            # A new Shape: new programs, swapped into the same links.
            objects.clear()
            objects.update(cluster.table_objects(Shape(audit_events=False)))
            second.sync()
            attach = second.stats.last_attach
            assert (attach.created, attach.updated) == (0, 2)
            assert {p.name: _link_id(p) for p in (root / "links" / web_if).iterdir()} == links
            new_chain = tcx_programs(ex2, web_if)
            assert new_chain != chain
            assert new_chain["ingress"] == [second.programs.programs[Hook.FROM_POD].id]
            assert [p.name for p in (root / "programs").iterdir()] == [second.programs.digest]
            assert probe_web(procs, cluster) == ALLOWED_CLIENT


def _link_id(pin: Path) -> int:
    fd = libbpf.obj_get(pin)
    try:
        return libbpf.link_info(fd).id
    finally:
        os.close(fd)
