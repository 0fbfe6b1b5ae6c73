"""Conntrack in the compiled programs: replies and related ICMP of allowed flows pass, a new
connection in the reverse direction is still judged, entries expire (short timeouts from the
config map), and policy changes either re-judge established flows or keep them, as configured.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.agent import migrate
from stockade.agent.conntrack import ConntrackRecount
from stockade.compiler import abi, ir
from stockade.compiler.abi import ConntrackMode
from stockade.compiler.ir import Action, Direction
from stockade.compiler.shape import Shape
from stockade.datapath import events, libbpf, maps
from stockade.datapath.maps import DatapathConfig
from stockade.harness.loader import conntrack_clock
from stockade.harness.testrun import TcVerdict
from tests.bpf import packets as pk
from tests.bpf.datapath_harness import Datapath, datapath

A4, A6, B4 = pk.addr("10.0.0.1"), pk.addr("fd00::1"), pk.addr("10.0.0.2")
CLIENT4, CLIENT6 = pk.addr("10.0.1.7"), pk.addr("2001:db8::7")
OTHER4, OTHER6 = pk.addr("10.0.1.8"), pk.addr("2001:db8::8")  # clients too, but not the peer
IN, OUT = Direction.INGRESS, Direction.EGRESS
ALLOW, DENY = TcVerdict.ALLOW, TcVerdict.DENY
TCP, UDP = ir.PROTO_TCP, ir.PROTO_UDP
MS = 1_000_000


def _tables(deny_egress_to_clients: bool = False) -> ir.NodeTables:
    policy = [
        ir.PolicyEntry(1, IN, 32, action=Action.DENY, rule_id=100),  # A isolated for ingress
        ir.PolicyEntry(2, IN, 32, action=Action.DENY, rule_id=300),  # B isolated for ingress
    ]
    if deny_egress_to_clients:
        policy.append(ir.PolicyEntry(1, OUT, 64, 5, action=Action.DENY, rule_id=200))
    return ir.NodeTables(
        endpoints=(
            ir.EndpointEntry(A4, 1),
            ir.EndpointEntry(A6, 1),
            ir.EndpointEntry(B4, 2),
        ),
        classes=(
            ir.ClassEntry(ipaddress.ip_network("10.0.1.0/24"), 5),
            ir.ClassEntry(ipaddress.ip_network("2001:db8::/32"), 5),
            ir.ClassEntry(ipaddress.ip_network(f"{B4}/32"), 2),
        ),
        policy=tuple(policy),
    )


@pytest.fixture(scope="module")
def module_dp() -> Iterator[Datapath]:
    with datapath() as d:
        yield d


@pytest.fixture
def dp(module_dp: Datapath) -> Datapath:
    assert module_dp.maps is not None
    module_dp.write(_tables())
    maps.write_config(module_dp.maps, DatapathConfig())
    maps.write_clock(module_dp.maps, conntrack_clock())
    maps.flush_conntrack(module_dp.maps)
    module_dp.events()
    return module_dp


def tcp(src: ir.IPAddress, dst: ir.IPAddress, sport: int, dport: int, flags: int) -> bytes:
    return pk.ip_frame(pk.ip(src, dst, TCP, pk.tcp_segment(src, dst, sport, dport, flags)))


def udp(src: ir.IPAddress, dst: ir.IPAddress, sport: int, dport: int) -> bytes:
    return pk.ip_frame(pk.ip(src, dst, UDP, pk.udp_datagram(src, dst, sport, dport, b"x")))


SYN, SYNACK, ACK, FIN = pk.TCP_SYN, pk.TCP_SYN | pk.TCP_ACK, pk.TCP_ACK, pk.TCP_FIN | pk.TCP_ACK


@pytest.mark.parametrize(("local", "remote"), [(A4, CLIENT4), (A6, CLIENT6)], ids=["ipv4", "ipv6"])
def test_replies_of_an_allowed_connection_pass_an_isolated_pod(
    dp: Datapath, local: ir.IPAddress, remote: ir.IPAddress
) -> None:
    reply = tcp(remote, local, 443, 40001, SYNACK)
    assert dp.run(reply, IN) is DENY  # nothing recorded yet: judged, and A is isolated
    assert dp.run(tcp(local, remote, 40001, 443, SYN), OUT) is ALLOW
    assert dp.run(reply, IN) is ALLOW
    assert dp.run(tcp(local, remote, 40001, 443, ACK), OUT) is ALLOW
    assert dp.run(tcp(remote, local, 443, 40002, SYNACK), IN) is DENY  # another port: no reply


def test_a_new_connection_in_the_reverse_direction_is_still_judged(dp: Datapath) -> None:
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, SYN), OUT) is ALLOW
    assert dp.run(tcp(CLIENT4, A4, 40001, 443, SYN), IN) is DENY  # same ports, other way round


def test_the_destination_still_judges_a_flow_the_source_allowed(dp: Datapath) -> None:
    assert dp.run(tcp(A4, B4, 40001, 80, SYN), OUT) is ALLOW  # A's egress: no policy
    assert dp.run(tcp(A4, B4, 40001, 80, SYN), IN) is DENY  # B's ingress: isolated
    entries = maps.conntrack_entries(dp.maps)  # type: ignore[arg-type]
    assert [(e.direction, e.sport, e.dport) for e in entries] == [(OUT, 40001, 80)]


@pytest.mark.parametrize(("local", "remote"), [(A4, CLIENT4), (A6, CLIENT6)], ids=["ipv4", "ipv6"])
def test_echo_replies_match_their_request_by_identifier(
    dp: Datapath, local: ir.IPAddress, remote: ir.IPAddress
) -> None:
    proto = ir.PROTO_ICMP if local.version == 4 else ir.PROTO_ICMPV6
    request = pk.ip_frame(pk.ip(local, remote, proto, pk.echo(local, remote, 77)))
    assert dp.run(request, OUT) is ALLOW
    reply = pk.ip_frame(pk.ip(remote, local, proto, pk.echo(remote, local, 77, reply=True)))
    assert dp.run(reply, IN) is ALLOW
    other = pk.ip_frame(pk.ip(remote, local, proto, pk.echo(remote, local, 78, reply=True)))
    assert dp.run(other, IN) is DENY


@pytest.mark.parametrize(("local", "remote"), [(A4, CLIENT4), (A6, CLIENT6)], ids=["ipv4", "ipv6"])
def test_icmp_errors_about_an_allowed_flow_are_related(
    dp: Datapath, local: ir.IPAddress, remote: ir.IPAddress
) -> None:
    sent = pk.ip(local, remote, UDP, pk.udp_datagram(local, remote, 5353, 53, b"q"))
    unreachable = (3, 3) if local.version == 4 else (1, 4)
    error = pk.ip_frame(pk.icmp_error(remote, local, *unreachable, sent))
    assert dp.run(error, IN) is DENY  # no flow yet
    assert dp.run(pk.ip_frame(sent), OUT) is ALLOW
    assert dp.run(error, IN) is ALLOW
    unrelated = pk.ip(local, remote, UDP, pk.udp_datagram(local, remote, 5354, 53, b"q"))
    assert dp.run(pk.ip_frame(pk.icmp_error(remote, local, *unreachable, unrelated)), IN) is DENY


def _unreachable(local: ir.IPAddress) -> tuple[int, int]:
    return (3, 3) if local.version == 4 else (1, 4)


@pytest.mark.parametrize(
    ("local", "remote", "other"),
    [(A4, CLIENT4, OTHER4), (A6, CLIENT6, OTHER6)],
    ids=["ipv4", "ipv6"],
)
def test_an_icmp_error_about_an_allowed_flow_is_related_only_from_the_flows_peer(
    dp: Datapath, local: ir.IPAddress, remote: ir.IPAddress, other: ir.IPAddress
) -> None:
    sent = pk.ip(local, remote, TCP, pk.tcp_segment(local, remote, 40001, 443, SYN))
    assert dp.run(pk.ip_frame(sent), OUT) is ALLOW
    forged = pk.ip_frame(pk.icmp_error(other, local, *_unreachable(local), sent))
    assert dp.run(forged, IN) is DENY  # judged as new ICMP: A is isolated
    genuine = pk.ip_frame(pk.icmp_error(remote, local, *_unreachable(local), sent))
    assert dp.run(genuine, IN) is ALLOW


def test_an_icmp_error_quoting_another_pods_flow_is_not_related(dp: Datapath) -> None:
    sent = pk.ip(A4, CLIENT4, TCP, pk.tcp_segment(A4, CLIENT4, 40001, 443, SYN))
    assert dp.run(pk.ip_frame(sent), OUT) is ALLOW
    misdirected = pk.ip_frame(pk.icmp_error(CLIENT4, B4, 3, 3, sent))
    assert dp.run(misdirected, IN) is DENY  # to B, isolated, about A's flow


def test_an_icmp_redirect_toward_a_pod_is_never_related(dp: Datapath) -> None:
    sent = pk.ip(A4, CLIENT4, TCP, pk.tcp_segment(A4, CLIENT4, 40001, 443, SYN))
    assert dp.run(pk.ip_frame(sent), OUT) is ALLOW
    redirect = pk.ip_frame(pk.icmp_error(CLIENT4, A4, 5, 1, sent))
    assert dp.run(redirect, IN) is DENY  # judged as new ICMP: A is isolated


@pytest.mark.parametrize(
    ("local", "remote", "redirect"),
    [(A4, CLIENT4, 5), (A6, CLIENT6, 137)],
    ids=["icmp redirect", "icmpv6 redirect"],
)
def test_a_pod_sending_a_redirect_is_dropped_with_its_reason(
    dp: Datapath, local: ir.IPAddress, remote: ir.IPAddress, redirect: int
) -> None:
    sent = pk.ip(remote, local, TCP, pk.tcp_segment(remote, local, 443, 40001, SYNACK))
    assert dp.run(tcp(local, remote, 40001, 443, SYN), OUT) is ALLOW
    dp.events()
    frame = pk.ip_frame(pk.icmp_error(local, remote, redirect, 1, sent))
    assert dp.run(frame, OUT) is DENY  # A's egress has no policy: only the reason drops it
    (event,) = dp.events()
    assert (event.kind, event.reason) == (events.EventKind.DROP, events.DropReason["NOT_A_ROUTER"])


CLOCKS = pytest.mark.parametrize("jiffies", [True, False], ids=["jiffies", "coarse clock"])


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@CLOCKS
def test_entries_hold_monotonic_times_whichever_clock_the_programs_read(
    dp: Datapath, jiffies: bool
) -> None:
    # The agent's recount deletes what expired by CLOCK_MONOTONIC; the programs' expiry times
    # must be that clock, read from jiffies (the agent's default) or from the coarse clock.
    assert dp.maps is not None
    tick = conntrack_clock()
    maps.write_clock(dp.maps, tick if jiffies else None)
    maps.write_config(dp.maps, DatapathConfig(udp_timeout_ns=60_000 * MS))
    before = _monotonic_ns()
    assert dp.run(udp(A4, CLIENT4, 5000, 53), OUT) is ALLOW
    after = _monotonic_ns()
    (entry,) = maps.conntrack_entries(dp.maps)
    made = entry.expires_ns - 60_000 * MS
    # The coarse clock lags the precise one by up to a tick; jiffies follow the coarse clock
    # within a tick either way (tests/bpf/test_datapath_clock.py), and a microsecond of drift.
    slack = tick.tick_ns + 1_000
    assert before - tick.tick_ns - slack <= made <= after + slack, (before, made, after)


@CLOCKS
def test_entries_expire_after_the_configured_timeout(dp: Datapath, jiffies: bool) -> None:
    assert dp.maps is not None
    maps.write_clock(dp.maps, conntrack_clock() if jiffies else None)
    maps.write_config(dp.maps, DatapathConfig(udp_timeout_ns=5 * MS))
    assert dp.run(udp(A4, CLIENT4, 5000, 53), OUT) is ALLOW
    assert dp.run(udp(CLIENT4, A4, 53, 5000), IN) is ALLOW
    time.sleep(0.05)
    assert dp.run(udp(CLIENT4, A4, 53, 5000), IN) is DENY
    assert maps.conntrack_entries(dp.maps) == []  # the dead entry was removed


def _open(dp: Datapath, sport: int) -> None:
    """A's connection from `sport` to a client's 443, through its handshake."""
    assert dp.run(tcp(A4, CLIENT4, sport, 443, SYN), OUT) is ALLOW
    assert dp.run(tcp(CLIENT4, A4, 443, sport, SYNACK), IN) is ALLOW
    assert dp.run(tcp(A4, CLIENT4, sport, 443, ACK), OUT) is ALLOW


def _entry(dp: Datapath, sport: int) -> maps.ConntrackEntry:
    (entry,) = [e for e in maps.conntrack_entries(dp.maps) if e.sport == sport]  # type: ignore[arg-type]
    return entry


def test_fin_both_ways_and_rst_switch_a_tcp_flow_to_the_closing_timeout(dp: Datapath) -> None:
    assert dp.maps is not None
    maps.write_config(dp.maps, DatapathConfig(tcp_closing_timeout_ns=5 * MS))
    for sport in (40001, 40002, 40003, 40004):
        _open(dp, sport)
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, FIN), OUT) is ALLOW
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, FIN), IN) is ALLOW  # closed both ways
    assert dp.run(tcp(CLIENT4, A4, 443, 40002, pk.TCP_RST), IN) is ALLOW
    assert dp.run(tcp(A4, CLIENT4, 40003, 443, FIN), OUT) is ALLOW  # a half-close only
    time.sleep(0.05)
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, ACK), IN) is DENY
    assert dp.run(tcp(CLIENT4, A4, 443, 40002, ACK), IN) is DENY
    assert dp.run(tcp(CLIENT4, A4, 443, 40003, ACK), IN) is ALLOW  # established: long timeout
    assert dp.run(tcp(CLIENT4, A4, 443, 40004, ACK), IN) is ALLOW


def test_a_flow_without_a_reply_keeps_the_short_timeout(dp: Datapath) -> None:
    # A bare ACK (or a SYN) the policy allows is recorded, but only with the closing timeout,
    # refreshed by each packet: until the other side answers, nothing is established.
    assert dp.maps is not None
    maps.write_config(dp.maps, DatapathConfig(tcp_closing_timeout_ns=5 * MS))
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, ACK), OUT) is ALLOW
    assert dp.run(tcp(A4, CLIENT4, 40002, 443, SYN), OUT) is ALLOW
    assert _entry(dp, 40001).closing and _entry(dp, 40001).tcp == 0
    assert _entry(dp, 40002).closing
    time.sleep(0.05)
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, ACK), IN) is DENY
    assert dp.run(tcp(CLIENT4, A4, 443, 40002, SYNACK), IN) is DENY
    # a mid-stream flow the peer answers is established like one opened by a handshake
    assert dp.run(tcp(A4, CLIENT4, 40003, 443, ACK), OUT) is ALLOW
    assert dp.run(tcp(CLIENT4, A4, 443, 40003, ACK), IN) is ALLOW
    entry = _entry(dp, 40003)
    assert not entry.closing and entry.tcp == abi.CT_TCP_REPLIED


def test_a_bare_syn_is_never_a_reply(dp: Datapath) -> None:
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, SYN), OUT) is ALLOW
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, SYN), IN) is DENY  # a new connection toward A
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, SYNACK), IN) is ALLOW
    assert not _entry(dp, 40001).closing


def test_an_rst_opens_nothing_and_a_forged_one_is_undone_by_the_next_packet(
    dp: Datapath,
) -> None:
    assert dp.maps is not None
    maps.write_config(dp.maps, DatapathConfig(tcp_closing_timeout_ns=5 * MS))
    assert dp.run(tcp(A4, CLIENT4, 40009, 443, pk.TCP_RST), OUT) is ALLOW
    assert maps.conntrack_entries(dp.maps) == []
    _open(dp, 40001)
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, pk.TCP_RST), IN) is ALLOW  # forged
    assert _entry(dp, 40001).closing
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, ACK), OUT) is ALLOW  # the flow goes on
    assert not _entry(dp, 40001).closing
    time.sleep(0.05)
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, ACK), IN) is ALLOW


def test_revalidate_mode_cuts_established_flows_that_policy_now_denies(dp: Datapath) -> None:
    assert dp.maps is not None
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, SYN), OUT) is ALLOW
    stats = dp.write(_tables(deny_egress_to_clients=True))
    assert stats.added == 1
    assert maps.read_epoch(dp.maps) == stats.epoch
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, SYNACK), IN) is DENY  # the reply is cut too
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, ACK), OUT) is DENY
    assert [e.rule_id for e in dp.events()] == [100, 200]


def test_revalidate_mode_keeps_flows_that_policy_still_allows(dp: Datapath) -> None:
    assert dp.maps is not None
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, SYN), OUT) is ALLOW
    maps.bump_epoch(dp.maps)
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, SYNACK), IN) is ALLOW
    (entry,) = maps.conntrack_entries(dp.maps)
    assert entry.epoch == maps.read_epoch(dp.maps)


def test_keep_mode_lets_established_flows_outlive_a_new_deny(dp: Datapath) -> None:
    assert dp.maps is not None
    maps.write_config(dp.maps, DatapathConfig(conntrack_mode=ConntrackMode.KEEP))
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, SYN), OUT) is ALLOW
    dp.write(_tables(deny_egress_to_clients=True))
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, SYNACK), IN) is ALLOW
    assert dp.run(tcp(A4, CLIENT4, 40001, 443, ACK), OUT) is ALLOW
    assert dp.run(tcp(A4, CLIENT4, 40002, 443, SYN), OUT) is DENY  # new flows see the deny


def test_an_endpoint_at_its_budget_opens_no_new_flow_and_cannot_evict_others() -> None:
    with datapath(Shape(conntrack_per_endpoint=3)) as d:
        assert d.maps is not None
        d.write(_tables())
        for sport in range(5000, 5003):
            assert d.run(udp(A4, CLIENT4, sport, 53), OUT) is ALLOW
        assert maps.conntrack_owned(d.maps) == {1: 3}
        d.events()
        assert d.run(udp(A4, CLIENT4, 5003, 53), OUT) is DENY  # allowed, but over A's budget
        (event,) = d.events()
        assert (event.reason, event.endpoint_id, event.rule_id) == (
            events.DropReason.CT_BUDGET,
            1,
            ir.RULE_NONE,
        )
        assert d.run(udp(A4, CLIENT4, 5000, 53), OUT) is ALLOW  # its established flows go on
        assert d.run(udp(B4, CLIENT4, 6000, 53), OUT) is ALLOW  # B has its own budget
        assert d.run(udp(CLIENT4, B4, 53, 6000), IN) is ALLOW  # and B's replies still pass
        assert maps.conntrack_owned(d.maps) == {1: 3, 2: 1}


def test_the_budget_follows_deletions_and_the_agents_recount() -> None:
    with datapath(Shape(conntrack_per_endpoint=2)) as d:
        assert d.maps is not None
        d.write(_tables())
        maps.write_config(d.maps, DatapathConfig(udp_timeout_ns=5 * MS))
        assert d.run(udp(A4, CLIENT4, 5000, 53), OUT) is ALLOW
        assert d.run(udp(A4, CLIENT4, 5001, 53), OUT) is ALLOW
        time.sleep(0.05)
        assert d.run(udp(A4, CLIENT4, 5000, 53), OUT) is ALLOW  # dead: deleted, counted anew
        assert maps.conntrack_owned(d.maps) == {1: 2}  # one deleted, one created
        assert d.run(udp(A4, CLIENT4, 5002, 53), OUT) is DENY  # 5001 is dead, but nobody knows
        time.sleep(0.05)
        recount = ConntrackRecount(lambda: d.maps, threading.Lock(), 10.0)  # the agent's
        assert recount.recount()
        assert recount.gauges()["stockade_agent_conntrack_entries"] == 0
        assert maps.conntrack_owned(d.maps) == {}
        assert maps.conntrack_entries(d.maps) == []
        assert d.run(udp(A4, CLIENT4, 5002, 53), OUT) is ALLOW
        assert maps.conntrack_owned(d.maps) == {1: 1}


def test_flows_of_the_one_flow_per_entry_layout_are_converted_and_still_pass(
    dp: Datapath,
) -> None:
    # A conntrack table of the layout before one entry held both directions (a ct_key of the
    # original tuple -> one ct_flow), as an agent upgrade finds it pinned.
    assert dp.maps is not None
    pin = Path("/sys/fs/bpf") / f"stockade-test-oldct-{os.getpid()}"
    old_key = abi.CT_KEY.size
    subprocess.run(
        [
            "bpftool",
            "map",
            "create",
            str(pin),
            "type",
            "lru_hash",
            "key",
            str(old_key),
            "value",
            str(migrate.OLD_CT_ENTRY_SIZE),
            "entries",
            "64",
            "name",
            "conntrack",
        ],
        check=True,
    )
    try:
        fd = libbpf.obj_get(pin)
        try:
            expires = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 60_000 * MS
            epoch = maps.read_epoch(dp.maps)

            def flow(
                src: ir.IPAddress,
                dst: ir.IPAddress,
                sport: int,
                dport: int,
                direction: Direction,
                rule_id: int,
            ) -> bytes:
                key = abi.CT_KEY.pack(
                    ir.to_v6(src).packed,
                    ir.to_v6(dst).packed,
                    sport.to_bytes(2, "big"),
                    dport.to_bytes(2, "big"),
                    TCP,
                    int(direction),
                    0,
                )
                value = abi.CT_FLOW.pack(expires, epoch, rule_id, dport, 0, 1, 1)
                libbpf.map_update(fd, key, value)
                return key

            # A's connection out, A's connection in from the same peer in the other order of
            # addresses, and a flow and its reverse-direction flow that share one new entry.
            flow(A4, CLIENT4, 40001, 443, OUT, 0)
            flow(CLIENT4, A4, 5000, 80, IN, 7)
            flow(A6, CLIENT6, 40002, 443, OUT, 0)
            flow(CLIENT6, A6, 443, 40002, IN, 8)
            old = migrate.MapDef(abi.MapType.LRU_HASH, old_key, migrate.OLD_CT_ENTRY_SIZE, 64)
            assert migrate._convert_conntrack(fd, dp.maps.fd("conntrack"), old) == 4
        finally:
            os.close(fd)
    finally:
        pin.unlink()
    got = {
        (e.saddr, e.daddr, e.sport, e.dport, e.direction, e.rule_id)
        for e in maps.conntrack_entries(dp.maps)
    }
    v6 = ir.to_v6
    assert got == {
        (v6(A4).packed, v6(CLIENT4).packed, 40001, 443, OUT, 0),
        (v6(CLIENT4).packed, v6(A4).packed, 5000, 80, IN, 7),
        (v6(A6).packed, v6(CLIENT6).packed, 40002, 443, OUT, 0),
        (v6(CLIENT6).packed, v6(A6).packed, 443, 40002, IN, 8),
    }
    # A is isolated for ingress: only the converted flows let these in.
    assert dp.run(tcp(CLIENT4, A4, 443, 40001, SYNACK), IN) is ALLOW  # a reply
    assert dp.run(tcp(CLIENT4, A4, 5000, 80, ACK), IN) is ALLOW  # established
    assert dp.run(tcp(CLIENT6, A6, 443, 40002, ACK), IN) is ALLOW
    assert dp.run(tcp(CLIENT4, A4, 443, 40009, SYNACK), IN) is DENY  # no such flow
