"""Service flows in the datapath benchmark (bench/datapath.py): what Shape.services costs.

All figures are BPF_PROG_TEST_RUN medians in ns, each measured in the same interleaved rounds
as its baseline and reported as the difference and the ratio:
- `not_to_service`: a client's packet NOT to Service space on its veth (tc ingress), with
  services on against the same Shape with services off: `established_ns` (a conntrack hit) and
  `new_flow_ns` (a new flow judged by policy: denied, so every repetition is new; this is the
  one that pays the svc_space lookup);
- `deferred`: a flow to a Service: `first_packet_veth_ns` (the veth defers it),
  `first_packet_netfilter_ns` (the netfilter program judges the translated packet and records
  the flow; single runs, each after a fresh deferral, above an empty netfilter program run the
  same way), `established_ns` (its later packets on the veth);
- `netfilter_pass_ns`: the netfilter program on a forwarded packet that was not deferred (what
  every packet through the node's POST_ROUTING pays), above an empty netfilter program;
- `nat_pass_ns`: the program after SNAT (`stockade_service_nat`) on such a packet, above the
  empty program; a test run's packet has no kernel conntrack entry, so this is its exit on a
  packet the kernel does not track (one with an entry adds one read of the entry's status, and
  one whose source the kernel translated four reads and a lookup);
- `fallback`: Shape.service_fallback against the same Shape without it: `not_to_service`
  (`established`, `new_flow` as above; the new flow pays the `svc_space` lookup) and
  `to_service_first_packet_ns` (a first packet to a Service decided by its verdict: denied, so
  every repetition is new).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import statistics
from typing import Any, Protocol

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import libbpf, maps, packets
from stockade.datapath.clang import Compiler
from stockade.harness import loader, testrun

CLIENT = ipaddress.IPv4Address("10.0.0.1")
BACKEND = ipaddress.IPv4Address("10.1.0.5")
ELSEWHERE = ipaddress.IPv4Address("192.168.0.1")
VIP = ipaddress.IPv4Address("10.96.0.10")
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
PORT = 80
EMPTY_NF_C = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("netfilter") int empty_nf(void *ctx) { (void)ctx; return 1; }
char _license[] SEC("license") = "GPL";
"""
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(CLIENT, 1),),
    classes=(ir.ClassEntry(ipaddress.ip_network("10.1.0.0/16"), 2),),
    policy=(
        ir.PolicyEntry(1, Direction.EGRESS, 32, action=Action.DENY, rule_id=5),
        ir.PolicyEntry(1, Direction.EGRESS, 96, 2, ir.PROTO_TCP, PORT, Action.ALLOW, 6),
    ),
    services=(ir.ServiceEntry(SERVICE_CIDR),),
)
FALLBACK_TABLES = dataclasses.replace(
    TABLES,
    service_verdicts=(ir.ServiceVerdictEntry(1, VIP, ir.PROTO_TCP, PORT, Action.DENY, 6),),
)


class BenchLike(Protocol):
    quick: bool
    rounds: int
    repeat: int
    compiler: Compiler

    def programs(self, shape: Shape, tables: Any) -> loader.NodePrograms: ...


def _frame(dst: ipaddress.IPv4Address) -> bytes:
    return packets.packet_frame(ir.Packet(CLIENT, dst, ir.PROTO_TCP, PORT))


def _defer(progs: loader.NodePrograms) -> None:
    """The veth's deferral of the client's flow to the Service, as the netfilter program
    finds it."""
    assert progs.maps is not None
    progs.run(Hook.FROM_POD, _frame(VIP))


def measure(bench: BenchLike) -> dict[str, Any]:
    off = bench.programs(Shape(services=False), TABLES)
    on = bench.programs(Shape(services=True), TABLES)
    fb = bench.programs(Shape(service_fallback=True), FALLBACK_TABLES)
    assert on.maps is not None
    for progs in (off, on, fb):
        progs.run(Hook.FROM_POD, _frame(BACKEND))  # binds the sender, opens the flow
    veth: dict[str, tuple[int, bytes]] = {
        "off/established": (off.program(Hook.FROM_POD).fd, _frame(BACKEND)),
        "on/established": (on.program(Hook.FROM_POD).fd, _frame(BACKEND)),
        "off/new_flow": (off.program(Hook.FROM_POD).fd, _frame(ELSEWHERE)),
        "on/new_flow": (on.program(Hook.FROM_POD).fd, _frame(ELSEWHERE)),
        "on/deferred_veth": (on.program(Hook.FROM_POD).fd, _frame(VIP)),
        "fb/established": (fb.program(Hook.FROM_POD).fd, _frame(BACKEND)),
        "fb/new_flow": (fb.program(Hook.FROM_POD).fd, _frame(ELSEWHERE)),
        "fb/to_service": (fb.program(Hook.FROM_POD).fd, _frame(VIP)),
    }
    empty = libbpf.BpfObject(
        bench.compiler.compile({"empty_nf.c": EMPTY_NF_C}, "empty_nf.c").read(), "empty_nf"
    ).load()
    try:
        nf = on.program(Hook.SERVICE).fd
        nat = on.program(Hook.SERVICE_NAT).fd
        empty_fd = empty.program("empty_nf").fd
        translated = _frame(BACKEND)
        samples: dict[str, list[float]] = {
            k: []
            for k in [
                *veth,
                "nf/pass",
                "nf/nat",
                "nf/empty",
                "nf/first",
                "nf/empty1",
                "established",
            ]
        }
        singles = 200 if bench.quick else 2000
        for _ in range(bench.rounds):
            for name, (fd, frame) in veth.items():
                samples[name].append(libbpf.prog_test_run(fd, frame, bench.repeat).duration_ns)
            samples["nf/pass"].append(
                testrun.run_netfilter(nf, _frame(ELSEWHERE), repeat=bench.repeat).duration_ns
            )
            samples["nf/nat"].append(
                testrun.run_netfilter(nat, _frame(ELSEWHERE), repeat=bench.repeat).duration_ns
            )
            samples["nf/empty"].append(
                testrun.run_netfilter(empty_fd, translated, repeat=bench.repeat).duration_ns
            )
            first, empty1 = [], []
            for _ in range(singles):
                maps.flush_conntrack(on.maps)
                _defer(on)
                run = testrun.run_netfilter(nf, translated)
                if run.verdict is not testrun.TcVerdict.ALLOW:
                    raise AssertionError("the allowed backend was denied")
                first.append(run.duration_ns)
                empty1.append(testrun.run_netfilter(empty_fd, translated).duration_ns)
            samples["nf/first"].append(statistics.median(first))
            samples["nf/empty1"].append(statistics.median(empty1))
            # the deferred flow's later packets, on the veth: conntrack hits
            samples["established"].append(
                libbpf.prog_test_run(
                    on.program(Hook.FROM_POD).fd, _frame(VIP), bench.repeat
                ).duration_ns
            )
    finally:
        empty.close()
    med = {k: float(statistics.median(v)) for k, v in samples.items()}

    def pair(name: str) -> dict[str, float]:
        base, with_services = med[f"off/{name}"], med[f"on/{name}"]
        return {
            "services_off_ns": base,
            "services_on_ns": with_services,
            "difference_ns": round(with_services - base, 1),
            "ratio": round(with_services / base, 3),
        }

    def fallback(name: str) -> dict[str, float]:
        base, with_fallback = med[f"off/{name}"], med[f"fb/{name}"]
        return {
            "fallback_off_ns": base,
            "fallback_on_ns": with_fallback,
            "difference_ns": round(with_fallback - base, 1),
            "ratio": round(with_fallback / base, 3),
        }

    return {
        "not_to_service": {"established": pair("established"), "new_flow": pair("new_flow")},
        "fallback": {
            "not_to_service": {
                "established": fallback("established"),
                "new_flow": fallback("new_flow"),
            },
            "to_service_first_packet_ns": med["fb/to_service"],
        },
        "deferred": {
            "first_packet_veth_ns": med["on/deferred_veth"],
            "first_packet_netfilter_ns": round(med["nf/first"] - med["nf/empty1"], 1),
            "established_ns": med["established"],
        },
        "netfilter_pass_ns": round(med["nf/pass"] - med["nf/empty"], 1),
        "nat_pass_ns": round(med["nf/nat"] - med["nf/empty"], 1),
        "netfilter_empty_ns": med["nf/empty"],
        "units": "veth figures are whole program runs (ns, medians); netfilter figures are "
        "above an empty netfilter program run the same way",
    }
