"""The backstop (`stockade.agent.backstop`) on real veths, without an API server: a pod veth made
without CNI is put in the pending state by the link watch (RTM_NEWLINK) and drops its traffic to
a peer until the sync that applies its tables releases it; at start (a new Syncer over the pin
root of one that had attached it) a veth whose links are pinned but that no endpoint owns any
more is made pending without its links ever being detached. In both, the node's own interfaces
(its uplink veth, which carries the node's addresses, the pod bridge, lo) are never taken.

The scenario is tests/bpf/agent_harness.py's plus `demo/late` (role=client) on node-1, as in
tests/bpf/test_agent_pending.py.
"""

from __future__ import annotations

import time

import pytest

from stockade.agent.backstop import Backstop
from stockade.agent.sync import Syncer
from stockade.compiler.abi import PendingState
from stockade.datapath.maps import Pending
from stockade.sandbox import netns
from stockade.sandbox.netns import NETNS_DIR
from stockade.sandbox.topology import Topology
from stockade.sandbox.workloads.traffic import Outcome
from tests.bpf.agent_harness import PORT, Cluster, pin_root, running_syncer, serve_web
from tests.fixtures.netns import MakeProcesses, MakeTopology

LATE = "demo/late"
WAIT_LIMIT = 30.0  # seconds the link watch may take before the test gives up (not a measure)


def pending_of(syncer: Syncer) -> dict[int, PendingState]:
    assert syncer.maps is not None
    return Pending(syncer.maps).read()


def late_ifindex(syncer: Syncer, topo: Topology) -> int:
    pod = topo.pods[LATE]
    return syncer.attachments.host_ifindex(NETNS_DIR / pod.netns, pod.pod_ifname)


def wire(syncer: Syncer, requests: list[int]) -> Backstop:
    backstop = Backstop(syncer, lambda: requests.append(1))
    syncer.sweep = backstop.sweep  # as the agent wires them
    return backstop


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_a_veth_made_without_cni_is_pending_until_its_tables_arrive(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str
) -> None:
    topo = topology(nodes=2, mode=mode)
    cluster = Cluster.create(topo)
    cluster.labels[LATE] = "client"
    cluster.deleted.add(LATE)  # not in the API yet: no tables
    objects = dict(cluster.table_objects())
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):  # type: ignore[arg-type]
        requests: list[int] = []
        backstop = wire(syncer, requests)
        syncer.sync()
        assert pending_of(syncer) == {}  # the node's uplink veth, bridge and lo are not taken
        backstop.start()
        try:
            topo.add_pod(LATE, "node-1")  # a veth into a new namespace, no CNI ADD relayed
            ifindex = late_ifindex(syncer, topo)
            deadline = time.monotonic() + WAIT_LIMIT
            while backstop.adopted < 1 and time.monotonic() < deadline:  # counted when done
                time.sleep(0.01)
            assert pending_of(syncer) == {ifindex: PendingState.CLOSED}
            assert ifindex in syncer.attachments.attached_ifindexes()
            assert backstop.adopted == 1 and requests  # and it asked for a sync
            procs = pod_processes(topo)
            serve_web(procs)
            procs.serve("demo/other", [(PORT, "TCP")])
            other, web = cluster.ip("demo/other"), cluster.ip("demo/web")
            assert procs.probe(LATE, other, PORT, "tcp") is Outcome.TIMEOUT
            assert procs.probe(LATE, web, PORT, "tcp") is Outcome.TIMEOUT
            assert procs.ping(LATE, topo.node("node-1").ip_v4) is Outcome.CONNECTED
            syncer.sync()  # tables unchanged: still pending, not taken again
            assert pending_of(syncer) == {ifindex: PendingState.CLOSED}
            assert backstop.adopted == 1
            cluster.deleted.discard(LATE)
            objects.clear()
            objects.update(cluster.table_objects())
            syncer.sync()
            assert pending_of(syncer) == {}
            assert procs.probe(LATE, web, PORT, "tcp") is Outcome.CONNECTED
            assert procs.probe(LATE, other, PORT, "tcp") is Outcome.CONNECTED
            assert backstop.adopted == 1
        finally:
            backstop.stop()


def test_at_start_an_attached_veth_no_endpoint_owns_is_made_pending_not_detached(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    topo = topology(nodes=2, mode="routed")
    cluster = Cluster.create(topo)
    topo.add_pod(LATE, "node-1")
    cluster.labels[LATE] = "client"
    objects = dict(cluster.table_objects())
    procs = pod_processes(topo)
    procs.serve("demo/other", [(PORT, "TCP")])
    other = cluster.ip("demo/other")
    with pin_root() as root:
        with running_syncer(root, topo, objects) as (first, _):  # type: ignore[arg-type]
            first.sync()  # an agent attaches the late pod as an endpoint, then stops
            ifindex = late_ifindex(first, topo)
            assert ifindex in first.attachments.attached_ifindexes()
        assert procs.probe(LATE, other, PORT, "tcp") is Outcome.CONNECTED
        cluster.deleted.add(LATE)  # meanwhile its tables went away; its veth stays
        with netns.ipr(topo.node("node-1").netns) as ip:  # a gateway address, as ptp puts there
            host_index = netns.link_index(ip, topo.pods[LATE].host_ifname)
            netns.add_address(ip, host_index, "10.250.0.1/32")
        objects.clear()
        objects.update(cluster.table_objects())
        with running_syncer(root, topo, objects) as (syncer, _):  # type: ignore[arg-type]
            requests: list[int] = []
            backstop = wire(syncer, requests)
            node1 = {p.host_ifname for p in topo.pods.values() if p.node == "node-1"}
            assert set(syncer.attachments.pod_veths().values()) == node1  # not the uplink
            syncer.sync()  # the new agent's first sync
            host = topo.pods[LATE].host_ifname
            assert host not in syncer.stats.last_attach.detached
            assert pending_of(syncer) == {ifindex: PendingState.CLOSED}
            assert ifindex in syncer.attachments.attached_ifindexes()
            assert backstop.adopted == 1
            assert procs.probe(LATE, other, PORT, "tcp") is Outcome.TIMEOUT
            cluster.deleted.discard(LATE)
            objects.clear()
            objects.update(cluster.table_objects())
            syncer.sync()
            assert pending_of(syncer) == {}
            assert procs.probe(LATE, other, PORT, "tcp") is Outcome.CONNECTED
