"""Attack: a new pod races its own enforcement. Its process runs before its network exists and
sends to a peer its policy denies from the instant the CNI plugin gives it a route: while the
plugin chain's ADD runs (the veth is made, addressed and routed before stockade-cni's turn),
after ADD returned and before the pod's tables are published, and after they are applied.

Scenario (tests/bpf/agent_harness.py, plus a policy that denies every egress of role=racer):
the racer pod is wired on node-1 by the real CNI chain a node runs (`ptp` with `host-local`,
then stockade-cni relaying to the agent's socket, as `stockade.runtime.cnichain` chains it), with
the agent's pieces that guard a new pod in this process: the CNI socket (`CniServer` →
`PendingPods`), the backstop's link watch (`Backstop`: a veth that appears is pending within
milliseconds, before stockade-cni is even run) and the sync that applies the pod's tables and
releases it. `other` on node-2 counts every datagram that reaches it: the count must stay 0,
while the racer is shown to have sent in each phase. Without the pending state (no backstop,
ADD relayed to nothing that attaches) the racer's datagrams reach `other` until its tables are
applied (checked: 3,991 of 4,889 did).

The racer is an ordinary process: its first neighbour resolution of the gateway, made before
the plugin addressed it, fails and is retried a second later, so what it sends before ADD
returns goes out only after stockade-cni's turn. A pod that gets frames out sooner (raw frames
to the host veth's MAC with CAP_NET_RAW; shown here by retrying every 10 ms) races the
backstop's link watch between the primary plugin and stockade-cni, and on a loaded machine
sometimes wins (docs/install.md): that variant is not a CI test.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stockade.agent.backstop import Backstop
from stockade.agent.cniserver import CniServer
from stockade.agent.pending import AgentDatapath, PendingPods
from stockade.model.cluster import ClusterState, Pod
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy
from stockade.sandbox import netns
from stockade.sandbox.node.cni import PodRef, RuntimeConf, parse_result, pod_args
from stockade.sandbox.node.kubelet import POD_SYSCTLS
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.toolchain import CNI_PLUGINS, STOCKADE_CNI, cni_bin_dir, ensure
from stockade.sandbox.workloads.traffic import PodProcesses
from tests.bpf.agent_harness import POLICY, Cluster, pin_root, running_syncer, serve_web
from tests.fixtures.netns import MakeProcesses, MakeTopology

PEER_PORT = 9999
EGRESS_DENIED = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "racer", "namespace": "demo"},
    "spec": {"podSelector": {"matchLabels": {"role": "racer"}}, "policyTypes": ["Egress"]},
}

# In the racer's namespace before it has any interface: a UDP datagram to the peer every
# 0.2 ms until stdin closes; prints the monotonic times of the sends the kernel took.
SENDER = r"""
import json, select, socket, struct, sys, time
peer, port = sys.argv[1], int(sys.argv[2])
sent = []
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        now = time.monotonic()
        u.sendto(struct.pack("d", now), (peer, port))
        sent.append(now)
    except OSError:
        pass
    time.sleep(0.0002)
print(json.dumps(sent), flush=True)
"""

# In the peer's namespace: the send time (the racer's monotonic clock, which is the machine's)
# of every datagram that reaches it.
COUNTER = r"""
import json, select, socket, struct, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
got = []
while True:
    r, _, _ = select.select([u, sys.stdin], [], [], 0.2)
    if u in r:
        got.append(struct.unpack("d", u.recv(64)[:8])[0])
    if sys.stdin in r:
        break
print(json.dumps(got), flush=True)
"""


class RacerCluster(Cluster):
    """The scenario's cluster, plus the racer pod once its addresses are known, and the policy
    that denies it every egress."""

    racer: tuple[str, ...] = ()

    def state(self) -> ClusterState:
        state = super().state()
        if not self.racer:
            return state
        ips = tuple(ipaddress.ip_address(ip) for ip in self.racer)
        racer = Pod("demo", "racer", {"role": "racer"}, ips, self._node("node-1"))
        return ClusterState(state.namespaces.values(), [*state.pods, racer], state.nodes.values())

    def policies(self) -> list[Policy]:
        return [parse_policy(POLICY), parse_policy(EGRESS_DENIED)]


def _start(netns_name: str, code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns_name, sys.executable, "-u", "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(input="stop\n", timeout=30)
    return out.strip()


def test_a_pod_sending_from_the_instant_its_veth_exists_reaches_no_denied_peer(
    topology: MakeTopology, pod_processes: MakeProcesses, tmp_path: Path
) -> None:
    ensure((CNI_PLUGINS, STOCKADE_CNI))
    topo = topology(nodes=2, mode="routed")
    cluster = RacerCluster.create(topo)
    procs: PodProcesses = pod_processes(topo)
    serve_web(procs)
    objects: dict[str, object] = {}

    def publish() -> None:
        objects.clear()
        objects.update(cluster.table_objects())

    publish()
    cni = NodeCni(tmp_path / "cni", topo.node("node-1"), cni_bin_dir())
    cni.install("routed", None)
    cni.chain_stockade(STOCKADE_CNI.path("stockade-cni"))
    racer_ns = f"stk-{topo.run_id}-racer"
    rt = RuntimeConf(
        "racer0", racer_ns, "eth0", pod_args(PodRef("demo", "racer", "uid-racer"), "racer0")
    )
    counter = sender = None
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):  # type: ignore[arg-type]
        backstop = Backstop(syncer, lambda: None)
        syncer.sweep = backstop.sweep
        pods = PendingPods(
            AgentDatapath(syncer, syncer.attachments, backstop.taken_as), lambda: None
        )
        syncer.released = pods.released
        pended: list[float] = []  # when stockade-cni's ADD had the pod attached and pending
        add = pods.add

        def timed_add(req: Any) -> None:
            add(req)
            pended.append(time.monotonic())

        pods.add = timed_add  # type: ignore[method-assign]
        syncer.sync()
        server = CniServer(cni.socket, pods)
        try:
            netns.create(racer_ns, POD_SYSCTLS)
            server.start()
            backstop.start()
            counter = _start(topo.pods["demo/other"].netns, COUNTER, str(PEER_PORT))
            sender = _start(racer_ns, SENDER, cluster.ip("demo/other"), str(PEER_PORT))
            began = time.monotonic()
            result = cni.add(rt)
            returned = time.monotonic()
            # The pod's address reaches the API server after ADD, its tables later: here after
            # more than one retry of the racer's first neighbour resolution (1 s), which failed
            # while the plugin had not yet addressed the gateway, so that its datagrams do get
            # out before its tables (they do without the pending state).
            time.sleep(1.5)
            cluster.racer = parse_result(result).ips
            publish()
            syncer.sync()
            released = time.monotonic()
            time.sleep(0.3)
            sent = json.loads(_finish(sender))
            reached = json.loads(_finish(counter))
        finally:
            backstop.stop()
            server.stop()
            for proc in (sender, counter):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            try:
                cni.delete(rt)
            finally:
                netns.remove(racer_ns)
    assert any(began < t < returned for t in sent), "the racer sent while ADD ran"
    assert any(returned < t < released for t in sent), "and between ADD and its tables"
    assert any(t > released for t in sent), "and once enforced by its policy"
    # Nothing the racer sent once stockade-cni's turn of ADD had made it pending reached the
    # peer. Before that turn the backstop's link watch races the primary plugin, the window
    # docs/install.md describes: a loaded machine opens it (an ADD slower than the racer's
    # neighbour retry), so what got through before that turn is not what this test asserts.
    (pending_at,) = pended
    leaked = [t for t in reached if t >= pending_at]
    assert leaked == [], f"{len(leaked)} of {len(sent)} datagrams reached the denied peer"
    assert pods.stats.woken_by_sync == 1  # the sync that applied its tables released it
