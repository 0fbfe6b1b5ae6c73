"""Attach, replace and detach on real veths in network namespaces the tests create.

Covers: tcx links at the head of the chain with later programs still running on allow; atomic
replacement under traffic (no packet of an allowed flow lost, no packet of a denied flow
through) for tcx links and for the legacy filter; foreign tc filters left untouched; pins
re-adopted by a new loader process; the host-side interface found from a route or a bridge FDB.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade.compiler import ir
from stockade.compiler.ir import Action, Direction
from stockade.compiler.render import Hook, render_all
from stockade.datapath import attach as at
from stockade.datapath import iface, libbpf, maps
from tests.bpf import datapath_netns as netns
from tests.bpf.datapath_harness import Datapath, compiler, datapath, load_object

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_PORT, DENIED_PORT = 5000, 9999
TABLES = ir.NodeTables(
    endpoints=(ir.EndpointEntry(ipaddress.ip_address(netns.POD_IP), 1),),
    classes=(ir.ClassEntry(ipaddress.ip_network(f"{netns.NODE_IP}/32"), 3),),
    policy=(ir.PolicyEntry(1, Direction.EGRESS, 96, 3, ir.PROTO_UDP, DENIED_PORT, Action.DENY, 7),),
)
FOREIGN_C = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");
SEC("tc")
int foreign(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(&seen, &key);

	(void)skb;
	if (n)
		__sync_fetch_and_add(n, 1);
	return -1;
}
char _license[] SEC("license") = "GPL";
"""


@pytest.fixture
def pod() -> Iterator[netns.Namespaces]:
    with netns.routed_pod() as spaces:
        yield spaces


def _bind(spaces: netns.Namespaces, dp: Datapath) -> None:
    """Bind the pod's host-side veth to its endpoint, as the agent does before attaching."""
    assert dp.maps is not None
    maps.Bindings(dp.maps).bind(spaces.ifindex("node", "vh0"), 1)


@pytest.fixture
def dp(pod: netns.Namespaces) -> Iterator[Datapath]:
    with datapath() as d:
        d.write(TABLES)
        _bind(pod, d)
        yield d


def _send(tx: socket.socket, port: int, seq: int) -> None:
    tx.sendto(struct.pack("!I", seq), (netns.NODE_IP, port))


def _exchange(spaces: netns.Namespaces, count: int = 5) -> tuple[int, int]:
    """Send `count` datagrams to the allowed and to the denied port; how many arrived."""
    node, pod = spaces.run("node"), spaces.run("pod")
    with (
        netns.udp_socket(node, (netns.NODE_IP, ALLOWED_PORT)) as ok_rx,
        netns.udp_socket(node, (netns.NODE_IP, DENIED_PORT)) as deny_rx,
        netns.udp_socket(pod) as tx,
    ):
        for i in range(count):
            _send(tx, ALLOWED_PORT, i)
            _send(tx, DENIED_PORT, i)
        return len(netns.drain(ok_rx, 0.3)), len(netns.drain(deny_rx, 0.1))


def _attach_from_pod(spaces: netns.Namespaces, prog_fd: int, pin: Path) -> at.Attachment:
    ifindex = spaces.ifindex("node", "vh0")
    return spaces.run("node").run(at.attach_tcx, ifindex, at.AttachPoint.INGRESS, prog_fd, pin)


def test_without_programs_both_ports_are_reachable(pod: netns.Namespaces) -> None:
    assert _exchange(pod) == (5, 5)


def test_a_tcx_link_at_the_head_denies_and_lets_later_programs_run_on_allow(
    pod: netns.Namespaces, dp: Datapath, tmp_path: Path
) -> None:
    (tmp_path / "foreign.c").write_text(FOREIGN_C)
    built = compiler().compile({"foreign.c": FOREIGN_C}, "foreign.c")
    with libbpf.BpfObject(built.read(), "foreign").load() as foreign:
        ifindex = pod.ifindex("node", "vh0")
        node = pod.run("node")
        fpin = dp.pin_root / "foreign-link"
        node.run(
            at.attach_tcx, ifindex, at.AttachPoint.INGRESS, foreign.program("foreign").fd, fpin
        )
        ours = dp.program(Hook.FROM_POD)
        _attach_from_pod(pod, ours.fd, dp.pin_root / "links" / "vh0-ingress")
        order = node.run(at.tcx_query, ifindex, at.AttachPoint.INGRESS)
        assert order == [ours.id, foreign.program("foreign").id]
        before = _seen(foreign)
        assert _exchange(pod) == (5, 0)
        # the foreign program saw the allowed datagrams (and ARP), never the denied ones
        assert 5 <= _seen(foreign) - before < 10
        assert at.detach_tcx(dp.pin_root / "links" / "vh0-ingress")
        assert node.run(at.tcx_query, ifindex, at.AttachPoint.INGRESS) == [
            foreign.program("foreign").id
        ]
        assert _exchange(pod) == (5, 5)
        at.detach_tcx(fpin)


def _seen(obj: libbpf.BpfObject) -> int:
    raw = libbpf.map_lookup(obj.maps["seen"], b"\0\0\0\0", 8)
    assert raw is not None
    return int.from_bytes(raw, "little")


def _replace_under_traffic(
    spaces: netns.Namespaces,
    replace: Callable[[int], object],
    programs: list[int],
    rounds: int = 150,
) -> None:
    node, pod = spaces.run("node"), spaces.run("pod")
    with (
        netns.udp_socket(node, (netns.NODE_IP, ALLOWED_PORT)) as ok_rx,
        netns.udp_socket(node, (netns.NODE_IP, DENIED_PORT)) as deny_rx,
        netns.udp_socket(pod) as tx,
    ):
        stop = threading.Event()
        sent: list[int] = []

        def sender() -> None:
            seq = 0
            while not stop.is_set():
                _send(tx, ALLOWED_PORT, seq)
                _send(tx, DENIED_PORT, seq)
                seq += 1
                time.sleep(0.0003)
            sent.append(seq)

        thread = threading.Thread(target=sender)
        thread.start()
        try:
            for n in range(rounds):
                replace(programs[n % len(programs)])
                time.sleep(0.001)
        finally:
            stop.set()
            thread.join()
        received = sorted(struct.unpack("!I", d)[0] for d in netns.drain(ok_rx, 0.5))
        leaked = netns.drain(deny_rx, 0.1)
    assert sent[0] > rounds  # the traffic overlapped the replacements
    assert received == list(range(sent[0])), "an allowed datagram was lost during replacement"
    assert leaked == [], "a denied datagram got through during replacement"


def test_replacing_a_tcx_program_under_traffic_leaves_no_gap(
    pod: netns.Namespaces, dp: Datapath
) -> None:
    pin = dp.pin_root / "links" / "vh0-ingress"
    first = dp.program(Hook.FROM_POD)
    with load_object(render_all(dp.shape)[0], dp.pin_root) as second_obj:
        second = second_obj.program(Hook.FROM_POD.program)
        _attach_from_pod(pod, first.fd, pin)
        _replace_under_traffic(
            pod, lambda fd: _attach_from_pod(pod, fd, pin), [second.fd, first.fd]
        )
        ifindex = pod.ifindex("node", "vh0")
        assert pod.run("node").run(at.tcx_query, ifindex, at.AttachPoint.INGRESS) == [first.id]
    at.detach_tcx(pin)


def test_replacing_a_legacy_filter_under_traffic_leaves_no_gap(
    pod: netns.Namespaces, dp: Datapath
) -> None:
    ifindex = pod.ifindex("node", "vh0")
    node = pod.run("node")
    first = dp.program(Hook.FROM_POD)
    with load_object(render_all(dp.shape)[0], dp.pin_root) as second_obj:
        second = second_obj.program(Hook.FROM_POD.program)

        def replace(fd: int) -> None:
            node.run(at.attach_legacy, ifindex, at.AttachPoint.INGRESS, fd, "stockade_from_pod")

        replace(first.fd)
        _replace_under_traffic(pod, replace, [second.fd, first.fd], rounds=100)
        filters = node.run(at.legacy_filters, ifindex, at.AttachPoint.INGRESS)
        assert [(f.prio, f.handle) for f in filters] == [(at.LEGACY_PRIO, at.LEGACY_HANDLE)]
        assert node.run(at.detach_legacy, ifindex, at.AttachPoint.INGRESS)


def test_a_foreign_tc_filter_is_left_untouched(pod: netns.Namespaces, dp: Datapath) -> None:
    node_ns = pod.ns("node")
    netns.sh(
        f"ip netns exec {node_ns} tc qdisc add dev vh0 clsact",
        f"ip netns exec {node_ns} tc filter add dev vh0 ingress prio 7 handle 3 "
        "bpf bytecode '1,6 0 0 4294967295,' flowid 1:2",
    )
    ifindex, node = pod.ifindex("node", "vh0"), pod.run("node")
    foreign = at.Filter(7, 3, "bpf", "")
    prog = dp.program(Hook.FROM_POD)
    for mode in (at.Mode.LEGACY, at.Mode.TCX):
        pin = dp.pin_root / "links" / "vh0-ingress"
        attachment = node.run(
            at.attach, ifindex, at.AttachPoint.INGRESS, prog.fd, pin, "stockade_from_pod", mode
        )
        node.run(
            at.attach, ifindex, at.AttachPoint.INGRESS, prog.fd, pin, "stockade_from_pod", mode
        )
        assert foreign in node.run(at.legacy_filters, ifindex, at.AttachPoint.INGRESS)
        assert _exchange(pod) == (5, 0)
        assert node.run(at.detach, attachment)
        assert node.run(at.legacy_filters, ifindex, at.AttachPoint.INGRESS) == [foreign]
    assert not node.run(at.detach_legacy, ifindex, at.AttachPoint.INGRESS)  # nothing of ours
    out = subprocess.run(
        ["ip", "netns", "exec", node_ns, "tc", "qdisc", "show", "dev", "vh0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "clsact" in out


READOPT = """
import json, sys
from pathlib import Path
from stockade.compiler.render import render_all
from stockade.datapath import attach as at, libbpf, maps
from stockade.datapath.netns import NetnsExecutor
from tests.bpf.datapath_harness import load_object
from tests.bpf.test_datapath_attach import TABLES
pin_root, node_ns = Path(sys.argv[1]), sys.argv[2]
pinned = maps.PinnedMaps.open(pin_root)
map_ids = {name: libbpf.map_info(fd).id for name, fd in pinned.fds.items()}
writer = maps.TableWriter(pinned)
adopted = {name: len(writer.current(name)) for name in maps.TABLE_MAPS}
stats = writer.write(TABLES)
obj = load_object(render_all(__import__("stockade.compiler.shape").compiler.shape.Shape())[0],
                  pin_root)
prog = obj.program("stockade_from_pod")
loaded_map_ids = {name: libbpf.map_info(fd).id for name, fd in obj.maps.items()}
with NetnsExecutor.named(node_ns) as node:
    from pyroute2 import IPRoute
    ifindex = node.run(lambda: IPRoute().link_lookup(ifname="vh0")[0])
    node.run(at.attach_tcx, ifindex, at.AttachPoint.INGRESS, prog.fd, pin_root / "links" / "vh0")
    chain = node.run(at.tcx_query, ifindex, at.AttachPoint.INGRESS)
print(json.dumps({"map_ids": map_ids, "loaded_map_ids": loaded_map_ids, "adopted": adopted,
                  "changes": stats.total, "prog_id": prog.id, "chain": chain}))
"""


def test_a_new_loader_process_re_adopts_pinned_maps_and_links(pod: netns.Namespaces) -> None:
    with datapath() as dp:
        map_ids = {name: libbpf.map_info(fd).id for name, fd in dp.maps.fds.items()}  # type: ignore[union-attr]
        dp.write(TABLES)
        _bind(pod, dp)
        old = dp.program(Hook.FROM_POD)
        _attach_from_pod(pod, old.fd, dp.pin_root / "links" / "vh0")
        dp.close()  # the agent dies: every fd is gone, the pins remain
        assert _exchange(pod) == (5, 0)  # still enforcing
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}"}
        out = subprocess.run(
            [sys.executable, "-c", READOPT, str(dp.pin_root), pod.ns("node")],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        result = json.loads(out.stdout)
        assert result["map_ids"] == map_ids
        assert {k: v for k, v in result["loaded_map_ids"].items()} == map_ids
        assert result["adopted"] == {"endpoints": 1, "peer_classes": 1, "policy": 1}
        assert result["changes"] == 0
        assert result["chain"] == [result["prog_id"]] != [old.id]
        assert _exchange(pod) == (5, 0)  # the new process's program enforces after it exited
        at.detach_tcx(dp.pin_root / "links" / "vh0")
        assert _exchange(pod) == (5, 5)


def test_the_host_interface_is_found_from_the_route_to_the_pod(pod: netns.Namespaces) -> None:
    found = pod.run("node").run(iface.host_interface, ipaddress.ip_address(netns.POD_IP))
    assert (found.ifindex, found.name, found.bridge) == (pod.ifindex("node", "vh0"), "vh0", None)


def test_the_host_interface_is_found_from_the_bridge_fdb() -> None:
    with netns.bridged_pods() as spaces:
        node = spaces.run("node")
        for ip in netns.BRIDGED_PODS:
            netns.resolve_neighbour(node, ip)
        for i, ip in enumerate(netns.BRIDGED_PODS, start=1):
            found = node.run(iface.host_interface, ipaddress.ip_address(ip))
            assert (found.name, found.bridge) == (f"vh{i}", "br0")
            assert found.ifindex == spaces.ifindex("node", f"vh{i}")
        with pytest.raises(iface.InterfaceNotFoundError, match="not in its neighbours"):
            node.run(iface.host_interface, ipaddress.ip_address("10.201.0.99"))
