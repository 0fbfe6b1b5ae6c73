"""Datapath benchmark (DESIGN.md §7): per-packet cost, compile time and veth throughput.

    .venv/bin/python bench/datapath.py [--quick] [--output bench/results/datapath.json]

Per-packet figures come from BPF_PROG_TEST_RUN (the kernel's own average over `repeat` runs)
and are written as ns above an empty tc program measured in the same rounds, interleaved; each
figure is the median of the rounds. Rule tables come from the real lowering up to 100 rules
and from `datapath_tables.synthetic` above (checked against the lowering at 100 rules).
`services` holds what Shape.services costs (bench/datapath_services.py); `--only-services`
measures just that and updates it in an existing output. `--quick` is a smoke run (one round,
short runs, 100k peer entries) for tests; its numbers mean nothing. Needs root, clang, iperf3
and iptables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import datapath_services
import datapath_tables as bt
import datapath_veth

from stockade.compiler import abi, ir
from stockade.compiler.render import BPF_DIR, Hook, render_all
from stockade.compiler.shape import Shape
from stockade.datapath import libbpf, maps, packets
from stockade.datapath.clang import Compiler
from stockade.harness import loader

ROOT = Path(__file__).resolve().parents[1]
RULE_COUNTS = (10, 100, 1000, 10_000)
EMPTY_C = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tc") int empty(struct __sk_buff *skb) { (void)skb; return -1; }
char _license[] SEC("license") = "GPL";
"""
# An LRU hash keyed like the conntrack map (bpf/maps.h, struct ct_key: 40 bytes), with values of
# VALUE_SIZE bytes.
LRU_TABLE_C = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct key { __u32 saddr[4]; __u32 daddr[4]; __u16 sport; __u16 dport; __u8 proto; __u8 dir;
             __u16 pad; };
struct val { __u8 bytes[VALUE_SIZE]; };
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 1 << 17);
    __type(key, struct key);
    __type(value, struct val);
} table SEC(".maps");
"""
# One lookup of a present key in that table (32-byte values), the key built on the stack: the
# floor of any tracked packet.
HASH_LOOKUP_C = (
    LRU_TABLE_C.replace("VALUE_SIZE", "32")
    + """
SEC("tc") int hash_lookup(struct __sk_buff *skb)
{
    struct key k = {};
    struct val v = {}, *hit;

    k.saddr[3] = skb->len;
    k.proto = 6;
    hit = bpf_map_lookup_elem(&table, &k);
    if (!hit)
        bpf_map_update_elem(&table, &k, &v, BPF_ANY);
    return hit ? -1 : 0;
}
char _license[] SEC("license") = "GPL";
"""
)
# One read of the clock conntrack keeps its times in (bpf/conntrack.h, ct_now: jiffies scaled
# by the tick the config holds, here the packet's length), and one of the coarse clock, which
# the programs read before (and still do when the agent could not measure the tick).
CLOCK_C = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tc") int clock_read(struct __sk_buff *skb)
{
    return bpf_jiffies64() * skb->len - skb->mark ? -1 : 0;
}
char _license[] SEC("license") = "GPL";
"""
COARSE_CLOCK_C = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tc") int coarse_clock_read(struct __sk_buff *skb)
{
    (void)skb;
    return bpf_ktime_get_coarse_ns() ? -1 : 0;
}
char _license[] SEC("license") = "GPL";
"""
# The floor of a new flow's first packet: one lookup that misses and one insertion in that
# table (values the size of a conntrack entry's, filled in by `insert_floor`); the key is the
# packet's addresses and ports (an IPv4 frame without options).
INSERT_FLOOR_C = (
    LRU_TABLE_C
    + """
SEC("tc") int insert_floor(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct key k = {};
    struct val v = {};

    if (data + 38 > end)
        return 0;
    k.saddr[3] = *(__u32 *)(data + 26);
    k.daddr[3] = *(__u32 *)(data + 30);
    k.sport = *(__u16 *)(data + 34);
    k.dport = *(__u16 *)(data + 36);
    k.proto = 6;
    if (bpf_map_lookup_elem(&table, &k))
        return 0;
    return bpf_map_update_elem(&table, &k, &v, BPF_NOEXIST) ? 0 : -1;
}
char _license[] SEC("license") = "GPL";
"""
)
# The parse alone (bpf/parse.h, with the shape's defines): what an established packet pays
# before its conntrack lookup. The barrier keeps every field the parse writes.
PARSE_C = """DEFINES
#include "parse.h"
SEC("tc") int parse_only(struct __sk_buff *skb)
{
    struct flow f = {};
    enum parse_result r = parse_packet(skb, &f);

    asm volatile("" : : "r"(&f) : "memory");
    return r == PARSE_IP ? -1 : 0;
}
char _license[] SEC("license") = "GPL";
"""
NEW_FLOWS = 1000  # first packets per round for new_flow_ns, each a new source port


class Bench:
    def __init__(self, quick: bool, stack: ExitStack, cache: Path) -> None:
        self.quick = quick
        self.stack = stack
        self.compiler = Compiler(cache)
        self.rounds = 1 if quick else 9
        self.repeat = 20_000 if quick else 200_000
        self.runs: dict[str, tuple[int, bytes]] = {}

    def pin_root(self) -> Path:
        root = Path("/sys/fs/bpf") / f"stockade-bench-{uuid.uuid4().hex[:12]}"
        root.mkdir()
        self.stack.callback(shutil.rmtree, root, True)
        return root

    def programs(self, shape: Shape, tables: Any) -> loader.NodePrograms:
        progs = loader.NodePrograms(shape, self.pin_root(), self.compiler)
        self.stack.callback(progs.close)
        progs.writer.write(tables)
        return progs

    def add(self, name: str, progs: loader.NodePrograms, packet: ir.Packet) -> None:
        self.runs[name] = (progs.program(Hook.TO_POD).fd, packets.packet_frame(packet))

    def run(self) -> dict[str, float]:
        """Median ns per name, interleaved rounds."""
        samples: dict[str, list[int]] = {name: [] for name in self.runs}
        for _ in range(self.rounds):
            for name, (fd, frame) in self.runs.items():
                samples[name].append(libbpf.prog_test_run(fd, frame, self.repeat).duration_ns)
        return {name: statistics.median(s) for name, s in samples.items()}


def _load(bench: Bench, name: str, source: str) -> int:
    obj = bench.compiler.compile({f"{name}.c": source}, f"{name}.c")
    loaded = libbpf.BpfObject(obj.read(), name).load()
    bench.stack.callback(loaded.close)
    return loaded.program(name).fd


def empty_program(bench: Bench) -> None:
    frame = packets.packet_frame(bt.packets(10)["match_first"])
    bench.runs["empty"] = (_load(bench, "empty", EMPTY_C), frame)
    bench.runs["hash_lookup"] = (_load(bench, "hash_lookup", HASH_LOOKUP_C), frame)
    bench.runs["clock_read"] = (_load(bench, "clock_read", CLOCK_C), frame)
    bench.runs["coarse_clock_read"] = (_load(bench, "coarse_clock_read", COARSE_CLOCK_C), frame)


def parse_program(bench: Bench, shape: Shape) -> int:
    """PARSE_C compiled with `shape`'s defines."""
    defines = "\n".join(f"#define {name} {value}" for name, value in shape.defines())
    files = {
        "parse_only.c": PARSE_C.replace("DEFINES", defines),
        "parse.h": (BPF_DIR / "parse.h").read_text(),
    }
    loaded = libbpf.BpfObject(bench.compiler.compile(files, "parse_only.c").read(), "parse").load()
    bench.stack.callback(loaded.close)
    return loaded.program("parse_only").fd


def first_packets(bench: Bench, fd: int, packet: ir.Packet, flush: Any = None) -> float:
    """The median cost of a flow's first packet through program `fd` (ns above the empty
    program): each run is one packet (repeat 1) of a flow not seen before, a new source port;
    the empty program runs the same way, interleaved, and the difference of the medians is the
    figure. `flush`, when given, runs before each round."""
    empty_fd, _ = bench.runs["empty"]
    count = 50 if bench.quick else NEW_FLOWS
    firsts: list[float] = []
    empties: list[float] = []
    for r in range(bench.rounds):
        if flush is not None:
            flush()
        for i in range(count):
            frame = packets.packet_frame(packet, sport=10_000 + r * count + i)
            empties.append(libbpf.prog_test_run(empty_fd, frame, 1).duration_ns)
            result = libbpf.prog_test_run(fd, frame, 1)
            if result.retval != -1:
                raise AssertionError(f"the new flow was not allowed: {result.retval}")
            firsts.append(result.duration_ns)
    return statistics.median(firsts) - statistics.median(empties)


def new_flows(bench: Bench, progs: loader.NodePrograms, packet: ir.Packet) -> float:
    """A new flow's first packet, conntrack on: it pays the misses, the decision and the
    entry's creation. The table is flushed between rounds, so the endpoint's budget never
    binds."""
    assert progs.maps is not None
    pinned = progs.maps
    flush = (lambda: maps.flush_conntrack(pinned)) if progs.shape.conntrack else None
    return first_packets(bench, progs.program(Hook.TO_POD).fd, packet, flush)


def insert_floor(bench: Bench, packet: ir.Packet) -> float:
    """A first packet through INSERT_FLOOR_C, measured as `first_packets` measures one."""
    source = INSERT_FLOOR_C.replace("VALUE_SIZE", str(abi.CT_ENTRY.size))
    return first_packets(bench, _load(bench, "insert_floor", source), packet)


def per_packet(bench: Bench, peer_entries: int) -> dict[str, Any]:
    bt.check_synthetic()
    empty_program(bench)
    no_ct = Shape(conntrack=False)
    for n in RULE_COUNTS:
        progs = bench.programs(no_ct, bt.tables(n))
        for kind, packet in bt.packets(n).items():
            bench.add(f"{n}/{kind}", progs, packet)
    ct = bench.programs(Shape(), bt.tables(1000))
    established = bt.packets(1000)["match_last"]
    ct.run(Hook.TO_POD, packets.packet_frame(established))  # the first packet: a new flow
    bench.add("conntrack_hit", ct, established)
    bench.runs["parse"] = (parse_program(bench, Shape()), packets.packet_frame(established))
    # the same, its conntrack reading the coarse clock (no tick in the config: bpf/conntrack.h)
    coarse = bench.programs(Shape(), bt.tables(1000))
    assert coarse.maps is not None
    maps.write_clock(coarse.maps, None)
    coarse.run(Hook.TO_POD, packets.packet_frame(established))
    bench.add("conntrack_hit_coarse_clock", coarse, established)
    # A reply: the pod (the server) opened a flow to a peer (its EGRESS, no egress policy);
    # the peer's answer arrives on the pod's INGRESS hook.
    opened = ir.Packet(bt.SERVER, bt.peer(7), ir.PROTO_TCP, 443)
    ct.run(Hook.FROM_POD, packets.packet_frame(opened, sport=bt.PORT))
    answer = ir.Packet(bt.peer(7), bt.SERVER, ir.PROTO_TCP, bt.PORT)
    bench.runs["conntrack_reply"] = (
        ct.program(Hook.TO_POD).fd,
        packets.packet_frame(answer, sport=443, tcp_flags=packets.TCP_SYN | packets.TCP_ACK),
    )
    big_ct = bench.programs(Shape(), bt.tables(10_000))
    big = bench.programs(no_ct, bt.with_peer_entries(bt.tables(10), peer_entries))
    bench.add(
        "peer_entries",
        big,
        ir.Packet(bt.peer_set_member(peer_entries), bt.SERVER, ir.PROTO_TCP, bt.PORT),
    )
    med = bench.run()
    empty = med.pop("empty")
    above = {name: round(value - empty, 1) for name, value in med.items()}
    first = bt.packets(10_000)["match_last"]
    new_flow = round(new_flows(bench, big_ct, first), 1)
    no_ct_first = bench.programs(no_ct, bt.tables(10_000))
    new_flow_no_ct = round(new_flows(bench, no_ct_first, first), 1)
    floor = round(insert_floor(bench, first), 1)
    return {
        "empty_ns": empty,
        "hash_lookup_ns": above["hash_lookup"],
        "established_ns": above["conntrack_hit"],
        "established_reply_ns": above["conntrack_reply"],
        "established_coarse_clock_ns": above["conntrack_hit_coarse_clock"],
        # what established_ns pays beside its lookup: the parse of the same packet alone
        "established_parse_ns": above["parse"],
        "new_flow_ns": new_flow,
        # what bounds the two above: the same first packet with conntrack off (the decision
        # alone), one lookup and one insertion alone (measured as new_flow_ns is), and one
        # read of the clock (measured as established_ns is)
        "new_flow_no_conntrack_ns": new_flow_no_ct,
        "new_flow_insert_floor_ns": floor,
        "clock_read_ns": above["clock_read"],
        "coarse_clock_read_ns": above["coarse_clock_read"],
        "rules": {
            str(n): {
                "match_first_ns": above[f"{n}/match_first"],
                "match_last_ns": above[f"{n}/match_last"],
                "no_match_ns": above[f"{n}/no_match"],
            }
            for n in RULE_COUNTS
        },
        "conntrack_hit_ns": above["conntrack_hit"],
        "peer_entries_1m_ns": above["peer_entries"],
        "peer_entries": peer_entries,
        "ratio_10k_to_10": round(above["10000/match_first"] / above["10/match_first"], 3),
    }


def compile_ms(bench: Bench) -> dict[str, float]:
    cold: list[float] = []
    cached: list[float] = []
    for _ in range(1 if bench.quick else 5):
        with tempfile.TemporaryDirectory(prefix="stockade-bench-cc-") as tmp:
            compiler = Compiler(Path(tmp))
            for sink, want_hit in ((cold, False), (cached, True)):
                start = time.perf_counter()
                hits = [
                    compiler.compile(p.files, p.filename).cache_hit for p in render_all(Shape())
                ]
                sink.append((time.perf_counter() - start) * 1000)
                if hits != [want_hit, want_hit]:
                    raise AssertionError(f"expected cache hits {want_hit}, got {hits}")
    return {
        "cold": round(statistics.median(cold), 2),
        "cached": round(statistics.median(cached), 3),
    }


def veth(bench: Bench) -> dict[str, Any]:
    progs = bench.programs(Shape(), bt.tables(1000))
    rounds, seconds = (1, 1.0) if bench.quick else (15, 2.0)
    return datapath_veth.measure(1000, rounds, seconds, progs, progs.pin_root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: numbers mean nothing")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/datapath.json")
    parser.add_argument(
        "--only-services",
        action="store_true",
        help="measure the Service figures only and update them in an existing --output",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that cleanup runs
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="stockade-bench-") as cache:
        bench = Bench(args.quick, stack, Path(cache))
        if args.only_services:
            result: dict[str, Any] = json.loads(args.output.read_text())
            result["services"] = datapath_services.measure(bench)
            args.output.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
            print(json.dumps(result["services"], indent=2, sort_keys=True))
            return 0
        result = per_packet(bench, 100_000 if args.quick else 1_000_000)
        result["services"] = datapath_services.measure(bench)
        result["compile_ms"] = compile_ms(bench)
        result["veth"] = veth(bench)
    result["meta"] = {
        "quick": args.quick,
        "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip(),
        "clang": Compiler().version.splitlines()[0],
        "rounds": bench.rounds,
        "repeat": bench.repeat,
        "units": "ns figures are above empty_ns (an empty tc program), medians of the rounds",
        "tables": f"lowered up to {bt.LOWERED_MAX} rules, synthetic (checked) above",
        "seconds": round(time.monotonic() - started, 1),
        # the 1-minute load average at the start and the end: this machine is shared
        "loadavg": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
