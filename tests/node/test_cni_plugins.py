"""CNI ADD, CHECK and DEL through the real plugins on real namespaces: ptp (routed) and bridge
(bridge topology), both with host-local IPAM, give the pod its addresses and routes; DEL removes
the veth and releases the lease; a bad configuration fails with the plugin's own error."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stockade.sandbox.node.cni import (
    CniError,
    NetworkList,
    PodRef,
    RuntimeConf,
    parse_result,
    pod_args,
)
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.topology import Mode, Topology
from tests.fixtures.netns import MakeTopology


def _ip(ns: str, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", "-n", ns, *args], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout or "[]"))


def _rt(pod_ns: str, tag: str) -> RuntimeConf:
    return RuntimeConf(tag, pod_ns, "eth0", pod_args(PodRef("ns1", f"p-{tag}", tag), tag), "ns1/p")


def _leases(node: NodeCni) -> set[str]:
    d = node.ipam_dir / "stockade"
    skip = ("lock", "last_reserved_ip.0", "last_reserved_ip.1")
    return {p.name for p in d.iterdir() if p.name not in skip} if d.is_dir() else set()


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_add_check_del_wire_and_unwire_a_pod(
    mode: Mode,
    tmp_path: Path,
    cni_bin: Path,
    topology: MakeTopology,
    pod_netns: Callable[[Topology, str], str],
) -> None:
    topo = topology(nodes=2, mode=mode)
    node = topo.nodes[0]
    cni = NodeCni(tmp_path / node.name, node, cni_bin)
    cni.install(mode, f"{topo.ifname_prefix}br")
    pod_ns = pod_netns(topo, "a1")
    rt = _rt(pod_ns, "a1")

    result = cni.add(rt)
    addresses = parse_result(result)
    assert addresses.ips == ("10.244.1.128", "fd00:10:244:1::1:1")
    assert _leases(cni) == {"10.244.1.128", "fd00:10:244:1::1:1"}
    eth0 = {a["local"] for i in _ip(pod_ns, "addr", "show", "eth0") for a in i["addr_info"]}  # type: ignore[attr-defined]
    assert {"10.244.1.128", "fd00:10:244:1::1:1"} <= eth0
    lo = _ip(pod_ns, "link", "show", "lo")[0]
    assert "UP" in lo["flags"]  # type: ignore[operator]
    defaults = {
        (r["dst"], r["gateway"])
        for r in _ip(pod_ns, "route") + _ip(pod_ns, "-6", "route")
        if r["dst"] == "default"
    }
    assert defaults == {("default", "10.244.1.1"), ("default", "fd00:10:244:1::1")}
    host_side = _ip(node.netns, "route", "get", "10.244.1.128")[0]["dev"]
    if mode == "routed":
        assert str(host_side).startswith("veth")  # the node routes the pod's /32 to its veth
    else:
        assert host_side == f"{topo.ifname_prefix}br"
        ports = [
            str(x["ifname"]) for x in _ip(node.netns, "link", "show", "master", str(host_side))
        ]
        assert len(ports) == 1 and ports[0].startswith("veth")
    cni.runtime.check(cni.network(), rt)

    cni.delete(rt)
    assert _leases(cni) == set()
    assert not [x for x in _ip(node.netns, "link") if str(x["ifname"]).startswith("veth")]
    assert cni.runtime.cached(cni.network().name, rt) is None


def test_the_next_pod_gets_the_next_address_and_a_released_one_is_reused(
    tmp_path: Path, cni_bin: Path, topology: MakeTopology, pod_netns: Callable[[Topology, str], str]
) -> None:
    topo = topology(nodes=1, mode="routed")
    cni = NodeCni(tmp_path / "n", topo.nodes[0], cni_bin)
    cni.install("routed", None)
    first, second = _rt(pod_netns(topo, "b1"), "b1"), _rt(pod_netns(topo, "b2"), "b2")
    assert parse_result(cni.add(first)).ip_v4 == "10.244.1.128"
    assert parse_result(cni.add(second)).ip_v4 == "10.244.1.129"
    cni.delete(first)
    assert _leases(cni) == {"10.244.1.129", "fd00:10:244:1::1:2"}


def test_a_bad_configuration_fails_naming_the_plugin_and_the_pod(
    tmp_path: Path, cni_bin: Path, topology: MakeTopology, pod_netns: Callable[[Topology, str], str]
) -> None:
    topo = topology(nodes=1, mode="routed")
    cni = NodeCni(tmp_path / "n", topo.nodes[0], cni_bin)
    rt = _rt(pod_netns(topo, "c1"), "c1")
    bad = NetworkList.of(
        {
            "cniVersion": "1.0.0",
            "name": "stockade",
            "plugins": [
                {
                    "type": "ptp",
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": "nonsense"}]]},
                }
            ],
        }
    )
    with pytest.raises(
        CniError, match=r"CNI ADD of pod ns1/p: plugin 'ptp'.* failed: \[code \d+\]"
    ):
        cni.runtime.add(bad, rt)
    missing = NetworkList.of({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "nosuch"}]})
    with pytest.raises(CniError, match=r"plugin 'nosuch'.*no executable"):
        cni.runtime.add(missing, rt)
