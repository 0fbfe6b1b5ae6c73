"""Throughput through a veth pair for bench/datapath.py: no filter, stockade, iptables.

Two network namespaces (a unique `stkb<pid>` prefix) joined by a veth pair: the server (the pod,
10.0.0.1, iperf3 -s) in `<prefix>a`, the client (10.128.3.231 for 1,000 rules: the last rule's
peer) in `<prefix>b`. The client's end plays the pod's host-side veth: stockade's programs attach
there through `stockade.datapath.attach` (tc egress judges what reaches the pod). iptables rules
go into the server namespace's INPUT chain, one per rule (`-s <peer>/32 -p <proto> --dport 5201
-j ACCEPT`, the client's last) then a DROP for the port: no conntrack shortcut, as a policy
engine that writes one rule per peer. The three configurations run interleaved in each round;
everything created is removed at the end, also on failure.

Packet rate: 64-byte frames (Ethernet, IPv4, UDP to port 5201, no FCS) sent by trafgen
(netsniff-ng, Debian) from the client's end through the qdisc path (`--qdisc-path`, so tc egress
runs), one sender CPU, counted at the server's end (`rx_packets`). trafgen writes frames from
an mmap'd ring without a socket call per packet, where iperf3's UDP sender makes one sendmsg
per datagram and is bound by that before the filter shows; without trafgen, iperf3 (`-u -l
64`) is the generator and `pps_generator` says so.

Every ratio is also given per round (the two configurations measured back to back in the same
round), as median, quartiles and extremes: the spread to compare the effect with.

`attached`: with `kernel.bpf_stats_enabled=1` during the stockade runs, the programs' own
run_time_ns / run_cnt on the veth (the kernel's per-program statistics), per hook, under the
TCP load and under the 64-byte load: the attached cost beside the test-run figures; and
`pps_ratio_<rules>_rules_ceiling`, the 64-byte rate ratio that attached cost allows a sender
that spends one CPU on the frames.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
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
FRAME_BYTES = 64
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def trafgen() -> str | None:
    return shutil.which("trafgen")


def _frame_config(src: str, dst: str) -> str:
    """A trafgen packet configuration: one 64-byte UDP frame (the same every time)."""
    import ipaddress

    from stockade.datapath import packets

    s, d = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    payload = b"x" * (FRAME_BYTES - 14 - 20 - 8)
    frame = packets.ip_frame(
        packets.ip(s, d, 17, packets.udp_datagram(s, d, 40000, bt.PORT, payload))
    )
    assert len(frame) == FRAME_BYTES
    return "{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"


def _prog_stats(prog_id: int) -> tuple[int, int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info = json.loads(out)
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def _spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": round(statistics.median(values), 4),
        "p25": round(q[0], 4),
        "p75": round(q[2], 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


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
        # the frames trafgen sends carry the packet builder's destination MAC
        _sh(
            "ip",
            "link",
            "set",
            f"{self.prefix}v0",
            "address",
            "02:00:00:00:00:02",
            ns=self.server_ns,
        )
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

    def _rx_packets(self) -> int:
        path = f"/sys/class/net/{self.prefix}v0/statistics/rx_packets"
        return int(_sh("cat", path, ns=self.server_ns))

    def frames_pps(self, seconds: float, config: Path) -> float:
        """64-byte frames a second that reach the server's end, trafgen sending on one CPU."""
        before = self._rx_packets()
        started = time.monotonic()
        gen = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.client_ns,
                "trafgen",
                "--dev",
                self.veth,
                "--conf",
                str(config),
                "--qdisc-path",
                "--cpus",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(seconds)
        finally:
            gen.send_signal(signal.SIGINT)
            try:
                gen.wait(5)
            except subprocess.TimeoutExpired:
                gen.kill()
                gen.wait()
        elapsed = time.monotonic() - started
        time.sleep(0.2)  # the last frames the receiving CPU still had queued
        return (self._rx_packets() - before) / elapsed


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
    use_trafgen = trafgen() is not None
    fd, name = tempfile.mkstemp(prefix="stockade-bench-", suffix=".trafgen")
    os.close(fd)
    config_file = Path(name)
    config_file.write_text(_frame_config(pair.client, str(bt.SERVER)))
    stats_before = BPF_STATS.read_text().strip() if BPF_STATS.exists() else None
    hooks = {h: programs.program(h).id for h in (Hook.TO_POD, Hook.FROM_POD)}
    attached: dict[str, dict[str, list[tuple[int, int]]]] = {
        load: {h.name.lower(): [] for h in hooks} for load in ("tcp", "udp")
    }

    def run_load(kind: str, stockade: bool) -> float:
        counts = {h: _prog_stats(i) for h, i in hooks.items()} if stockade else {}
        if kind == "tcp":
            value = pair.tcp_bps(seconds)
        elif use_trafgen:
            value = pair.frames_pps(seconds, config_file)
        else:
            value = pair.udp_pps(seconds)
        for h, (t0, n0) in counts.items():
            t1, n1 = _prog_stats(hooks[h])
            attached[kind][h.name.lower()].append((t1 - t0, n1 - n0))
        return value

    try:
        if stats_before is not None:
            BPF_STATS.write_text("1")
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
                    results[config]["tcp"].append(run_load("tcp", config == "stockade"))
                    teardown()
                    setup("udp")
                    results[config]["udp"].append(run_load("udp", config == "stockade"))
                finally:
                    teardown()
    finally:
        if stats_before is not None:
            BPF_STATS.write_text(stats_before)
        config_file.unlink(missing_ok=True)
        if netns is not None:
            with suppress(Exception):
                while links:
                    netns.run(attach.detach, links.pop())
            netns.close()
        pair.down()
    med = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in results.items()}
    base = med["none"]

    def per_round(config: str, kind: str) -> dict[str, float]:
        pairs = zip(results[config][kind], results["none"][kind], strict=True)
        return _spread([v / b for v, b in pairs])

    def run_ns(samples: list[tuple[int, int]]) -> float:
        time_ns, count = sum(t for t, _ in samples), sum(n for _, n in samples)
        return round(time_ns / count, 1) if count else 0.0

    attached_ns = {
        load: {hook: run_ns(s) for hook, s in by_hook.items()} for load, by_hook in attached.items()
    }
    udp_ns = attached_ns.get("udp", {}).get("to_pod", 0.0)
    return {
        # The packet rate the attached cost allows: the sender's CPU spends 1 / none's rate
        # on a frame without the program and `udp_ns` more with it (the program runs in the
        # sender's context on the veth), so the rate falls to 1 / (1 + udp_ns * none's rate).
        f"pps_ratio_{rules}_rules_ceiling": round(1.0 / (1.0 + udp_ns * 1e-9 * base["udp"]), 3),
        "spread": {
            f"tcp_ratio_{rules}_rules": per_round("stockade", "tcp"),
            f"pps_ratio_{rules}_rules": per_round("stockade", "udp"),
            f"iptables_tcp_ratio_{rules}_rules": per_round("iptables", "tcp"),
            f"iptables_pps_ratio_{rules}_rules": per_round("iptables", "udp"),
        },
        "pps_generator": (
            f"trafgen, {FRAME_BYTES}-byte frames" if use_trafgen else "iperf3 -u -l 64"
        ),
        "attached_run_ns": attached_ns,
        "attached_runs": {
            load: {hook: sum(n for _, n in s) for hook, s in by_hook.items()}
            for load, by_hook in attached.items()
        },
        f"tcp_ratio_{rules}_rules": med["stockade"]["tcp"] / base["tcp"],
        f"pps_ratio_{rules}_rules": med["stockade"]["udp"] / base["udp"],
        f"iptables_tcp_ratio_{rules}_rules": med["iptables"]["tcp"] / base["tcp"],
        f"iptables_pps_ratio_{rules}_rules": med["iptables"]["udp"] / base["udp"],
        "medians": {c: {"tcp_bps": m["tcp"], "udp_64b_pps": m["udp"]} for c, m in med.items()},
        "rounds": rounds,
        "seconds_per_run": seconds,
    }
