"""The pending state end to end on real veths, without an API server: a CNI ADD relayed to the
agent (`PendingPods`, the agent's own `AgentDatapath` over its `Syncer`) attaches a pod whose
tables are not published yet in the pending state, so its traffic to a peer its policy would
allow is dropped while the node still reaches it; the sync that applies its tables releases it
(and the waiting ADD); a budget that runs out leaves it closed, or open with the fail-open
setting; DEL is harmless when repeated or for an unknown container; 20 parallel ADDs through
the real stockade-cni binary and the agent's socket all attach, each answered with its
previous result unchanged.

The scenario is tests/bpf/agent_harness.py's, plus pod `demo/late` (role=client, so web accepts
it on TCP 8080 once its tables are applied) on node-1, absent from the published tables at first.
`demo/other` (node-2, selected by no policy) serves TCP 8080 too: the late pod reaches it
before ADD and once released, never while pending.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from stockade.agent.cniserver import CniServer
from stockade.agent.pending import AgentDatapath, CniRequest, PendingPods
from stockade.agent.sync import Syncer
from stockade.compiler.abi import PendingState
from stockade.datapath.maps import Pending
from stockade.sandbox.netns import NETNS_DIR
from stockade.sandbox.toolchain import STOCKADE_CNI, ensure
from stockade.sandbox.topology import Topology
from stockade.sandbox.workloads.traffic import Outcome, PodProcesses
from tests.bpf.agent_harness import PORT, Cluster, pin_root, running_syncer, serve_web
from tests.fixtures.netns import MakeProcesses, MakeTopology

LATE = "demo/late"


def add_request(topo: Topology, key: str, command: str = "ADD") -> CniRequest:
    pod = topo.pods[key]
    ns, name = key.split("/")
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": pod.pod_ifname, "sandbox": str(NETNS_DIR / pod.netns)}],
        "ips": [
            {"address": f"{pod.ip_v4}/24", "interface": 0},
            {"address": f"{pod.ip_v6}/64", "interface": 0},
        ],
    }
    return CniRequest.parse(
        {
            "command": command,
            "containerID": f"c-{name}",
            "netns": str(NETNS_DIR / pod.netns),
            "ifName": pod.pod_ifname,
            "args": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}",
            "config": {
                "cniVersion": "1.0.0",
                "name": "net",
                "type": "stockade-cni",
                "prevResult": prev,
            },
        }
    )


@dataclass
class Scene:
    topo: Topology
    cluster: Cluster
    procs: PodProcesses
    syncer: Syncer
    objects: dict[str, object]

    def publish(self) -> None:
        self.objects.clear()
        self.objects.update(self.cluster.table_objects())

    def to_web(self, key: str = LATE) -> Outcome:
        return self.procs.probe(key, self.cluster.ip("demo/web"), PORT, "tcp", 1.0)

    def to_other(self) -> Outcome:
        return self.procs.probe(LATE, self.cluster.ip("demo/other"), PORT, "tcp", 1.0)

    def pods(self, budget: float, fail_open: bool = False, add_wait: float = 0.0) -> PendingPods:
        datapath = AgentDatapath(self.syncer, self.syncer.attachments)
        pods = PendingPods(
            datapath, lambda: None, None, budget=budget, fail_open=fail_open, add_wait=add_wait
        )
        self.syncer.released = pods.released  # as the agent wires them
        return pods

    def pending(self) -> dict[int, PendingState]:
        assert self.syncer.maps is not None
        return Pending(self.syncer.maps).read()

    def late_ifindex(self) -> int:
        pod = self.topo.pods[LATE]
        return self.syncer.attachments.host_ifindex(NETNS_DIR / pod.netns, pod.pod_ifname)


@contextmanager
def scene(topology: MakeTopology, pod_processes: MakeProcesses, mode: str) -> Iterator[Scene]:
    topo = topology(nodes=2, mode=mode)
    cluster = Cluster.create(topo)
    topo.add_pod(LATE, "node-1")
    cluster.labels[LATE] = "client"
    cluster.deleted.add(LATE)  # created, not in the API yet: no tables
    procs = pod_processes(topo)
    serve_web(procs)
    procs.serve("demo/other", [(PORT, "TCP")])
    objects: dict[str, object] = dict(cluster.table_objects())
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):  # type: ignore[arg-type]
        syncer.sync()
        s = Scene(topo, cluster, procs, syncer, objects)
        assert s.to_other() is Outcome.CONNECTED  # nothing attached to the late pod yet
        yield s


@pytest.mark.parametrize(
    ("mode", "add_wait"),
    [("routed", 120.0), ("bridge", 120.0), ("routed", 0.0)],
    ids=["routed-add-waits", "bridge-add-waits", "routed-add-returns-at-once"],
)
def test_a_pod_added_before_its_tables_is_pending_until_the_sync_that_applies_them(
    topology: MakeTopology, pod_processes: MakeProcesses, mode: str, add_wait: float
) -> None:
    with scene(topology, pod_processes, mode) as s:
        pods = s.pods(budget=120.0, add_wait=add_wait)
        req = add_request(s.topo, LATE)
        add = threading.Thread(target=pods.add, args=(req,))
        add.start()
        try:
            if add_wait == 0.0:
                add.join()  # returned at once, the rest of the budget runs on
            ifindex = s.late_ifindex()
            # ADD marks the interface, then attaches: wait for both (not the mark alone)
            while add.is_alive() and not (
                s.pending() and ifindex in s.syncer.attachments.attached_ifindexes()
            ):
                add.join(0.01)
            assert s.pending() == {ifindex: PendingState.CLOSED}
            assert s.to_other() is Outcome.TIMEOUT  # no policy denies it, but it is pending
            assert s.procs.ping(LATE, s.topo.node("node-1").ip_v4) is Outcome.CONNECTED
            assert add.is_alive() is (add_wait > 0)  # waiting within its budget
            s.cluster.deleted.discard(LATE)
            s.publish()
            s.syncer.sync()
        finally:
            s.cluster.deleted.discard(LATE)
            s.publish()
            s.syncer.sync()
            add.join()
        assert s.pending() == {}
        assert pods.stats.woken_by_sync == 1  # the sync released it, not the budget
        assert s.to_other() is Outcome.CONNECTED
        assert s.to_web() is Outcome.CONNECTED
        assert s.procs.probe("demo/other", s.cluster.ip("demo/web"), PORT, "tcp") is (
            Outcome.TIMEOUT
        )


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_a_pod_whose_budget_runs_out_gets_the_configured_state_until_its_tables_arrive(
    topology: MakeTopology, pod_processes: MakeProcesses, fail_open: bool
) -> None:
    with scene(topology, pod_processes, "routed") as s:
        pods = s.pods(budget=0.0, fail_open=fail_open)
        pods.add(add_request(s.topo, LATE))
        ifindex = s.late_ifindex()
        if fail_open:
            assert s.pending() == {ifindex: PendingState.OPEN}
            assert pods.stats.budget_out_open == 1
            assert s.to_other() is Outcome.CONNECTED
        else:
            assert s.pending() == {ifindex: PendingState.CLOSED}
            assert pods.stats.budget_out_closed == 1
            assert s.to_other() is Outcome.TIMEOUT
        s.syncer.sync()  # tables unchanged: the pod stays pending, its links stay
        assert ifindex in s.pending()
        assert ifindex in s.syncer.attachments.attached_ifindexes()
        s.cluster.deleted.discard(LATE)
        s.publish()
        s.syncer.sync()
        assert s.pending() == {}
        assert s.to_other() is Outcome.CONNECTED
        assert s.to_web() is Outcome.CONNECTED


def test_del_twice_and_del_of_an_unknown_container_are_harmless(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    with scene(topology, pod_processes, "routed") as s:
        pods = s.pods(budget=0.0)
        pods.handle(add_request(s.topo, LATE))
        ifindex = s.late_ifindex()
        assert ifindex in s.syncer.attachments.attached_ifindexes()
        for _ in range(2):
            pods.handle(add_request(s.topo, LATE, "DEL"))
            s.syncer.sync()
        pods.handle(add_request(s.topo, "demo/other", "DEL"))  # never added here
        s.syncer.sync()
        assert s.pending() == {}
        assert ifindex not in s.syncer.attachments.attached_ifindexes()  # detached
        assert s.to_other() is Outcome.CONNECTED  # no program on it any more, as before ADD
        assert s.procs.probe("demo/other", s.cluster.ip("demo/web"), PORT, "tcp") is (
            Outcome.TIMEOUT
        )


def relay_add(topo: Topology, key: str, socket: Path) -> subprocess.CompletedProcess[str]:
    """CNI ADD of pod `key` through the real stockade-cni binary, as a runtime runs it."""
    req = add_request(topo, key)
    conf = {**req.config, "socket": str(socket)}
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": req.container_id,
        "CNI_NETNS": req.netns,
        "CNI_IFNAME": req.ifname,
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in req.args.items()),
        "CNI_PATH": str(STOCKADE_CNI.bin_dir),
    }
    return subprocess.run(
        [str(STOCKADE_CNI.path("stockade-cni"))],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_twenty_parallel_adds_through_the_plugin_each_attach_their_pod_pending(
    topology: MakeTopology, pod_processes: MakeProcesses, tmp_path: Path
) -> None:
    ensure((STOCKADE_CNI,))
    with scene(topology, pod_processes, "routed") as s:
        keys = [f"demo/new{i}" for i in range(20)]
        for key in keys:
            s.topo.add_pod(key, "node-1")
        pods = s.pods(budget=0.0)
        server = CniServer(tmp_path / "cni.sock", pods)
        server.start()
        try:
            with ThreadPoolExecutor(max_workers=20) as pool:
                done = list(pool.map(lambda k: relay_add(s.topo, k, server.path), keys))
        finally:
            server.stop()
        for key, proc in zip(keys, done, strict=True):
            assert proc.returncode == 0, (key, proc.stdout, proc.stderr)
            assert json.loads(proc.stdout) == add_request(s.topo, key).config["prevResult"]
        wanted = {
            s.syncer.attachments.host_ifindex(NETNS_DIR / s.topo.pods[k].netns, "eth0")
            for k in keys
        }
        assert set(s.pending()) == wanted
        assert all(state is PendingState.CLOSED for state in s.pending().values())
        assert wanted <= s.syncer.attachments.attached_ifindexes()
        assert pods.stats.adds == 20 and pods.stats.add_failures == 0


def test_a_pod_in_a_namespace_no_policy_can_select_opens_at_once(
    topology: MakeTopology, pod_processes: MakeProcesses
) -> None:
    free = "free/new"  # namespace free has no policy; no cluster-scoped policy exists
    with scene(topology, pod_processes, "routed") as s:
        s.topo.add_pod(free, "node-1")
        s.cluster.deleted.add(free)  # created, not in the API yet: no tables
        s.publish()  # the program part lists free, not demo, as fast-open
        s.syncer.sync()
        pods = s.pods(budget=120.0)
        pods.add(add_request(s.topo, free))  # returns at once, no budget runs
        pod = s.topo.pods[free]
        ifindex = s.syncer.attachments.host_ifindex(NETNS_DIR / pod.netns, pod.pod_ifname)
        assert s.pending() == {ifindex: PendingState.OPEN}
        assert pods.stats.fast_open == 1
        assert s.procs.probe(free, s.cluster.ip("demo/other"), PORT, "tcp") is Outcome.CONNECTED
        pods.add(add_request(s.topo, LATE))  # demo has a policy: closed as before
        assert s.pending()[s.late_ifindex()] is PendingState.CLOSED
        assert pods.stats.fast_open == 1
        s.cluster.deleted.discard(free)
        s.cluster.deleted.discard(LATE)
        s.publish()
        s.syncer.sync()
        assert s.pending() == {}
        assert s.procs.probe(free, s.cluster.ip("demo/other"), PORT, "tcp") is Outcome.CONNECTED
        # web's own policy judges the free pod (not role=client) at web's interface
        assert s.procs.probe(free, s.cluster.ip("demo/web"), PORT, "tcp") is Outcome.TIMEOUT
