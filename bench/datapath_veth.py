"""Throughput through a veth pair for bench/datapath.py: no filter, stockade, iptables.

Two network namespaces (a unique `stkb<pid>` prefix) joined by a veth pair: the server (the pod,
10.0.0.1, iperf3 -s) in `<prefix>a`, the client (10.128.3.231 for 1,000 rules: the last rule's
peer) in `<prefix>b`. The client's end plays the pod's host-side veth: stockade's programs attach
there through `stockade.datapath.attach` (tc egress judges what reaches the pod). iptables rules
go into the server namespace's INPUT chain, one per rule (`-s <peer>/32 -p <proto> --dport 5201
-j ACCEPT`, the client's last) then a DROP for the port: no conntrack shortcut, as a policy
engine that writes one rule per peer. The three configurations run interleaved in each round;
everything created is removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import datapath_tables as bt

from stockade.compiler.render import Hook
from stockade.datapath import attach, maps
from stockade.datapath.netns import NetnsExecutor
from stockade.harness import loader

CONFIGS = ("none", "stockade", "iptables")


def _sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out.stdout


class Pair:
    """The two namespaces and the veth between them."""

    def __init__(self, client: str) -> None:
        self.prefix = f"stkb{os.getpid() % 100000}"
        self.server_ns, self.client_ns = f"{self.prefix}a", f"{self.prefix}b"
        self.client = client
        self.veth = f"{self.prefix}v1"  # the client's end: the pod's "host-side" veth
        self.made: list[str] = []
        self.iperf: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
        _sh(
            "ip",
            "link",
            "add",
            f"{self.prefix}v0",
            "netns",
            self.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            self.veth,
            "netns",
            self.client_ns,
        )
        _sh("ip", "addr", "add", f"{bt.SERVER}/8", "dev", f"{self.prefix}v0", ns=self.server_ns)
        _sh("ip", "addr", "add", f"{self.client}/8", "dev", self.veth, ns=self.client_ns)
        _sh("ip", "link", "set", f"{self.prefix}v0", "up", ns=self.server_ns)
        _sh("ip", "link", "set", self.veth, "up", ns=self.client_ns)
        self.iperf = subprocess.Popen(
            ["ip", "netns", "exec", self.server_ns, "iperf3", "-s", "-p", str(bt.PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def down(self) -> None:
        if self.iperf is not None:
            self.iperf.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.iperf.wait(5)
            if self.iperf.poll() is None:
                self.iperf.kill()
                self.iperf.wait()
        for ns in reversed(self.made):
            _sh("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def tcp_bps(self, seconds: float) -> float:
        out = _sh(
            "iperf3",
            "-c",
            str(bt.SERVER),
            "-p",
            str(bt.PORT),
            "-t",
            str(seconds),
            "-J",
            ns=self.client_ns,
        )
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])

    def udp_pps(self, seconds: float) -> float:
        out = _sh(
            "iperf3",
            "-c",
            str(bt.SERVER),
            "-p",
            str(bt.PORT),
            "-u",
            "-l",
            "64",
            "-b",
            "0",
            "-t",
            str(seconds),
            "-J",
            ns=self.client_ns,
        )
        total = json.loads(out)["end"]["sum"]
        return float(total["packets"] - total["lost_packets"]) / float(total["seconds"])


def _iptables(pair: Pair, rules: int, proto: str | None) -> None:
    """Replace the server namespace's INPUT chain: `rules` rules for `proto`, or none."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if proto:
        lines += [
            f"-A INPUT -s {bt.peer(i)}/32 -p {proto} --dport {bt.PORT} -j ACCEPT"
            for i in range(rules)
        ]
        lines.append(f"-A INPUT -p {proto} --dport {bt.PORT} -j DROP")
    lines.append("COMMIT\n")
    subprocess.run(
        ["ip", "netns", "exec", pair.server_ns, "iptables-restore"],
        input="\n".join(lines),
        text=True,
        check=True,
    )


def measure(
    rules: int, rounds: int, seconds: float, programs: loader.NodePrograms, pin_dir: Path
) -> dict[str, Any]:
    """Median TCP bit rate and 64-byte UDP packet rate per configuration, and the ratios."""
    pair = Pair(str(bt.peer(rules - 1)))
    links: list[attach.Attachment] = []
    netns: NetnsExecutor | None = None
    results: dict[str, dict[str, list[float]]] = {c: {"tcp": [], "udp": []} for c in CONFIGS}
    try:
        pair.up()
        netns = NetnsExecutor.named(pair.client_ns)
        ifindex = netns.run(socket.if_nametoindex, pair.veth)
        points = (
            (Hook.TO_POD, attach.AttachPoint.EGRESS),
            (Hook.FROM_POD, attach.AttachPoint.INGRESS),
        )

        def attach_all() -> None:
            assert netns is not None and programs.maps is not None
            # The server pod's veth is bound to its endpoint (id 1), as the agent binds it.
            maps.Bindings(programs.maps).bind(ifindex, 1)
            for hook, point in points:
                fd = programs.program(hook).fd
                pin = pin_dir / f"link-{point.name.lower()}"
                links.append(netns.run(attach.attach, ifindex, point, fd, pin, hook.program))

        def detach_all() -> None:
            assert netns is not None
            while links:
                netns.run(attach.detach, links.pop())

        setups: dict[str, tuple[Callable[[str], None], Callable[[], None]]] = {
            "none": (lambda _p: None, lambda: None),
            "stockade": (lambda _p: attach_all(), detach_all),
            "iptables": (lambda p: _iptables(pair, rules, p), lambda: _iptables(pair, 0, None)),
        }
        for _ in range(rounds):
            for config in CONFIGS:
                setup, teardown = setups[config]
                try:
                    setup("tcp")
                    results[config]["tcp"].append(pair.tcp_bps(seconds))
                    teardown()
                    setup("udp")
                    results[config]["udp"].append(pair.udp_pps(seconds))
                finally:
                    teardown()
    finally:
        if netns is not None:
            with suppress(Exception):
                while links:
                    netns.run(attach.detach, links.pop())
            netns.close()
        pair.down()
    med = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in results.items()}
    base = med["none"]
    return {
        f"tcp_ratio_{rules}_rules": med["stockade"]["tcp"] / base["tcp"],
        f"pps_ratio_{rules}_rules": med["stockade"]["udp"] / base["udp"],
        f"iptables_tcp_ratio_{rules}_rules": med["iptables"]["tcp"] / base["tcp"],
        f"iptables_pps_ratio_{rules}_rules": med["iptables"]["udp"] / base["udp"],
        "medians": {c: {"tcp_bps": m["tcp"], "udp_64b_pps": m["udp"]} for c, m in med.items()},
        "rounds": rounds,
        "seconds_per_run": seconds,
    }
