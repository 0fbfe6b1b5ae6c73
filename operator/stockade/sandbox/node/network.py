"""A sandbox node's CNI network: its configuration list and where its CNI state lives.

The routed topology uses `ptp`, the bridge topology the `bridge` plugin on the node's bridge
(`isGateway`); both take their addresses from `host-local` with the node's v4 and v6 pod CIDRs as
two range sets (the upper half of each, so that pods wired directly by `Topology.add_pod` never
collide with them) and routes 0.0.0.0/0 and ::/0. `loopback` brings up `lo` as its own
single-plugin network, as containerd does. `NodeCni` keeps the conflist (`net.d/`), the result
cache (`cache/`) and the host-local data (`ipam/`) in one directory per node below the sandbox
run's state directory, so that removing it removes every lease. Each node's routes to the other
nodes' pod CIDRs stay the topology's (fabric's) job.

Called by `stockade.sandbox.node.kubelet`, `stockade.sandbox.node.supervise`, `bench/cni.py` and
the node tests; `stockade.sandbox.node.cni` runs the plugins.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.runtime import cnichain
from stockade.sandbox.node.cni import (
    CNI_VERSION,
    CniError,
    NetworkList,
    Runtime,
    RuntimeConf,
    load_conflist,
    write_conflist,
)
from stockade.sandbox.topology import Mode, NodeNet

NETWORK_NAME = "stockade"
SOCKET_FILE = "cni.sock"  # in a node's CNI state directory: its agent's stockade-cni socket
LOOPBACK_NETWORK = "cni-loopback"
# host-local hands out the upper half of each node's pod CIDRs (v4 .128-.254, v6 ::1:1-::1:ffff),
# so that pods wired directly by `Topology.add_pod` (from .2 upwards) never collide with them.
V4_RANGE_FIRST, V4_RANGE_LAST = 128, 254
V6_RANGE_FIRST, V6_RANGE_LAST = 0x10001, 0x1FFFF


def _nth(cidr: str, k: int) -> str:
    net = ipaddress.ip_network(cidr)
    return str(net.network_address + k)


def host_local_ipam(node: NodeNet, data_dir: Path) -> dict[str, Any]:
    """host-local with the node's v4 and v6 pod CIDRs as two range sets (one address each)."""
    return {
        "type": "host-local",
        "dataDir": str(data_dir),
        "ranges": [
            [
                {
                    "subnet": node.pod_cidr_v4,
                    "rangeStart": _nth(node.pod_cidr_v4, V4_RANGE_FIRST),
                    "rangeEnd": _nth(node.pod_cidr_v4, V4_RANGE_LAST),
                    "gateway": _nth(node.pod_cidr_v4, 1),
                }
            ],
            [
                {
                    "subnet": node.pod_cidr_v6,
                    "rangeStart": _nth(node.pod_cidr_v6, V6_RANGE_FIRST),
                    "rangeEnd": _nth(node.pod_cidr_v6, V6_RANGE_LAST),
                    "gateway": _nth(node.pod_cidr_v6, 1),
                }
            ],
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    }


def node_conflist(
    node: NodeNet, mode: Mode, data_dir: Path, bridge: str | None = None
) -> dict[str, Any]:
    """The node's network configuration list: ptp (routed) or bridge (bridge), host-local IPAM."""
    ipam = host_local_ipam(node, data_dir)
    if mode == "routed":
        main: dict[str, Any] = {"type": "ptp", "ipam": ipam}
    elif mode == "bridge":
        if not bridge:
            raise CniError(f"node {node.name}: the bridge topology needs the bridge's name")
        main = {"type": "bridge", "bridge": bridge, "isGateway": True, "ipam": ipam}
    else:
        raise CniError(f"node {node.name}: mode {mode!r} must be 'routed' or 'bridge'")
    return {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": [main]}


LOOPBACK_CONF: dict[str, Any] = {
    "cniVersion": CNI_VERSION,
    "name": LOOPBACK_NETWORK,
    "plugins": [{"type": "loopback"}],
}


@dataclass(frozen=True)
class NodeCni:
    """One node's CNI directories below the run's state directory, and how to run plugins."""

    root: Path
    node: NodeNet
    plugins: Path

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def bin_dir(self) -> Path:
        """The node's CNI binary directory (a node's /opt/cni/bin): links to the reference
        plugins, plus stockade-cni once `chain_stockade` installed it."""
        return self.root / "bin"

    @property
    def socket(self) -> Path:
        """Where the node's agent serves stockade-cni (`stockade agent --cni-socket`)."""
        return self.root / SOCKET_FILE

    @property
    def runtime(self) -> Runtime:
        """Plugins run from the node's bin/ once `install` made it, else from where they were
        built (a node not installed yet)."""
        plugins = self.bin_dir if self.bin_dir.is_dir() else self.plugins
        return Runtime(plugins, self.root / "cache", self.node.netns)

    def install(self, mode: Mode, bridge: str | None) -> Path:
        """Write the node's conflist (and its directories), and link the plugins into bin/."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for plugin in self.plugins.iterdir():
            link = self.bin_dir / plugin.name
            if plugin.is_file() and not link.exists():
                link.symlink_to(plugin.resolve())
        return write_conflist(self.conf_dir, node_conflist(self.node, mode, self.ipam_dir, bridge))

    def chain_stockade(self, binary: Path, fail_open: bool = False) -> Path:
        """Install stockade-cni and chain it into the node's network, as the chart's installer
        does on a real node (`stockade.runtime.cnichain`, the same code)."""
        cnichain.install_binary(binary, self.bin_dir)
        settings = cnichain.PluginSettings(socket=str(self.socket), fail_open=fail_open)
        return cnichain.install(self.conf_dir, settings)

    def network(self) -> NetworkList:
        return load_conflist(self.conf_dir)

    def add(self, rt: RuntimeConf, timings: dict[str, float] | None = None) -> dict[str, Any]:
        """loopback on `lo`, then the node's network on `rt.ifname`; the latter's result.
        `timings`: seconds per plugin, as `Runtime.add` records them."""
        lo = RuntimeConf(rt.container_id, rt.netns, "lo", rt.args, rt.pod)
        self.runtime.add(NetworkList.of(LOOPBACK_CONF), lo, timings)
        return self.runtime.add(self.network(), rt, timings)

    def delete(self, rt: RuntimeConf) -> None:
        """DEL the node's network, then loopback (reverse of `add`)."""
        self.runtime.delete(self.network(), rt)
        lo = RuntimeConf(rt.container_id, rt.netns, "lo", rt.args, rt.pod)
        self.runtime.delete(NetworkList.of(LOOPBACK_CONF), lo)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
