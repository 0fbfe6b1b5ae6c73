"""A drop is shown with the policy that decided it also while the agent changes its tables: on real
veths, without an API server, with the agent's flow log (`FlowLog` over `Syncer.event_rules`, as
the agent wires them).

The programs decide with a new set's maps as soon as they are written, before the sync makes it
the agent's current set, and an event decided under the old maps may be read after the sync.
Each generation here renames the policy, so that its rules get new ids: a drop read in either
window names the policy of the maps that decided it (reading it against the current set alone
named no policy, and an observe record kept that for good).

The scenario is tests/bpf/agent_harness.py's: web (node-1) admits client only, so other -> web
is dropped by the isolation default of the policy that selects web.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest

from stockade.agent.flows import Flows
from stockade.agent.metrics import FlowLog
from stockade.datapath.maps import TableWriter, WriteStats
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy
from stockade.sandbox.workloads.traffic import Outcome
from tests.bpf.agent_harness import (
    POLICY,
    PORT,
    Cluster,
    pin_root,
    running_syncer,
    serving_scenario,
)
from tests.fixtures.netns import MakeProcesses, MakeTopology

WAIT_LIMIT = 10.0  # seconds the flow log may take to read an event (not a measure)


def named(name: str) -> Callable[[], list[Policy]]:
    body: dict[str, Any] = copy.deepcopy(POLICY)
    body["metadata"]["name"] = name
    return lambda: [parse_policy(body)]


def drops_to_web(flows: Flows, cluster: Cluster) -> list[dict[str, Any]]:
    src, dst = cluster.ip("demo/other"), cluster.ip("demo/web")
    records: list[dict[str, Any]] = flows.since(0)["flows"]  # type: ignore[assignment]
    return [r for r in records if (r["src"], r["dst"], r["port"]) == (src, dst, PORT)]


def wait_drop(flows: Flows, cluster: Cluster) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_LIMIT
    while not (found := drops_to_web(flows, cluster)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(found) == 1, found
    return found[0]


def test_a_drop_read_while_the_tables_change_names_the_policy_that_decided_it(
    topology: MakeTopology, pod_processes: MakeProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    topo, cluster, procs = serving_scenario(topology, pod_processes)
    other, web = "demo/other", cluster.ip("demo/web")
    cluster.policies = named("first")  # type: ignore[method-assign]
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):
        syncer.sync()
        assert syncer.maps is not None
        flows = Flows()
        flowlog = FlowLog(syncer.maps.fd("events"), lambda: syncer.event_rules, flows)
        flowlog.start()
        try:
            # Generation 2: a drop decided by the maps just written, read before the sync ends.
            write = TableWriter.write
            seen: list[dict[str, Any]] = []

            def write_then_probe(self: TableWriter, tables: Any) -> WriteStats:
                written = write(self, tables)
                assert procs.probe(other, web, PORT, "tcp") is Outcome.TIMEOUT
                seen.append(wait_drop(flows, cluster))
                return written

            monkeypatch.setattr(TableWriter, "write", write_then_probe)
            cluster.policies = named("second")  # type: ignore[method-assign]
            objects.clear()
            objects.update(cluster.table_objects())
            syncer.sync()
            monkeypatch.undo()
            (during,) = seen
            assert during["policy"] is not None and during["policy"]["name"] == "second"
        finally:
            flowlog.stop()

        # Generation 3: a drop decided under generation 2's maps, read after the sync.
        flows = Flows()
        assert procs.probe(other, web, PORT, "tcp") is Outcome.TIMEOUT
        cluster.policies = named("third")  # type: ignore[method-assign]
        objects.clear()
        objects.update(cluster.table_objects())
        syncer.sync()
        flowlog = FlowLog(syncer.maps.fd("events"), lambda: syncer.event_rules, flows)
        flowlog.start()
        try:
            after = wait_drop(flows, cluster)
            assert after["policy"] is not None and after["policy"]["name"] == "second"
        finally:
            flowlog.stop()
