"""Pod start-up benchmark (DESIGN.md §7, "pod start → enforced"): is a new pod enforced from its
first packet, and what does that cost CNI ADD?

    .venv/bin/python bench/startup.py [--starts 200] [--topology routed|bridge|both]
                                      [--output bench/results/startup.json]

For each topology it runs a sandbox of its own (`stockade.sandbox.session.up`: two nodes, the
operator, one agent per node, stockade-cni chained into each node's network) and starts pods in
namespace `start`, where a policy denies all ingress and egress except egress to the `allowed`
peer (TCP 80). Two peers live on node-2 in namespace `peers`: `allowed` serves TCP 80, `denied`
counts every UDP datagram that reaches it. This bench is the container runtime of its pods (they
carry the sandbox's direct annotation, so the kubelet stand-in leaves them): for each start it
creates the Pod object, runs CNI ADD through node-1's chained configuration list (the same code
and files the kubelet stand-in uses: ptp or bridge, host-local, then stockade-cni), and at the
moment ADD returns a process already waiting in the pod's namespace starts sending a UDP
datagram to `denied` every 0.5 ms and connecting to `allowed`, as a container that starts at once
would; then the bench writes the Pod's addresses into its status, as a kubelet does after ADD.
It stops 100 ms after the first allowed connection, then DEL, and the next pod starts.

Results: `pods` (starts per topology), `leaked_packets` (datagrams `denied` received from the
started pods: pending and then policy must drop every one), `cni_add_ms` {p50, p99} (the whole
chain's ADD, as a runtime waits for it), `first_allowed_packet_ms` {p50, p99} (ADD return →
the first connection to `allowed` established: the pod's tables published and applied). Goals:
0 leaked over >= 200 starts per topology; cni_add_ms p99 <= 250 ms. `--unchained` is the
control run: the same starts without stockade-cni in the chain, where packets do leak.

Where an ADD's time goes, per topology under `breakdown` (each {p50, p99}): `plugins_ms`, each
plugin's run as the runtime makes it (`ip netns exec` and the process included; ptp's and
bridge's include host-local, which they run); `stockade_share_ms`, the stockade-cni plugin's run,
beside `chain_without_stockade_ms`, the rest of the same ADD, and `stockade_ratio`, the one over
the other per start (the figure that keeps its meaning on a loaded machine, where both grow);
inside stockade's share, `agent_ms` (the agent's own account of the ADD, its /status
`lastCniAdd`) with `agent_phases_ms` (parse, netns_lookup, open_namespaces, lock_wait,
map_write, attach, or taken_by_backstop when the link watch had already made the veth pending),
and `relay_ms` (the share less the agent's part: starting the relay, the socket round trip).
`load_average` is the machine's (1, 5, 15 minutes) before and after the starts, with its cores.
Needs root (network namespaces, eBPF), clang and the sandbox toolchain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from stockade.runtime import cnichain
from stockade.sandbox import netns, session
from stockade.sandbox.node.cni import PodRef, RuntimeConf, parse_result, pod_args
from stockade.sandbox.node.kubelet import POD_SYSCTLS, node_state_dir
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.node.podspec import DIRECT_ANNOTATION
from stockade.sandbox.node.registration import create_pod, delete_pod
from stockade.sandbox.toolchain import cni_bin_dir
from stockade.sandbox.workloads.running import RunningSandbox
from stockade.sandbox.workloads.traffic import PodProcesses

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "start"
PEERS = "peers"
DENIED_PORT = 9
ALLOWED_PORT = 80
POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "only-allowed", "namespace": NAMESPACE},
    "spec": {
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
        "egress": [
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": PEERS}
                        },
                        "podSelector": {"matchLabels": {"role": "allowed"}},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": ALLOWED_PORT}],
            }
        ],
    },
}

# Waits for "go" on stdin, then sends a UDP datagram to DENIED every 0.5 ms and connects to
# ALLOWED until a connection is established; prints the monotonic times (system-wide clock).
SENDER = r"""
import json, socket, sys, threading, time
denied, allowed, dport, aport, family = sys.argv[1:6]
fam = socket.AF_INET6 if family == "6" else socket.AF_INET
sys.stdin.readline()
go = time.monotonic()
done = threading.Event()
first = []
def connect():
    while not done.is_set() and time.monotonic() - go < 10:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(0.05)
        try:
            s.connect((allowed, int(aport)))
            first.append(time.monotonic())
            return
        except OSError:
            time.sleep(0.005)
        finally:
            s.close()
t = threading.Thread(target=connect, daemon=True)
t.start()
u = socket.socket(fam, socket.SOCK_DGRAM)
sent = 0
while True:
    try:
        u.sendto(b"x", (denied, int(dport)))
        sent += 1
    except OSError:
        pass
    time.sleep(0.0005)
    if first and time.monotonic() - first[0] > 0.1:
        break
    if time.monotonic() - go > 10:
        break
print(json.dumps({"go": go, "first": first[0] if first else None, "sent": sent}), flush=True)
"""

COUNTER = r"""
import socket, sys
fam = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
u = socket.socket(fam, socket.SOCK_DGRAM)
u.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(sys.argv[1])))
u.settimeout(0.2)
print("ready", flush=True)
n = 0
import select
while True:
    r, _, _ = select.select([u, sys.stdin], [], [], 0.2)
    if u in r:
        u.recv(64); n += 1
    if sys.stdin in r:
        sys.stdin.readline(); break
print(n, flush=True)
"""


def say(message: str) -> None:
    print(f"startup: {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float, digits: int = 1) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], digits)


def _in_netns(name: str, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", name, sys.executable, "-u", "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _agent_add(agent_url: str | None, container_id: str) -> dict[str, Any] | None:
    """The agent's own account of the ADD of `container_id` (`lastCniAdd` of its /status):
    its total and its phases, in ms; None without stockade-cni in the chain."""
    if agent_url is None:
        return None
    with urllib.request.urlopen(f"{agent_url}/status", timeout=10) as answer:
        last = json.load(answer).get("lastCniAdd") or {}
    return last if last.get("containerID") == container_id else None


def one_start(
    rs: RunningSandbox,
    cni: NodeCni,
    i: int,
    run_id: str,
    denied: str,
    allowed: str,
    agent_url: str | None,
) -> dict[str, Any]:
    name = f"start-{i}"
    ns_name = f"stk-{run_id}-st{i}"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app": "start"},
            "annotations": {DIRECT_ANNOTATION: "true"},
        },
        "spec": {
            "nodeName": "node-1",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
        },
    }
    pod = create_pod(rs.api, NAMESPACE, body)
    netns.create(ns_name, POD_SYSCTLS)  # as the kubelet stand-in makes a pod namespace
    sender = _in_netns(ns_name, SENDER, denied, allowed, str(DENIED_PORT), str(ALLOWED_PORT), "4")
    rt = RuntimeConf(
        f"bench{i:05d}",
        ns_name,
        "eth0",
        pod_args(PodRef(NAMESPACE, name, pod.metadata.uid), f"bench{i}"),
        f"{NAMESPACE}/{name}",
    )
    try:
        timings: dict[str, float] = {}
        began = time.monotonic()
        result = cni.add(rt, timings)
        returned = time.monotonic()
        assert sender.stdin is not None
        sender.stdin.write("go\n")
        sender.stdin.flush()
        ips = parse_result(result).ips
        status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
        rs.core().patch_namespaced_pod_status(name, NAMESPACE, {"status": status})
        out, _ = sender.communicate(timeout=30)
        report = json.loads(out)
        first = report["first"]
        agent = _agent_add(agent_url, rt.container_id)
        return {
            "cni_add_ms": (returned - began) * 1000,
            "plugins_ms": {kind: seconds * 1000 for kind, seconds in timings.items()},
            "agent": agent,
            "first_allowed_ms": (first - returned) * 1000 if first is not None else None,
            "sent": report["sent"],
        }
    finally:
        if sender.poll() is None:
            sender.kill()
        try:
            cni.delete(rt)
        finally:
            delete_pod(rs.api, NAMESPACE, name)
            netns.remove(ns_name)


def run_topology(mode: str, starts: int, unchained: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stockade-startup-") as tmp:
        state_dir = Path(tmp) / "sandbox"
        session.up(state_dir, 2, mode, say, detach=False)  # type: ignore[arg-type]
        rs = RunningSandbox.open(state_dir)
        procs = PodProcesses(rs.topology)
        counter = None
        try:
            rs.ensure_namespace(NAMESPACE, {})
            rs.ensure_namespace(PEERS, {})
            denied = rs.add_pod(f"{PEERS}/denied", "node-2", {"role": "denied"}, [])
            allowed = rs.add_pod(
                f"{PEERS}/allowed", "node-2", {"role": "allowed"}, [(None, ALLOWED_PORT, "TCP")]
            )
            procs.serve(f"{PEERS}/allowed", [(ALLOWED_PORT, "TCP")])
            counter = _in_netns(denied.netns, COUNTER, str(DENIED_PORT), "4")
            assert counter.stdout is not None and counter.stdout.readline().strip() == "ready"
            rs.create_policy(POLICY)
            node = rs.topology.node("node-1")
            cni = NodeCni(node_state_dir(state_dir, "node-1"), node, cni_bin_dir())
            stack = session.SandboxState.load(state_dir)
            agent_url = None
            if stack is not None and stack.stack is not None:
                agent_url = stack.stack.agent_urls().get("node-1")
            if unchained:  # the control run: node-1's network without stockade-cni
                cnichain.uninstall(cni.conf_dir)
                agent_url = None
            time.sleep(1.0)  # let the policy reach the agents before the first start
            samples = []
            load_before = os.getloadavg()
            for i in range(starts):
                samples.append(
                    one_start(
                        rs, cni, i, rs.topology.run_id, denied.ip_v4, allowed.ip_v4, agent_url
                    )
                )
                if (i + 1) % 20 == 0:
                    say(f"{mode}: {i + 1}/{starts} starts")
            assert counter.stdin is not None
            counter.stdin.write("stop\n")
            counter.stdin.flush()
            leaked = int(counter.communicate(timeout=10)[0].strip())
            load_after = os.getloadavg()
        finally:
            if counter is not None and counter.poll() is None:
                counter.kill()
            procs.close()
            rs.close()
            session.down(state_dir, say)
    adds = [s["cni_add_ms"] for s in samples]
    firsts = [s["first_allowed_ms"] for s in samples if s["first_allowed_ms"] is not None]
    return {
        "pods": starts,
        "leaked_packets": leaked,
        "datagrams_sent_to_denied": sum(s["sent"] for s in samples),
        "never_reached_allowed": sum(1 for s in samples if s["first_allowed_ms"] is None),
        "cni_add_ms": {"p50": pct(adds, 0.5), "p99": pct(adds, 0.99)},
        "first_allowed_packet_ms": {"p50": pct(firsts, 0.5), "p99": pct(firsts, 0.99)}
        if firsts
        else None,
        "breakdown": breakdown(samples),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
            "cores": os.cpu_count(),
        },
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5), "p99": pct(values, 0.99)}


def breakdown(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the ADDs' time went: per plugin; stockade's share (the stockade-cni plugin's run)
    against the rest of the same chain in the same ADD (`stockade_ratio`, so that the figure
    means something on a loaded machine); inside stockade's share, the agent's work by phase and
    the relay (process start, `ip netns exec`, the socket round trip: the share less the
    agent's work)."""
    kinds = sorted({kind for s in samples for kind in s["plugins_ms"]})
    out: dict[str, Any] = {
        "plugins_ms": {
            kind: spread([s["plugins_ms"][kind] for s in samples if kind in s["plugins_ms"]])
            for kind in kinds
        }
    }
    shares = [s["plugins_ms"].get(cnichain.PLUGIN_TYPE) for s in samples]
    if not all(share is not None for share in shares):
        return out
    without = [s["cni_add_ms"] - (share or 0.0) for s, share in zip(samples, shares, strict=True)]
    ratios = [(share or 0.0) / rest for share, rest in zip(shares, without, strict=True)]
    out["stockade_share_ms"] = spread([share or 0.0 for share in shares])
    out["chain_without_stockade_ms"] = spread(without)
    out["stockade_ratio"] = {"p50": pct(ratios, 0.5, 3), "p99": pct(ratios, 0.99, 3)}
    agents = [s["agent"] for s in samples if s["agent"] is not None]
    if agents:
        out["agent_ms"] = spread([a["total_ms"] for a in agents])
        phases = sorted({p for a in agents for p in a["phases_ms"]})
        out["agent_phases_ms"] = {
            p: spread([a["phases_ms"].get(p, 0.0) for a in agents]) for p in phases
        }
        out["relay_ms"] = spread(
            [
                s["plugins_ms"][cnichain.PLUGIN_TYPE] - s["agent"]["total_ms"]
                for s in samples
                if s["agent"] is not None
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=200)
    p.add_argument("--topology", choices=("routed", "bridge", "both"), default="both")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    p.add_argument(
        "--unchained",
        action="store_true",
        help="control run: start the pods without stockade-cni (packets then leak)",
    )
    args = p.parse_args(argv)
    modes = ["routed", "bridge"] if args.topology == "both" else [args.topology]
    per = {mode: run_topology(mode, args.starts, args.unchained) for mode in modes}
    result = {
        "pods": sum(r["pods"] for r in per.values()),
        "leaked_packets": sum(r["leaked_packets"] for r in per.values()),
        "cni_add_ms": {
            "p50": max(r["cni_add_ms"]["p50"] for r in per.values()),
            "p99": max(r["cni_add_ms"]["p99"] for r in per.values()),
        },
        "first_allowed_packet_ms": {
            "p50": max((r["first_allowed_packet_ms"] or {}).get("p50", 0) for r in per.values()),
            "p99": max((r["first_allowed_packet_ms"] or {}).get("p99", 0) for r in per.values()),
        },
        "stockade_share_ms": {
            q: max(r["breakdown"].get("stockade_share_ms", {}).get(q, 0) for r in per.values())
            for q in ("p50", "p99")
        },
        "stockade_ratio": {
            q: max(r["breakdown"].get("stockade_ratio", {}).get(q, 0) for r in per.values())
            for q in ("p50", "p99")
        },
        "load_average_1m": max(
            max(r["load_average"]["before"][0], r["load_average"]["after"][0]) for r in per.values()
        ),
        "unchained": args.unchained,
        "goals": {"leaked_packets": 0, "cni_add_ms_p99_max": 250, "starts_per_topology_min": 200},
        "topologies": per,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
