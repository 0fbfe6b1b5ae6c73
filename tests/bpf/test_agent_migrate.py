"""A new Shape that changes pinned maps' sizes migrates them, on real BPF and real traffic.

libbpf refuses to reuse a pinned map whose max_entries differ from the object's, so a map-size
change used to wedge the agent: every sync failed to load the new programs. Now the agent makes
the new maps, copies what carries over (conntrack, the tables, the rule counters), writes the
tables, moves every link to the new programs and unpins the old ones. At the moment the links
move, the old programs still enforce (a refused pod stays refused, the allowed one connects);
afterwards the connection tracked before the change is in the new conntrack map, the counters
kept counting, and enforcement is the same.
"""

from __future__ import annotations

import os
from typing import Any

from stockade.compiler.shape import Shape
from stockade.datapath import libbpf, maps
from stockade.datapath.events import read_counters
from stockade.harness.loader import conntrack_clock
from stockade.sandbox.workloads.traffic import Outcome
from tests.bpf.agent_harness import (
    pin_root,
    probe_web,
    running_syncer,
    serving_scenario,
)
from tests.fixtures.netns import MakeProcesses, MakeTopology

ALLOWED_CLIENT = {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
BIGGER = Shape(conntrack_max=1 << 16, policy_exact_max=1 << 19, rules_max=1 << 17)


def _max_entries(path: os.PathLike[str]) -> int:
    fd = libbpf.obj_get(path)  # type: ignore[arg-type]
    try:
        return libbpf.map_info(fd).max_entries
    finally:
        os.close(fd)


def _flows(syncer: Any) -> set[tuple[bytes, bytes, int, int, int, int]]:
    return {
        (e.saddr, e.daddr, e.sport, e.dport, e.protocol, e.direction)
        for e in maps.conntrack_entries(syncer.maps)
    }


def test_a_shape_with_other_map_sizes_migrates_the_pinned_maps_without_a_lapse(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes)
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):
        syncer.sync()
        assert probe_web(procs, cluster) == ALLOWED_CLIENT
        tracked = _flows(syncer)
        assert tracked, "the client's connection is tracked"
        rules = sorted(syncer.rules)
        counted = read_counters(syncer.maps.fd("counters"), rules)
        assert any(c.packets for c in counted.values())
        old_ids = {name: libbpf.map_info(fd).id for name, fd in syncer.maps.fds.items()}

        # At the moment the links move to the new programs, the old ones still enforce.
        seen_at_swap: list[dict[str, Outcome]] = []
        reconcile = syncer.attachments.reconcile

        def probing(*args: Any, **kwargs: Any) -> Any:
            seen_at_swap.append(probe_web(procs, cluster))
            return reconcile(*args, **kwargs)

        syncer.attachments.reconcile = probing  # type: ignore[method-assign]
        objects.clear()
        objects.update(cluster.table_objects(BIGGER))
        syncer.sync()
        assert seen_at_swap == [ALLOWED_CLIENT]
        assert syncer.programs.stats.migrations == 1
        assert syncer.programs.migration is None  # settled: the old maps are closed
        assert syncer.stats.applied_generation >= 0 and syncer.current is not None
        assert syncer.current.program.shape == BIGGER

        # The pins hold new maps of the new sizes; the agent reads and writes those.
        assert _max_entries(root / "conntrack") == BIGGER.conntrack_max
        assert _max_entries(root / "policy_exact") == BIGGER.policy_exact_max
        assert _max_entries(root / "counters") == BIGGER.rules_max
        for name in ("conntrack", "policy_exact", "counters"):
            assert libbpf.map_info(syncer.maps.fd(name)).id != old_ids[name]
        assert libbpf.map_info(syncer.maps.fd("endpoints")).id == old_ids["endpoints"]
        assert maps.read_clock(syncer.maps) == conntrack_clock()
        assert not (root / "migrate").exists()

        # What was tracked and counted carried over; enforcement is the same.
        assert tracked <= _flows(syncer)
        after = read_counters(syncer.maps.fd("counters"), rules)
        for rule_id, before in counted.items():
            assert after[rule_id].packets >= before.packets
        assert probe_web(procs, cluster) == ALLOWED_CLIENT
        assert sum(
            c.packets for c in read_counters(syncer.maps.fd("counters"), rules).values()
        ) > sum(c.packets for c in after.values())
