"""The datapath benchmark runs end to end (`bench/datapath.py --quick`) and writes every figure
DESIGN.md §7 asks for. Smoke only: the quick run's numbers are not judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES_DEFERRED = ("first_packet_veth_ns", "first_packet_netfilter_ns", "established_ns")
RULES = ("10", "100", "1000", "10000")
VETH = (
    "tcp_ratio_1000_rules",
    "pps_ratio_1000_rules",
    "iptables_tcp_ratio_1000_rules",
    "iptables_pps_ratio_1000_rules",
)


def test_the_quick_benchmark_writes_every_figure_and_each_is_positive(tmp_path: Path) -> None:
    out = tmp_path / "datapath.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "datapath.py"), "--quick", "--output", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    figures = json.loads(out.read_text())
    values = [
        figures["empty_ns"],
        figures["conntrack_hit_ns"],
        figures["hash_lookup_ns"],
        figures["established_ns"],
        figures["established_reply_ns"],
        figures["established_coarse_clock_ns"],
        figures["established_parse_ns"],
        figures["new_flow_ns"],
        figures["new_flow_no_conntrack_ns"],
        figures["new_flow_insert_floor_ns"],
        figures["peer_entries_1m_ns"],
        figures["compile_ms"]["cold"],
        figures["compile_ms"]["cached"],
        *(figures["rules"][n][k] for n in RULES for k in ("match_first_ns", "no_match_ns")),
        *(figures["veth"][k] for k in VETH),
        figures["veth"]["pps_ratio_1000_rules_ceiling"],
        *(figures["veth"]["spread"][k]["median"] for k in VETH),
        *(figures["veth"]["attached_run_ns"][load]["to_pod"] for load in ("tcp", "udp")),
        *(figures["services"]["deferred"][k] for k in SERVICES_DEFERRED),
        figures["services"]["not_to_service"]["established"]["ratio"],
        figures["services"]["not_to_service"]["new_flow"]["ratio"],
    ]
    assert all(isinstance(v, int | float) and v > 0 for v in values), values
    # a few ns above the empty program: a smoke run's noise may take it to 0 or below
    assert isinstance(figures["clock_read_ns"], int | float)
    assert isinstance(figures["coarse_clock_read_ns"], int | float)
    leftovers = subprocess.run(
        ["ip", "netns", "list"], check=False, capture_output=True, text=True
    ).stdout
    assert "stkb" not in leftovers
    assert not list(Path("/sys/fs/bpf").glob("stockade-bench-*"))
