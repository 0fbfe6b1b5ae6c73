"""A pod is enforced from its first packet, through the real CNI chain on a sandbox of its own
(`bench/startup.py`, the same run the benchmark makes, with fewer starts): in both topologies,
20 pods in a namespace whose policy denies all but egress to one peer are started through
ptp or bridge, host-local and stockade-cni; each pod's process sends to a denied peer from the
moment CNI ADD returns, and not one datagram reaches it, while every pod reaches the allowed
peer once its tables are applied."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STARTS = 20  # per topology; the benchmark makes 200


def test_pods_started_through_stockade_cni_leak_nothing_and_reach_their_allowed_peer(
    tmp_path: Path,
) -> None:
    out = tmp_path / "startup.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "startup.py"),
            "--starts",
            str(STARTS),
            "--output",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())
    for mode in ("routed", "bridge"):
        run = figures["topologies"][mode]
        assert run["pods"] == STARTS
        assert run["datagrams_sent_to_denied"] > 0, mode  # the senders did send
        assert run["leaked_packets"] == 0, mode
        assert run["never_reached_allowed"] == 0, mode
    assert figures["leaked_packets"] == 0
