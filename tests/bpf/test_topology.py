"""The sandbox network: nodes and pods as real namespaces carry TCP, UDP and ICMP between pods on
one node and across nodes, in both topologies and both address families, and leave nothing
behind (after destroy, after a SIGTERM, and after a killed run once leftovers are cleaned)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stockade.sandbox import netns
from stockade.sandbox.topology import Topology, cleanup_leftovers
from stockade.sandbox.workloads.traffic import Outcome, Probe
from tests.fixtures.netns import MakeProcesses, MakeTopology

MODES = ["routed", "bridge"]
FAMILIES = ["ip_v4", "ip_v6"]


def _pods(topo: Topology) -> tuple[str, str, str]:
    """Two pods on node-1 and one on node-2."""
    a = topo.add_pod("x/a", "node-1").key
    b = topo.add_pod("x/b", "node-1").key
    c = topo.add_pod("y/c", "node-2").key
    return a, b, c


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def _root_routes() -> str:
    v4 = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    v6 = subprocess.run(["ip", "-6", "route"], capture_output=True, text=True, check=True).stdout
    return v4 + v6


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", MODES)
def test_tcp_and_udp_echo_work_between_pods_on_one_node_and_across_nodes(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str, family: str
) -> None:
    topo = topology(nodes=2, mode=mode)
    pods = _pods(topo)
    procs = pod_processes(topo)
    for key in pods:
        assert procs.serve(key, [(80, "TCP"), (53, "UDP"), (9003, "SCTP")]) == [
            (80, "tcp"),
            (53, "udp"),
        ]
    probes = [
        Probe(src, getattr(topo.pods[dst], family), port, proto)
        for src, dst in itertools.permutations(pods, 2)
        for port, proto in ((80, "TCP"), (53, "UDP"))
    ]
    results = procs.probe_many(probes)
    failed = [
        (p.src, p.dst_ip, p.proto, r.outcome.value, r.detail)
        for p, r in zip(probes, results, strict=True)
        if r.outcome is not Outcome.CONNECTED
    ]
    assert failed == []


@pytest.mark.parametrize("mode", MODES)
def test_ping_works_between_pods_and_to_nodes(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str
) -> None:
    topo = topology(nodes=2, mode=mode)
    a, b, c = _pods(topo)
    n2 = topo.node("node-2")
    targets = [topo.pods[b], topo.pods[c]]
    pings = [(a, getattr(t, f)) for t in targets for f in FAMILIES]
    pings += [(a, n2.ip_v4), (a, n2.ip_v6)]
    results = pod_processes(topo).ping_many(pings)
    assert [r.outcome for r in results] == [Outcome.CONNECTED] * len(pings)


@pytest.mark.parametrize("mode", MODES)
def test_probes_tell_refused_from_timeout(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str
) -> None:
    topo = topology(nodes=2, mode=mode)
    a, b, c = _pods(topo)
    procs = pod_processes(topo)
    procs.serve(b, [(80, "TCP")])
    unused_v4 = "10.244.2.200"  # inside node-2's pod CIDR, no pod there
    outcomes = [
        procs.probe(a, topo.pods[b].ip_v4, 81, "TCP", timeout=0.5),
        procs.probe(a, topo.pods[c].ip_v6, 81, "UDP", timeout=0.5),
        procs.probe(a, unused_v4, 80, "TCP", timeout=0.5),
        procs.probe(a, unused_v4, 53, "UDP", timeout=0.5),
        procs.probe(a, topo.pods[b].ip_v4, 9003, "SCTP", timeout=0.5),
    ]
    assert outcomes == [
        Outcome.REFUSED,
        Outcome.REFUSED,
        Outcome.TIMEOUT,
        Outcome.TIMEOUT,
        Outcome.ERROR,
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_server_in_a_node_namespace_answers_on_the_node_address_as_host_network_pods_do(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str
) -> None:
    topo = topology(nodes=2, mode=mode)
    a, _, c = _pods(topo)
    n1 = topo.node("node-1")
    procs = pod_processes(topo)
    procs.serve("node-1", [(34345, "TCP"), (34346, "UDP")])
    procs.serve(c, [(80, "TCP")])
    probes = [
        Probe(c, n1.ip_v4, 34345, "TCP"),
        Probe(c, n1.ip_v6, 34346, "UDP"),
        Probe(a, n1.ip_v4, 34346, "UDP"),
        Probe(a, n1.ip_v6, 34345, "TCP"),
        Probe("node-1", topo.pods[c].ip_v4, 80, "TCP"),
        Probe("node-1", topo.pods[c].ip_v6, 80, "TCP"),
    ]
    results = procs.probe_many(probes)
    assert [r.outcome for r in results] == [Outcome.CONNECTED] * len(probes)


def test_names_are_short_deterministic_and_carry_the_run_id(topology: MakeTopology) -> None:
    topo = topology(nodes=2, mode="bridge", run_id="t0k1z")
    pod = topo.add_pod("x/a", "node-2")
    assert (pod.netns, pod.host_ifname, pod.pod_ifname) == (
        "stk-t0k1z-n2p2",
        "stkt0k1zn2p2",
        "eth0",
    )
    assert (pod.ip_v4, pod.ip_v6) == ("10.244.2.2", "fd00:10:244:2::2")
    assert [n.netns for n in topo.nodes] == ["stk-t0k1z-node1", "stk-t0k1z-node2"]
    assert netns.list_names("stk-t0k1z-") == sorted(topo.namespaces())


def test_a_removed_pod_frees_its_address_and_names(topology: MakeTopology) -> None:
    topo = topology(nodes=1)
    first = topo.add_pod("x/a", "node-1")
    topo.add_pod("x/b", "node-1")
    topo.remove_pod("x/a")
    assert not netns.exists(first.netns)
    again = topo.add_pod("x/c", "node-1")
    assert (again.ip_v4, again.host_ifname, again.netns) == (
        first.ip_v4,
        first.host_ifname,
        first.netns,
    )


def test_creating_and_destroying_leaves_the_machine_namespace_untouched_and_nothing_behind(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    links_before, routes_before = _root_links(), _root_routes()
    topo = topology(nodes=2, mode="routed")
    _pods(topo)
    procs = pod_processes(topo)
    procs.start([*topo.pods, "node-1"])
    pids = procs.pids()
    assert (_root_links(), _root_routes()) == (links_before, routes_before)
    namespaces = topo.namespaces()
    procs.close()
    topo.destroy()
    topo.destroy()  # idempotent
    assert [n for n in namespaces if netns.exists(n)] == []
    assert [p for p in pids if netns.process_alive(p, None)] == []
    assert not netns.record_path(topo.run_id).exists()
    assert (_root_links(), _root_routes()) == (links_before, routes_before)


def test_a_loaded_topology_record_can_destroy_the_run(
    topology: MakeTopology, tmp_path: Path
) -> None:
    topo = topology(nodes=2, mode="bridge")
    _pods(topo)
    topo.save(tmp_path / "topology.json")
    loaded = Topology.load(tmp_path / "topology.json")
    assert loaded.to_dict() == topo.to_dict()
    loaded.destroy()
    assert [n for n in topo.namespaces() if netns.exists(n)] == []


_OWNER = textwrap.dedent(
    """
    import json, sys, time
    from stockade.sandbox.topology import Topology
    from stockade.sandbox.workloads.traffic import PodProcesses
    topo = Topology.create(nodes=2, mode=sys.argv[1])
    topo.add_pod("x/a", "node-1")
    procs = PodProcesses(topo)
    procs.serve("x/a", [(80, "TCP")])
    print(json.dumps({"run_id": topo.run_id, "namespaces": topo.namespaces(),
                      "pids": procs.pids()}), flush=True)
    time.sleep(60)
    """
)


def _start_owner(mode: str) -> tuple[subprocess.Popen[str], dict[str, list[str] | str]]:
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"owner process exited early with {proc.wait()}"
    return proc, json.loads(line)


def test_leftovers_of_a_killed_run_are_removed_by_cleanup_leftovers() -> None:
    proc, run = _start_owner("routed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    assert all(netns.exists(n) for n in run["namespaces"])
    removed = cleanup_leftovers()
    assert sorted(removed) == sorted(run["namespaces"])
    assert [n for n in run["namespaces"] if netns.exists(n)] == []
    assert [p for p in run["pids"] if netns.process_alive(int(p), None)] == []
    assert not netns.record_path(str(run["run_id"])).exists()


def test_a_run_is_destroyed_when_its_owner_gets_sigterm() -> None:
    proc, run = _start_owner("bridge")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert proc.stdout is not None
    proc.stdout.close()
    assert [n for n in run["namespaces"] if netns.exists(n)] == []
    assert [p for p in run["pids"] if netns.process_alive(int(p), None)] == []


def test_cleanup_leftovers_leaves_live_runs_alone(topology: MakeTopology) -> None:
    topo = topology(nodes=1)
    cleanup_leftovers()
    assert all(netns.exists(n) for n in topo.namespaces())
