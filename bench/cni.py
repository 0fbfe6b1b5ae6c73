"""CNI ADD (and DEL) time per pod through the real plugins, as the sandbox kubelet runs them.

For each topology (routed: ptp, bridge: bridge plugin; both host-local IPAM, plus loopback) a
one-node sandbox topology is built, then `--pods` pods (default 20) are wired one after the
other: netns creation, ADD (loopback + the node's network, each plugin run through
`ip netns exec <node netns>`), then unwired (DEL + netns removal). The figures are the mean and
median ADD and DEL per pod in milliseconds; results go to bench/results/cni.json. Everything is
removed at the end, also on failure. Needs root; the plugins are the toolchain's (or
$STOCKADE_CNI_BIN, or --cni-bin).

    .venv/bin/python bench/cni.py [--pods 20] [--cni-bin DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from stockade.sandbox import netns
from stockade.sandbox.node.cni import (
    PodRef,
    RuntimeConf,
    parse_result,
    plugin_dir,
    pod_args,
)
from stockade.sandbox.node.kubelet import POD_SYSCTLS, pod_netns_name
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.topology import Mode, Topology

RESULTS = Path(__file__).parent / "results" / "cni.json"


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "mean_ms": round(statistics.mean(values) * 1000, 2),
        "median_ms": round(statistics.median(values) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


def run_mode(mode: Mode, pods: int, plugins: Path) -> dict[str, Any]:
    topo = Topology.create(nodes=1, mode=mode)
    made: list[RuntimeConf] = []
    adds: list[float] = []
    dels: list[float] = []
    creates: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="stk-bench-cni-") as tmp:
            node = topo.nodes[0]
            cni = NodeCni(Path(tmp) / node.name, node, plugins)
            cni.install(mode, f"{topo.ifname_prefix}br")
            for i in range(pods):
                uid = f"{i:08x}-0000-4000-8000-000000000000"
                rt = RuntimeConf(
                    uid,
                    pod_netns_name(topo.run_id, uid),
                    "eth0",
                    pod_args(PodRef("bench", f"p{i}", uid), uid),
                    f"bench/p{i}",
                )
                started = time.perf_counter()
                netns.create(rt.netns, POD_SYSCTLS)
                made.append(rt)
                creates.append(time.perf_counter() - started)
                started = time.perf_counter()
                result = cni.add(rt)
                adds.append(time.perf_counter() - started)
                if parse_result(result).ip_v4 is None:
                    raise RuntimeError(f"pod {rt.pod}: no IPv4 address in {result}")
            for rt in made:
                started = time.perf_counter()
                cni.delete(rt)
                dels.append(time.perf_counter() - started)
                netns.remove(rt.netns)
            made.clear()
    finally:
        for rt in made:
            netns.remove(rt.netns)
        topo.destroy()
    return {"pods": pods, "add": _ms(adds), "del": _ms(dels), "netns_create": _ms(creates)}


def _plugins_version(plugins: Path) -> str:
    """The containernetworking/plugins module version the binaries were built from."""
    try:
        out = subprocess.run(
            ["go", "version", "-m", str(plugins / "ptp")],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return "unknown"
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["mod"] and len(fields) >= 3:
            return f"{fields[1]} {fields[2]}"
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--cni-bin", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    plugins = plugin_dir(args.cni_bin)
    started = time.monotonic()
    results: dict[str, Any] = {
        mode: run_mode(mode, args.pods, plugins) for mode in ("routed", "bridge")
    }
    version = _plugins_version(plugins)
    results["meta"] = {
        "kernel": platform.release(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "plugins": version,
        "seconds": round(time.monotonic() - started, 1),
        "units": "milliseconds per pod; ADD = loopback + the node network (ptp or bridge, "
        "host-local), each plugin exec'd via `ip netns exec <node netns>`",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
