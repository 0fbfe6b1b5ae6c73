"""The shared conformance suites through Services (docs/services.md), in every Service mode.

    .venv/bin/python bench/conformance_services.py [--via service|nodeport] [--family 4|6]
        [--mode nftables-netfilter ...] [--file netpol-upstream.yaml ...]
        [--sample N --seed S] [--output bench/results/conformance_services.json]

For each mode it runs `stockade conformance run FILE --engine e2e --via service` on each case
file: the e2e engine starts a two-node sandbox of its own per run (its operator hands out the
Service space, kube-proxy runs in the mode's proxy mode, the agents in its Service mode) and sends
every TCP and UDP probe to a per-pod ClusterIP Service (with `--via nodeport`, to that Service's
node port on the other node) with the expectations the file states for the pod's address.

Modes: `nftables-netfilter` and `iptables-netfilter` (kube-proxy in that mode, the agents judging
Service flows on the backend with the netfilter program) and `nftables-fallback` (the agents'
`--service-mode fallback`: the verdict over every ready backend, at the client's veth). Each
probe's Service has one backend, so the fallback's divergence (a flow allowed to some backends
only is denied) cannot show here: every failure is a real divergence to fix or to document.

A full run is too long for CI (on a 2-core machine, `netpol-upstream.yaml` takes about two
minutes per mode and `cnp-upstream.yaml` has twice as many cases): it is an outside-CI run.
CI runs a fixed-seed sample (`tests/conformance/test_e2e_engine.py`: `--sample 3 --seed 13` of
`netpol-upstream.yaml` in the iptables and fallback modes; five cases of it in both families
with nftables and netfilter).

Results: per mode and file, `passed`, `failed`, the ids of the failed cases and the run's closing
line; `total` sums them per mode. The run needs root, clang and the sandbox toolchain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stockade.conformance.casefile import load_case_file

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(
    os.environ.get("STOCKADE_CONFORMANCE_DIR", ROOT.parent / "shared" / "conformance")
)
FILES = ("netpol-upstream.yaml", "cnp-upstream.yaml")
# mode -> (kube-proxy mode, agents' Service mode)
MODES: dict[str, tuple[str, str]] = {
    "nftables-netfilter": ("nftables", "netfilter"),
    "iptables-netfilter": ("iptables", "netfilter"),
    "nftables-fallback": ("nftables", "fallback"),
}
RUN_TIMEOUT_S = 6 * 3600


def sample_cases(path: Path, sample: int | None, seed: int, mode: str) -> list[str]:
    """Every case id of the file, or `sample` of them drawn with `seed` (per mode and file)."""
    ids = [c.id for c in load_case_file(path).cases]
    if sample is None or sample >= len(ids):
        return ids
    rng = random.Random(f"{seed}:{mode}:{path.name}")
    return sorted(rng.sample(ids, sample), key=ids.index)


def run_suite(path: Path, cases: list[str], mode: str, via: str, family: int) -> dict[str, Any]:
    """One conformance run on a sandbox of the engine's own; its counts and failed case ids."""
    proxy_mode, service_mode = MODES[mode]
    env = {k: v for k, v in os.environ.items() if k != "STOCKADE_E2E_SANDBOX"}
    env |= {
        "STOCKADE_E2E_PROXY_MODE": proxy_mode,
        "STOCKADE_SERVICE_MODE": service_mode,
        "STOCKADE_SERVICE_SPACE": "on",
    }
    argv = [sys.executable, "-m", "stockade.cli", "conformance", "run", str(path)]
    argv += ["--engine", "e2e", "--via", via, "--ip-family", str(family)]
    argv += [arg for case in cases for arg in ("--case", case)]
    started = time.monotonic()
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    lines = done.stdout.splitlines()
    failed = [line.split()[1] for line in lines if line.startswith("FAIL ")]
    passed = sum(line.startswith("PASS ") for line in lines)
    closing = lines[-1] if lines else ""
    if not closing.endswith(" failed"):  # the run broke before its closing line
        failed.append(f"(run: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]})")
    return {
        "cases": len(cases),
        "passed": passed,
        "failed": len(failed),
        "failed_cases": failed,
        "closing": closing,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--via", choices=("service", "nodeport"), default="service")
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument("--mode", action="append", choices=sorted(MODES), default=[])
    parser.add_argument("--file", action="append", choices=FILES, default=[])
    parser.add_argument("--sample", type=int, help="cases per mode and file (default: all)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "conformance_services.json"
    )
    args = parser.parse_args(argv)
    modes = args.mode or list(MODES)
    files = args.file or list(FILES)
    results: dict[str, Any] = {
        "via": args.via,
        "family": args.family,
        "sample": args.sample,
        "seed": args.seed,
        "modes": {},
    }
    for mode in modes:
        per_file = {}
        for name in files:
            path = CONFORMANCE / name
            cases = sample_cases(path, args.sample, args.seed, mode)
            print(f"{mode}: {name}, {len(cases)} cases", file=sys.stderr, flush=True)
            per_file[name] = run_suite(path, cases, mode, args.via, args.family)
            print(f"{mode}: {name}: {per_file[name]['closing']}", file=sys.stderr, flush=True)
        total = {
            "passed": sum(r["passed"] for r in per_file.values()),
            "failed": sum(r["failed"] for r in per_file.values()),
        }
        results["modes"][mode] = {"files": per_file, "total": total}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({m: r["total"] for m, r in results["modes"].items()}))
    return 0 if all(r["total"]["failed"] == 0 for r in results["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
