"""Scale: the verifier accepts the programs of every Shape, and the maps hold 10,000 policy
entries per endpoint and direction and 1,000,000 peer-class entries, with verdicts still right.

The verifier's processed-instruction counts are written to bench/results/verifier.json so that a
regression in program size shows in review.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import struct
from pathlib import Path

import pytest

from bench.datapath_tables import RawEntry, RawTables
from stockade.compiler import abi, ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.render import render_all
from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.datapath import maps
from stockade.datapath.clang import Compiler
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import compiler, datapath, load_object, private_pin_root

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "verifier.json"
SHAPES = {
    "default": Shape(),
    "ipv4-only": Shape(ipv6=False),
    "no-conntrack": Shape(conntrack=False),
    "no-events": Shape(drop_events=False, audit_events=False),
    "vlan": Shape(vlan=True),
    "ipv6-ext-8": Shape(ipv6_ext_headers=8),
    "fragments-drop": Shape(fragments=FragmentPolicy.DROP),
    "fragments-pass": Shape(fragments=FragmentPolicy.PASS),
    "everything": Shape(vlan=True, ipv6_ext_headers=8),
}
RULES_PER_DIRECTION = 10_000
CLASS_ENTRIES = 1_000_000


def test_the_verifier_accepts_every_shape_and_the_counts_are_recorded() -> None:
    results: dict[str, dict[str, int]] = {}
    for name, shape in SHAPES.items():
        root = private_pin_root()
        try:
            for program in render_all(shape):
                with load_object(program, root) as obj:
                    loaded = obj.program(program.program)
                    assert loaded.processed_insns > 0
                    results.setdefault(name, {})[program.program] = loaded.processed_insns
        finally:
            shutil.rmtree(root)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "measure": "verifier processed instructions per program (BPF_LOG_STATS)",
        "clang": Compiler().version.splitlines()[0],
        "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip(),
        "limit": 1_000_000,
        "shapes": results,
    }
    RESULTS.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    assert all(n < 1_000_000 for progs in results.values() for n in progs.values())


BASE = int(ipaddress.IPv4Address("10.128.0.0"))
POD = [pk.addr("10.0.0.1"), pk.addr("10.0.0.2")]


def _class_of(i: int) -> int:
    return i % 5000 + 1


def _scale_tables() -> RawTables:
    mapped = b"\0" * 10 + b"\xff\xff"
    classes = tuple(
        RawEntry(
            abi.CLASS_KEY.pack(abi.CLASS_KEY_BITS, mapped + struct.pack("!I", BASE + i)),
            abi.CLASS_VALUE.pack(_class_of(i), 0),
        )
        for i in range(CLASS_ENTRIES)
    )
    policy = []
    for ep in (1, 2):
        for direction in Direction:
            for r in range(RULES_PER_DIRECTION):  # class r%5000+1, TCP port 1000 + r//5000
                cls, port = r % 5000 + 1, 1000 + r // 5000
                entry = ir.PolicyEntry(
                    ep, direction, 96, cls, ir.PROTO_TCP, port, Action.ALLOW, rule_id=r + 1
                )
                policy.append(RawEntry(entry.key(), entry.value()))
            isolation = ir.PolicyEntry(ep, direction, 32, action=Action.DENY, rule_id=60000)
            policy.append(RawEntry(isolation.key(), isolation.value()))
    endpoints = tuple(
        RawEntry(ir.EndpointEntry(a, i + 1).key(), ir.EndpointEntry(a, i + 1).value())
        for i, a in enumerate(POD)
    )
    return RawTables(endpoints, classes, tuple(policy))


@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.name.lower())
def test_ten_thousand_rules_per_direction_and_a_million_peer_entries_still_decide_right(
    direction: Direction,
) -> None:
    with datapath() as dp:
        tables = _scale_tables()
        stats = dp.write(tables)  # type: ignore[arg-type]
        assert stats.added == CLASS_ENTRIES + 2 * 2 * (RULES_PER_DIRECTION + 1) + 2
        for i in (0, 4999, 5000, 123_457, CLASS_ENTRIES - 1):
            remote = ipaddress.IPv4Address(BASE + i)
            cls = _class_of(i)
            allowed_port = 1000 + (1 if cls - 1 < RULES_PER_DIRECTION - 5000 else 0)
            for port, want in ((allowed_port, TcVerdict.ALLOW), (999, TcVerdict.DENY)):
                src, dst = (remote, POD[0]) if direction is Direction.INGRESS else (POD[0], remote)
                maps.flush_conntrack(dp.maps)  # type: ignore[arg-type]
                frame = pk.packet_frame(ir.Packet(src, dst, ir.PROTO_TCP, port))
                assert dp.run(frame, direction) is want, (i, port)
        assert compiler().compile(*_first_program_files()).cache_hit


def _first_program_files() -> tuple[dict[str, str], str]:
    program = render_all(Shape())[0]
    return program.files, program.filename
