"""Sandbox nodes and pods as real network namespaces, wired like a two-level cluster network.

A run owns one "fabric" namespace holding a bridge, one namespace per node attached to that bridge
by a veth (the node's InternalIP lives on it) and one namespace per pod wired to its node by a veth
pair, in one of two topologies a CNI would build:

- routed (Calico/Cilium style): the host-side veth carries no address; the node routes the pod's
  /32 and /128 to it; the pod's default routes go via the link-local gateways 169.254.1.1 and
  fe80::ecee:eeff:feee:eeee, which resolve to the host-side veth's fixed MAC;
- bridge (bridge plugin / kindnet style): host-side veths are ports of a bridge in the node
  namespace that holds the gateway addresses of the node's pod CIDRs.

Each node routes every other node's pod CIDRs via that node's address, so pod traffic crosses
nodes. Everything is dual stack. Every object is named `stk`/`stk-` + a run id, and a state record
under `state_dir()` lets a later process destroy the run (`Topology.load(...).destroy()`) or
remove it once its owner has died (`cleanup_leftovers()`). The machine's own namespace never gets a
link, address or route.

Called by the test fixtures (`tests/fixtures/netns.py`), `stockade sandbox up/down` and the e2e
conformance engine; `stockade.sandbox.workloads.traffic` runs processes inside the namespaces
made here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from stockade.sandbox import netns
from stockade.sandbox.netns import Owner

Mode = Literal["routed", "bridge"]
PREFIX = "stk"
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # EUI-64 link-local address of GATEWAY_MAC
POD_IFNAME = "eth0"
NODE_UPLINK = "eth0"
MAX_NODES = 99
MAX_PODS_PER_NODE = 253  # host parts 2..254

_NS_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv4.ping_group_range": "0 2147483647",
}
_NODE_SYSCTLS = {
    **_NS_SYSCTLS,
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


@dataclass(frozen=True)
class NodeNet:
    """One node: its namespace, pod CIDRs and InternalIPs (on the fabric)."""

    name: str
    netns: str
    index: int
    pod_cidr_v4: str
    pod_cidr_v6: str
    ip_v4: str
    ip_v6: str


@dataclass(frozen=True)
class PodNet:
    """One pod: its namespace, addresses and the two ends of its veth pair."""

    key: str
    node: str
    netns: str
    ip_v4: str
    ip_v6: str
    host_ifname: str
    pod_ifname: str


def node_net(run_id: str, index: int) -> NodeNet:
    return NodeNet(
        name=f"node-{index}",
        netns=f"{PREFIX}-{run_id}-node{index}",
        index=index,
        pod_cidr_v4=f"10.244.{index}.0/24",
        pod_cidr_v6=f"fd00:10:244:{index}::/64",
        ip_v4=f"172.18.0.{10 + index}",
        ip_v6=f"fc00:f853:ccd:e793::{10 + index}",
    )


def new_run_id() -> str:
    """Five characters of [a-z0-9]: short enough for 15-char interface names."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(5))


def _check_run_id(run_id: str) -> str:
    if not (
        1 <= len(run_id) <= 5 and all(c in string.ascii_lowercase + string.digits for c in run_id)
    ):
        raise ValueError(f"run_id {run_id!r} must be 1..5 characters of [a-z0-9]")
    return run_id


@dataclass
class Topology:
    """A run's fabric, nodes and pods. Create with `Topology.create`, end with `destroy()`."""

    run_id: str
    mode: Mode
    nodes: list[NodeNet]
    pods: dict[str, PodNet] = field(default_factory=dict)
    owner: Owner | None = None
    destroyed: bool = False
    # The process this object lives in: a forked copy (pyroute2 forks) must never tear down.
    _pid: int = field(default_factory=os.getpid, repr=False, compare=False)

    # -- naming -------------------------------------------------------------------------------
    @property
    def fabric_netns(self) -> str:
        return f"{PREFIX}-{self.run_id}-fabric"

    @property
    def ifname_prefix(self) -> str:
        return f"{PREFIX}{self.run_id}"

    def namespaces(self) -> list[str]:
        """Every namespace of the run, pods first (the teardown order)."""
        return (
            [p.netns for p in self.pods.values()]
            + [n.netns for n in self.nodes]
            + [self.fabric_netns]
        )

    def node(self, name: str) -> NodeNet:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(
            f"node {name!r} is not in run {self.run_id} ({[n.name for n in self.nodes]})"
        )

    def node_of(self, pod_key: str) -> NodeNet:
        return self.node(self.pods[pod_key].node)

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def create(cls, nodes: int = 2, mode: Mode = "routed", run_id: str | None = None) -> Topology:
        """Build the fabric and `nodes` nodes; on any failure remove what was built and raise."""
        if mode not in ("routed", "bridge"):
            raise ValueError(f"mode {mode!r} must be 'routed' or 'bridge'")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes={nodes} must be within 1..{MAX_NODES}")
        rid = _check_run_id(run_id) if run_id is not None else new_run_id()
        topo = cls(
            run_id=rid,
            mode=mode,
            nodes=[node_net(rid, i) for i in range(1, nodes + 1)],
            owner=Owner.current(),
        )
        if any(netns.exists(ns) for ns in topo.namespaces()):
            raise ValueError(f"run id {rid!r} is in use: its namespaces exist")
        netns.register(topo.run_id, topo.destroy)
        try:
            topo._write_record()
            topo._build_fabric()
            for node in topo.nodes:
                topo._build_node(node)
        except BaseException:
            topo.destroy()
            raise
        return topo

    def _build_fabric(self) -> None:
        fabric, bridge = self.fabric_netns, f"{self.ifname_prefix}fab"
        netns.create(fabric, _NS_SYSCTLS)
        with netns.ipr(fabric) as ip:
            ip.link("add", ifname=bridge, kind="bridge", br_mcast_snooping=0, br_stp_state=0)
            ip.link("set", index=netns.link_index(ip, bridge), state="up")

    def _build_node(self, node: NodeNet) -> None:
        fabric, bridge = self.fabric_netns, f"{self.ifname_prefix}fab"
        port = f"{self.ifname_prefix}f{node.index}"
        netns.create(node.netns, _NODE_SYSCTLS)
        netns.add_veth(node.netns, NODE_UPLINK, fabric, port)
        with netns.ipr(fabric) as ip:
            idx = netns.link_index(ip, port)
            ip.link("set", index=idx, master=netns.link_index(ip, bridge), state="up")
        with netns.ipr(node.netns) as ip:
            up = netns.link_index(ip, NODE_UPLINK)
            netns.add_address(ip, up, f"{node.ip_v4}/24")
            netns.add_address(ip, up, f"{node.ip_v6}/64")
            ip.link("set", index=up, state="up")
            for other in self.nodes:
                if other.index == node.index:
                    continue
                ip.route("add", dst=other.pod_cidr_v4, gateway=other.ip_v4, oif=up)
                ip.route("add", dst=other.pod_cidr_v6, gateway=other.ip_v6, oif=up)
            if self.mode == "routed":
                # As Calico does for its blocks: an address of the node's CIDRs with no pod is
                # dropped silently instead of answered with "network unreachable".
                ip.route("add", dst=node.pod_cidr_v4, type="blackhole")
                ip.route("add", dst=node.pod_cidr_v6, type="blackhole")
            else:
                br = f"{self.ifname_prefix}br"
                ip.link("add", ifname=br, kind="bridge", br_mcast_snooping=0, br_stp_state=0)
                bri = netns.link_index(ip, br)
                netns.add_address(ip, bri, _host(node.pod_cidr_v4, 1, 24))
                netns.add_address(ip, bri, _host(node.pod_cidr_v6, 1, 64))
                ip.link("set", index=bri, state="up")

    def add_pod(self, key: str, node: str) -> PodNet:
        """Create pod `key` ("ns/name") on `node`, with IPs from the node's pod CIDRs."""
        self._check_alive()
        if key in self.pods:
            raise ValueError(f"pod {key!r} already exists in run {self.run_id}")
        n = self.node(node)
        used = {int(p.ip_v4.rsplit(".", 1)[1]) for p in self.pods.values() if p.node == node}
        free = [k for k in range(2, 2 + MAX_PODS_PER_NODE) if k not in used]
        if not free:
            raise ValueError(f"node {node!r} has no free pod address ({MAX_PODS_PER_NODE} in use)")
        k = free[0]
        pod = PodNet(
            key=key,
            node=node,
            netns=f"{PREFIX}-{self.run_id}-n{n.index}p{k}",
            ip_v4=_host(n.pod_cidr_v4, k),
            ip_v6=_host(n.pod_cidr_v6, k),
            host_ifname=f"{self.ifname_prefix}n{n.index}p{k}",
            pod_ifname=POD_IFNAME,
        )
        self.pods[key] = pod
        try:
            self._write_record()
            self._build_pod(n, pod)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove_pod(key)
            raise
        return pod

    def _build_pod(self, node: NodeNet, pod: PodNet) -> None:
        netns.create(pod.netns, _NS_SYSCTLS)
        routed = self.mode == "routed"
        netns.add_veth(
            node.netns, pod.host_ifname, pod.netns, pod.pod_ifname, GATEWAY_MAC if routed else None
        )
        with netns.ipr(node.netns) as ip:
            hidx = netns.link_index(ip, pod.host_ifname)
            if routed:
                ip.link("set", index=hidx, state="up")
                ip.route("add", dst=f"{pod.ip_v4}/32", oif=hidx, scope="link")
                ip.route("add", dst=f"{pod.ip_v6}/128", oif=hidx)
            else:
                br = netns.link_index(ip, f"{self.ifname_prefix}br")
                ip.link("set", index=hidx, master=br, state="up")
        with netns.ipr(pod.netns) as ip:
            eth = netns.link_index(ip, pod.pod_ifname)
            ip.link("set", index=eth, state="up")
            if routed:
                netns.add_address(ip, eth, f"{pod.ip_v4}/32")
                netns.add_address(ip, eth, f"{pod.ip_v6}/128")
                ip.route("add", dst=f"{GATEWAY_V4}/32", oif=eth, scope="link")
                for gw in (GATEWAY_V4, GATEWAY_V6):
                    ip.neigh("add", dst=gw, lladdr=GATEWAY_MAC, ifindex=eth, state="permanent")
                ip.route("add", dst="0.0.0.0/0", gateway=GATEWAY_V4, oif=eth)
                ip.route("add", dst="::/0", gateway=GATEWAY_V6, oif=eth)
            else:
                netns.add_address(
                    ip, eth, _host(node.pod_cidr_v4, int(pod.ip_v4.split(".")[3]), 24)
                )
                netns.add_address(ip, eth, f"{pod.ip_v6}/64")
                ip.route("add", dst="0.0.0.0/0", gateway=_host(node.pod_cidr_v4, 1), oif=eth)
                ip.route("add", dst="::/0", gateway=_host(node.pod_cidr_v6, 1), oif=eth)

    def remove_pod(self, key: str) -> None:
        """Remove pod `key`: its host-side veth (at once, so its name can be reused) and netns."""
        pod = self.pods.get(key)
        if pod is None:
            raise KeyError(f"pod {key!r} is not in run {self.run_id}")
        node = self.node(pod.node)
        netns.kill_processes(pod.netns)
        if netns.exists(node.netns):
            with netns.ipr(node.netns) as ip:
                found = ip.link_lookup(ifname=pod.host_ifname)
                if found:
                    with contextlib.suppress(Exception):
                        ip.link("del", index=found[0])
        netns.remove(pod.netns)
        del self.pods[key]
        if not self.destroyed:
            self._write_record()

    def destroy(self) -> None:
        """Kill every process in the run's namespaces and remove them all. Idempotent."""
        if os.getpid() != self._pid:
            return
        errors: list[str] = []
        for name in self.namespaces():
            try:
                netns.remove(name)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        self.destroyed = True
        netns.unregister(self.run_id)
        if not errors:
            netns.delete_record(self.run_id)
        if errors:
            raise netns.NetnsError(f"run {self.run_id}: teardown left: {'; '.join(errors)}")

    def detach(self, owner_pid: int | None = None) -> None:
        """Hand the run over: this process stops destroying it at exit; `owner_pid` (a process
        that lives as long as the sandbox should) becomes its owner, or None for "kept until
        `stockade sandbox down`" (cleanup_leftovers then leaves it alone)."""
        self._check_alive()
        netns.unregister(self.run_id)
        self.owner = Owner.of(owner_pid) if owner_pid is not None else None
        self._write_record()

    def _check_alive(self) -> None:
        if self.destroyed:
            raise RuntimeError(f"run {self.run_id} has been destroyed")

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "run_id": self.run_id,
            "mode": self.mode,
            "owner": asdict(self.owner) if self.owner else None,
            "nodes": [asdict(n) for n in self.nodes],
            "pods": {k: asdict(p) for k, p in self.pods.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        mode = data["mode"]
        if mode not in ("routed", "bridge"):
            raise ValueError(f"mode {mode!r} in topology record must be 'routed' or 'bridge'")
        owner = data.get("owner")
        return cls(
            run_id=_check_run_id(data["run_id"]),
            mode=mode,
            nodes=[NodeNet(**n) for n in data["nodes"]],
            pods={k: PodNet(**p) for k, p in data["pods"].items()},
            owner=Owner(**owner) if owner else None,
        )

    def save(self, path: Path) -> None:
        netns.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Topology:
        return cls.from_dict(netns.read_json(path))

    def _write_record(self) -> None:
        netns.write_json(netns.record_path(self.run_id), self.to_dict())


def _host(cidr: str, k: int, prefixlen: int | None = None) -> str:
    """Host number `k` of `cidr`, written like the v4 form (10.244.1.7 <-> fd00:10:244:1::7)."""
    net = ipaddress.ip_network(cidr)
    if net.version == 4:
        addr = str(net.network_address + k)
    else:
        addr = str(ipaddress.ip_address(f"{net.network_address}{k}"))
    return f"{addr}/{prefixlen}" if prefixlen is not None else addr


def cleanup_leftovers(include_detached: bool = False) -> list[str]:
    """Remove the namespaces (and the processes in them) of recorded runs whose owner process is
    dead, and their records. Runs detached without an owner are kept unless `include_detached`.
    Namespaces without a record are not touched: every run writes its record before it creates
    its first namespace, so they belong to someone else. Returns the namespaces removed."""
    removed: list[str] = []
    for rid in netns.recorded_runs():
        data = netns.read_record(rid)
        if data is None:
            continue
        owner = data.get("owner")
        if owner is None and not include_detached:
            continue
        if owner is not None and Owner(**owner).alive():
            continue
        for name in sorted(netns.list_names(f"{PREFIX}-{rid}-"), key=_teardown_order):
            if netns.remove(name):
                removed.append(name)
        netns.delete_record(rid)
    return removed


def _teardown_order(name: str) -> int:
    if name.endswith("-fabric"):
        return 2
    return 1 if "-node" in name else 0
