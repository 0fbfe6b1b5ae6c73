"""The agent with a real API server, real eBPF and real traffic: it applies what the operator's
publisher wrote for its node, reports on `<node>.program.0`, writes a label change into the maps
without a recompile, detaches a deleted pod, posts an Event on a pod it cannot attach to, keeps
enforcing while the API server is down, and is replaced after a SIGKILL without a gap; it observes
the time from a change the operator took in to its apply in a histogram."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from stockade import handoff
from stockade.compiler import ir
from stockade.control.plan import plan
from stockade.control.store import Store
from stockade.datapath import libbpf
from stockade.datapath.netns import NetnsExecutor
from stockade.model.cluster import Namespace
from stockade.sandbox import netns
from stockade.sandbox.controlplane.crds import install_crds
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.node.registration import register_node, register_pod
from stockade.sandbox.workloads.traffic import Outcome
from tests.bpf.agent_harness import (
    Cluster,
    pin_root,
    probe_web,
    serve_web,
    tcx_programs,
)
from tests.e2e.agent_fixtures import (
    AgentProcess,
    AgentThread,
    Publication,
    agent_config,
    report,
    unique_node,
    wait_applied,
)
from tests.fixtures.controlplane import wait_for
from tests.fixtures.netns import MakeProcesses, MakeTopology

ENFORCED = {"client": Outcome.CONNECTED, "other": Outcome.TIMEOUT}
OPEN = {"client": Outcome.CONNECTED, "other": Outcome.CONNECTED}


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane) -> None:
    with control_plane.api_client() as client:
        install_crds(client, upstream=False)


@pytest.fixture
def root() -> Iterator[Path]:
    with pin_root() as path:
        yield path


@pytest.fixture
def publications(api_client: Any) -> Iterator[list[Publication]]:
    made: list[Publication] = []
    yield made
    for publication in made:
        publication.delete_all()


def _setup(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api: Any,
    mode: str = "routed",
) -> tuple[Cluster, Any, Publication]:
    topo = topology(nodes=2, mode=mode)
    cluster = Cluster.create(topo, unique_node())
    procs = pod_processes(topo)
    serve_web(procs)
    publication = Publication(api, cluster)
    publications.append(publication)
    return cluster, procs, publication


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_the_agent_enforces_what_is_published_and_reports_on_program_0(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api_client: Any,
    control_plane: ControlPlane,
    crds: None,
    root: Path,
    mode: str,
) -> None:
    cluster, procs, publication = _setup(topology, pod_processes, publications, api_client, mode)
    netns_name = cluster.topo.node("node-1").netns
    agent = AgentThread(agent_config(cluster.node_name, netns_name, control_plane.kubeconfig, root))
    try:
        generation = publication.publish()
        status = wait_applied(api_client, cluster.node_name, generation)
        assert status["endpointsAttached"] == 1
        assert status["errors"] == []
        assert status["compiledDigest"] == agent.agent.programs.digest
        assert probe_web(procs, cluster) == ENFORCED
        metrics = agent.agent.metrics_text()
        labels = 'kind="NetworkPolicy.networking.k8s.io",namespace="demo",name="web"'
        allowed = f'stockade_rule_packets_total{{{labels},direction="Ingress",index="0"}}'
        assert any(
            line.startswith(allowed) and not line.endswith(" 0") for line in metrics.splitlines()
        )
        assert "stockade_agent_events_lost_total 0" in metrics.splitlines()
        wait_for(
            "the drop is in the flow log counts",
            lambda: agent.agent.flowlog and agent.agent.flowlog.counts[("drop", "policy")] > 0,
        )
    finally:
        agent.stop()


def test_a_set_with_a_number_out_of_range_is_refused_with_an_event_and_the_last_good_one_stays(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api_client: Any,
    control_plane: ControlPlane,
    crds: None,
    root: Path,
) -> None:
    # A hostile or broken publisher's set: allow rules whose port, 80 + 65,536, is port 80 in
    # the 16 bits of a map key. Written as is, they would open the web pod to every peer.
    cluster, procs, publication = _setup(topology, pod_processes, publications, api_client)
    netns_name = cluster.topo.node("node-1").netns
    agent = AgentThread(agent_config(cluster.node_name, netns_name, control_plane.kubeconfig, root))
    try:
        good = wait_applied(api_client, cluster.node_name, publication.publish())
        assert probe_web(procs, cluster) == ENFORCED
        tables = cluster.tables()
        aliased = tuple(
            ir.PolicyEntry(e.endpoint_id, ir.Direction.INGRESS, 96, cid, ir.PROTO_TCP, 80 + 65_536)
            for e in tables.endpoints
            for cid in {0, *(c.class_id for c in tables.classes)}
        )
        hostile = dataclasses.replace(tables, policy=tables.policy + aliased)
        cluster.generation += 1
        node = cluster.node_name
        publisher = publication.publisher
        publisher.apply(
            plan(publisher.published, {node: handoff.encode(hostile)}, cluster.generation)
        )

        def refused() -> Any:
            errors = report(api_client, node).get("errors") or []
            return [e for e in errors if "port 65616 is outside 0..65535" in e] or None

        wait_for("the report names the refused field", refused)
        core = kubernetes.client.CoreV1Api(api_client)

        def event() -> Any:
            name = handoff.object_name(node, handoff.PROGRAM, 0)
            found = core.list_namespaced_event(
                "default", field_selector=f"involvedObject.name={name}"
            ).items
            return found or None

        (posted,) = wait_for("an Event on the program object", event)
        assert (posted.type, posted.reason) == ("Warning", "TablesRefused")
        assert "port 65616" in posted.message
        assert report(api_client, node)["appliedGeneration"] == good["appliedGeneration"]
        assert probe_web(procs, cluster) == ENFORCED
    finally:
        agent.stop()


def test_a_label_change_is_written_to_the_maps_without_a_recompile_and_a_deleted_pod_detached(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api_client: Any,
    control_plane: ControlPlane,
    crds: None,
    root: Path,
) -> None:
    cluster, procs, publication = _setup(topology, pod_processes, publications, api_client)
    topo = cluster.topo
    topo.add_pod("demo/web2", "node-1")
    cluster.labels["demo/web2"] = "web"
    node_ns = topo.node("node-1").netns
    agent = AgentThread(agent_config(cluster.node_name, node_ns, control_plane.kubeconfig, root))
    try:
        wait_applied(api_client, cluster.node_name, publication.publish())
        assert probe_web(procs, cluster) == ENFORCED
        stats, programs = agent.agent.syncer.stats, agent.agent.programs.stats
        compiles = (programs.compile_hits, programs.compile_misses, programs.loads)
        writes = stats.map_writes
        cluster.labels["demo/other"] = "client"
        changed = time.time()
        wait_applied(api_client, cluster.node_name, publication.publish())
        assert stats.map_writes == writes + 1
        assert changed <= stats.last_write_at <= time.time()
        assert (programs.compile_hits, programs.compile_misses, programs.loads) == compiles
        assert probe_web(procs, cluster) == {
            "client": Outcome.CONNECTED,
            "other": Outcome.CONNECTED,
        }

        web2_if = topo.pods["demo/web2"].host_ifname
        assert tcx_programs(agent.agent.executor, web2_if)["ingress"]  # type: ignore[arg-type]
        cluster.deleted.add("demo/web2")
        status = wait_applied(api_client, cluster.node_name, publication.publish())
        assert status["endpointsAttached"] == 1
        assert tcx_programs(agent.agent.executor, web2_if) == {  # type: ignore[arg-type]
            "ingress": [],
            "egress": [],
        }
        assert (programs.compile_hits, programs.compile_misses, programs.loads) == compiles
    finally:
        agent.stop()


def apply_histogram(metrics: str) -> tuple[float, float]:
    """(count, sum) of stockade_agent_policy_apply_seconds in a /metrics text."""
    values = dict(
        line.split(" ", 1)
        for line in metrics.splitlines()
        if line.startswith("stockade_agent_policy_apply_seconds_")
    )
    return (
        float(values["stockade_agent_policy_apply_seconds_count"]),
        float(values["stockade_agent_policy_apply_seconds_sum"]),
    )


def test_a_change_the_operator_took_in_is_observed_once_in_the_apply_histogram(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api_client: Any,
    control_plane: ControlPlane,
    crds: None,
    root: Path,
) -> None:
    cluster, procs, publication = _setup(topology, pod_processes, publications, api_client)
    node_ns = cluster.topo.node("node-1").netns
    agent = AgentThread(agent_config(cluster.node_name, node_ns, control_plane.kubeconfig, root))
    store = Store()
    try:
        store.put_namespace("demo", Namespace("demo", {}))
        first = store.snapshot(take_changes=True).changed_at
        wait_applied(api_client, cluster.node_name, publication.publish(changed_at=first))
        # the first generation an agent applies is not observed: it may predate its start
        assert apply_histogram(agent.agent.metrics_text()) == (0, 0)
        assert probe_web(procs, cluster) == ENFORCED

        cluster.labels["demo/other"] = "client"  # the change, as the operator takes it in
        store.put_namespace("demo", Namespace("demo", {"changed": "yes"}))
        changed = store.snapshot(take_changes=True).changed_at
        assert changed is not None
        generation = publication.publish(changed_at=changed)
        wait_applied(api_client, cluster.node_name, generation)
        count, seconds = apply_histogram(agent.agent.metrics_text())
        assert count == 1
        assert seconds > 0
        assert probe_web(procs, cluster) == OPEN

        # written again without a change time (restored, or by an older operator): applied,
        # not observed
        cluster.labels["demo/other"] = "other"
        wait_applied(api_client, cluster.node_name, publication.publish())
        assert apply_histogram(agent.agent.metrics_text()) == (count, seconds)
        assert probe_web(procs, cluster) == ENFORCED
    finally:
        agent.stop()


def test_a_pod_without_an_interface_gets_an_event_and_an_error_in_the_report(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api_client: Any,
    control_plane: ControlPlane,
    crds: None,
    root: Path,
) -> None:
    cluster, procs, publication = _setup(topology, pod_processes, publications, api_client)
    topo = cluster.topo
    ghost = topo.add_pod("demo/ghost", "node-1")
    with netns.ipr(topo.node("node-1").netns) as ip:
        ip.link("del", index=netns.link_index(ip, ghost.host_ifname))
    core = kubernetes.client.CoreV1Api(api_client)
    try:
        core.create_namespace({"metadata": {"name": "demo"}})
    except kubernetes.client.exceptions.ApiException as exc:
        assert exc.status == 409
    register_node(api_client, dataclasses.replace(topo.node("node-1"), name=cluster.node_name))
    pod_name = f"ghost-{cluster.node_name}"
    ghost_in_api = dataclasses.replace(ghost, node=cluster.node_name)
    register_pod(api_client, "demo", pod_name, ghost_in_api, {"role": "web"}, [])
    node_ns = topo.node("node-1").netns
    agent = AgentThread(agent_config(cluster.node_name, node_ns, control_plane.kubeconfig, root))
    try:
        status = wait_applied(api_client, cluster.node_name, publication.publish())
        assert status["endpointsAttached"] == 1
        assert len(status["errors"]) == 1 and ghost.ip_v4 in status["errors"][0]
        assert status["errors"][0].startswith("InterfaceNotFound: ")

        def event() -> Any:
            events = core.list_namespaced_event(
                "demo", field_selector=f"involvedObject.name={pod_name}"
            ).items
            return events or None

        (posted,) = wait_for("an Event on the ghost pod", event)
        assert (posted.type, posted.reason) == ("Warning", "InterfaceNotFound")
        assert posted.source.component == "stockade-agent"
        assert probe_web(procs, cluster) == ENFORCED  # the others are enforced all the same
    finally:
        agent.stop()
        core.delete_namespaced_pod(pod_name, "demo", grace_period_seconds=0)
        core.delete_node(cluster.node_name)


def test_enforcement_continues_while_the_api_server_is_down(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    tmp_path: Path,
    root: Path,
) -> None:
    plane = ControlPlane(tmp_path / "plane")
    plane.start()
    try:
        with plane.api_client() as api:
            install_crds(api, upstream=False)
            cluster, procs, publication = _setup(topology, pod_processes, [], api)
            node_ns = cluster.topo.node("node-1").netns
            agent = AgentThread(agent_config(cluster.node_name, node_ns, plane.kubeconfig, root))
            try:
                wait_applied(api, cluster.node_name, publication.publish())
                plane.stop()
                wait_for(
                    "the agent sees the API server gone", lambda: not agent.agent.watch.connected
                )
                for _ in range(3):
                    assert probe_web(procs, cluster) == ENFORCED
                agent.agent.runner.request()  # a sync without the API server changes nothing
                time.sleep(0.5)
                assert probe_web(procs, cluster) == ENFORCED
                assert agent.agent.syncer.stats.last_attach.detached == []
            finally:
                agent.stop()
    finally:
        plane.stop()


def test_a_killed_agent_is_replaced_without_a_gap_under_probe_traffic(
    topology: MakeTopology,
    pod_processes: MakeProcesses,
    publications: list[Publication],
    api_client: Any,
    control_plane: ControlPlane,
    crds: None,
    root: Path,
    tmp_path: Path,
) -> None:
    cluster, procs, publication = _setup(topology, pod_processes, publications, api_client)
    node_ns = cluster.topo.node("node-1").netns
    web_if = cluster.topo.pods["demo/web"].host_ifname
    log = tmp_path / "agent.log"
    started = [AgentProcess(cluster.node_name, node_ns, control_plane.kubeconfig, root, log)]
    try:
        generation = publication.publish()
        started[0].wait_synced(generation)
        links_before = pinned_links(root / "links" / web_if)
        with netns_executor(node_ns) as ex:
            chain = tcx_programs(ex, web_if)

        outcomes: list[dict[str, Outcome]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                outcomes.append(probe_web(procs, cluster, timeout=0.5))

        prober = threading.Thread(target=traffic, daemon=True)
        prober.start()
        try:
            wait_for("probes under way", lambda: len(outcomes) >= 2)
            started[0].kill()
            with netns_executor(node_ns) as ex:
                assert tcx_programs(ex, web_if) == chain  # the dead agent's links still run
            seen = len(outcomes)
            wait_for("probes while no agent runs", lambda: len(outcomes) >= seen + 2)
            started.append(
                AgentProcess(cluster.node_name, node_ns, control_plane.kubeconfig, root, log)
            )
            started[1].wait_synced(generation)
            seen = len(outcomes)
            wait_for("probes after the restart", lambda: len(outcomes) >= seen + 3)
        finally:
            stop.set()
            prober.join(timeout=30)
        metrics = started[1].metrics()
        assert metrics["stockade_agent_program_loads_total"] == 0
        assert metrics["stockade_agent_map_write_syncs_total"] == 0
        assert metrics["stockade_agent_last_map_change_timestamp_seconds"] == 0
        assert metrics["stockade_agent_detached_total"] == 0
        with netns_executor(node_ns) as ex:
            assert tcx_programs(ex, web_if) == chain
        assert pinned_links(root / "links" / web_if) == links_before
        wrong = [o for o in outcomes if o != ENFORCED]
        assert wrong == [], f"{len(wrong)} of {len(outcomes)} probe rounds were wrong"
    finally:
        for agent in started:
            agent.stop()


def pinned_links(folder: Path) -> dict[str, int]:
    """Pin name -> link id."""
    out = {}
    for pin in folder.iterdir():
        fd = libbpf.obj_get(pin)
        try:
            out[pin.name] = libbpf.link_info(fd).id
        finally:
            os.close(fd)
    return out


def netns_executor(name: str) -> NetnsExecutor:
    return NetnsExecutor.named(name)
