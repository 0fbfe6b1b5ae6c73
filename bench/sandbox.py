"""The sandbox as a cluster: how long `stockade sandbox up --nodes 2` takes, and how long from
`kubectl apply` of a 10-replica Deployment to all of its pods Running, and to all of them
answering a TCP probe from a client pod. The baseline, in the same run on the same sandbox: the
same number of pods made through the direct path the conformance engines use
(`RunningSandbox.add_pod`: the sandbox wires the namespace itself and registers the Pod, and a
helper serves the port), to all reachable. The ratio says what the real path (scheduler,
controller manager, kubelet stand-in, CNI plugins) costs over it.

    .venv/bin/python bench/sandbox.py [--replicas 10] [--topology routed|bridge ...]

Results go to bench/results/sandbox.json. Needs root; everything is removed at the end, also on
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from stockade.sandbox import session
from stockade.sandbox.cluster.pods import pod_netns
from stockade.sandbox.controlplane.server import kubectl
from stockade.sandbox.workloads.running import RunningSandbox
from stockade.sandbox.workloads.traffic import Agent

RESULTS = Path(__file__).parent / "results" / "sandbox.json"
NAMESPACE = "bench"
PORT = 8080
TIMEOUT_S = 180.0


def _say(message: str) -> None:
    print(f"[sandbox bench] {message}", flush=True)


def _deployment(replicas: int) -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NAMESPACE}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - {{name: web, image: registry.example/web:1, ports: [{{containerPort: {PORT}}}]}}
"""


CLIENT = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NAMESPACE}, labels: {{app: client}}}}
spec:
  containers: [{{name: client, image: registry.example/client:1}}]
"""


def _until(what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def _running_ips(kubeconfig: Path, selector: str, count: int) -> list[str] | None:
    out = kubectl(kubeconfig, "get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json")
    pods = json.loads(out.stdout)["items"]
    ips = [
        p["status"]["podIP"]
        for p in pods
        if p["status"].get("phase") == "Running" and p["status"].get("podIP")
    ]
    return ips if len(ips) == count else None


def _all_reachable(client: Agent, ips: list[str]) -> bool:
    """One TCP probe to every address at once; True when each connected."""
    futures: list[Future[dict[str, Any]]] = [
        client.request("probe", proto="tcp", dst=ip, port=PORT, timeout=1.0, src=None) for ip in ips
    ]
    return all(f.result(timeout=30).get("outcome") == "connected" for f in futures)


def measure(replicas: int, topology: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stockade-bench-sandbox-") as tmp:
        state_dir = Path(tmp) / "sandbox"
        agents: list[Agent] = []
        try:
            began = time.monotonic()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                kubeconfig = session.up(state_dir, 2, topology, _say, detach=False)  # type: ignore[arg-type]
            up_s = time.monotonic() - began
            kubectl(kubeconfig, "apply", "-f", "-", input=CLIENT)
            _until("the client pod runs", lambda: _running_ips(kubeconfig, "app=client", 1))
            sandbox = RunningSandbox.open(state_dir)
            try:
                client_ns = pod_netns(sandbox.api, sandbox.topology, NAMESPACE, "client")
                client = Agent(client_ns, "client")
                agents.append(client)
                client.wait_ready()

                _say(f"kubectl apply of a {replicas}-replica Deployment")
                began = time.monotonic()
                kubectl(kubeconfig, "apply", "-f", "-", input=_deployment(replicas))
                ips = _until(
                    "the Deployment's pods run",
                    lambda: _running_ips(kubeconfig, "app=web", replicas),
                )
                running_s = time.monotonic() - began
                _until("the Deployment's pods answer", lambda: _all_reachable(client, ips))
                reachable_s = time.monotonic() - began

                _say(f"the baseline: {replicas} pods through the direct path")
                began = time.monotonic()
                direct = []
                for i in range(replicas):
                    node = sandbox.nodes[i % len(sandbox.nodes)].name
                    net = sandbox.add_pod(
                        f"{NAMESPACE}/direct-{i}", node, {"app": "direct"}, [(None, PORT, "TCP")]
                    )
                    helper = Agent(net.netns, f"direct-{i}")
                    agents.append(helper)
                    helper.wait_ready()
                    hosts = [net.ip_v4, net.ip_v6]
                    helper.request("serve", proto="tcp", port=PORT, hosts=hosts).result(30)
                    direct.append(net.ip_v4)
                _until("the direct pods answer", lambda: _all_reachable(client, direct))
                direct_s = time.monotonic() - began
            finally:
                sandbox.close()
        finally:
            for agent in agents:
                agent.close()
            session.down(state_dir, _say)
    return {
        "topology": topology,
        "replicas": replicas,
        "sandbox_up_seconds": round(up_s, 2),
        "deployment_running_seconds": round(running_s, 2),
        "deployment_reachable_seconds": round(reachable_s, 2),
        "direct_path_reachable_seconds": round(direct_s, 2),
        "ratio_deployment_to_direct": round(reachable_s / direct_s, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument(
        "--topology", choices=("routed", "bridge"), action="append", help="default: both"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "runs": [measure(args.replicas, t) for t in args.topology or ("routed", "bridge")],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
