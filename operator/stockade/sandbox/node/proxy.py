"""kube-proxy for every sandbox node, each inside its node's network namespace.

Each node gets a real kube-proxy (`ip netns exec <node netns> kube-proxy ...`), in nftables mode by
default or iptables mode (`ProxyMode`), so Services work in the sandbox as in a cluster: the
ClusterIP rules kube-proxy writes (the nftables table `kube-proxy`, or the iptables `KUBE-*`
chains) live in the node namespace and go away with it; the machine's own namespace gets nothing.
kube-proxy leaves the machine-wide conntrack limit alone (`--conntrack-max-per-core=0`) and serves
/healthz and /metrics on the node namespace's own loopback.

The API server listens on the machine's loopback, out of a node namespace's reach, so each node
also gets a forwarder (`forwarder.py`, in the machine's namespace, listening on 127.0.0.1:6443
inside the node namespace: an address the API server's certificate already names). kube-proxy's
kubeconfig points there and authenticates as system:kube-proxy (bound to the bootstrap role
system:node-proxier).

Called by `stockade sandbox up/down` (session.py) once the node namespaces exist and the Nodes are
registered, and by the apiserver-tier tests.
"""

from __future__ import annotations

import ipaddress
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from stockade.sandbox import netns
from stockade.sandbox.controlplane.pki import COMPONENT_USERS, PkiPaths
from stockade.sandbox.controlplane.server import write_kubeconfig
from stockade.sandbox.processes import Child, ProcessError, ProcessRecord, log_tail
from stockade.sandbox.toolchain import KUBERNETES
from stockade.sandbox.topology import NodeNet

ProxyMode = Literal["nftables", "iptables"]
PROXY_MODES: tuple[str, ...] = get_args(ProxyMode)
DEFAULT_MODE: ProxyMode = "nftables"
FORWARD_HOST = "127.0.0.1"  # inside the node namespace; a SAN of the API server's certificate
FORWARD_PORT = 6443
HEALTHZ = "127.0.0.1:10256"
METRICS = "127.0.0.1:10249"
FORWARDER_SCRIPT = Path(__file__).with_name("forwarder.py")
START_TIMEOUT = 60.0

Progress = Callable[[str], None]


class ProxyError(ProcessError):
    """kube-proxy or its forwarder could not start; the message has the log tail."""


def check_mode(mode: str) -> ProxyMode:
    """`mode` if it is a kube-proxy mode the sandbox runs, else a ValueError naming the field."""
    if mode not in PROXY_MODES:
        raise ValueError(f"proxy mode {mode!r} must be one of {', '.join(PROXY_MODES)}")
    return mode  # type: ignore[return-value]


def cluster_cidrs(nodes: Sequence[NodeNet]) -> list[str]:
    """The smallest IPv4 and IPv6 networks holding every node's pod CIDR (kube-proxy takes one per
    family): what traffic counts as from a pod."""
    if not nodes:
        raise ValueError("nodes must name at least one node")
    result: list[str] = []
    for cidrs in ([n.pod_cidr_v4 for n in nodes], [n.pod_cidr_v6 for n in nodes]):
        nets = [ipaddress.ip_network(c) for c in cidrs]
        cover = nets[0]
        while not all(n.subnet_of(cover) for n in nets):  # type: ignore[arg-type]
            cover = cover.supernet()
        result.append(str(cover))
    return result


def proxy_argv(
    binary: Path, node: NodeNet, nodes: Sequence[NodeNet], kubeconfig: Path, mode: ProxyMode
) -> list[str]:
    """The command line that runs kube-proxy for `node` inside its namespace."""
    return [
        "ip",
        "netns",
        "exec",
        node.netns,
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--proxy-mode={check_mode(mode)}",
        f"--hostname-override={node.name}",
        f"--cluster-cidr={','.join(cluster_cidrs(nodes))}",
        "--conntrack-max-per-core=0",  # nf_conntrack_max is machine-wide: leave it alone
        "--nodeport-addresses=primary",  # NodePorts on the node's InternalIPs only
        f"--healthz-bind-address={HEALTHZ}",
        f"--metrics-bind-address={METRICS}",
        "--profiling=false",
    ]


def forwarder_argv(node: NodeNet, target: tuple[str, int], ready_file: Path) -> list[str]:
    """The command line of the forwarder from `node`'s 127.0.0.1:6443 to `target`."""
    return [
        sys.executable,
        "-I",
        str(FORWARDER_SCRIPT),
        f"--netns={node.netns}",
        f"--listen={FORWARD_HOST}:{FORWARD_PORT}",
        f"--target={target[0]}:{target[1]}",
        f"--ready-file={ready_file}",
    ]


def _quiet(_: str) -> None:
    pass


class NodeProxies:
    """A forwarder and a kube-proxy per node; their files live in `workdir/<node name>/`."""

    def __init__(
        self,
        workdir: Path,
        server: str,
        pki: PkiPaths,
        nodes: Sequence[NodeNet],
        mode: ProxyMode = DEFAULT_MODE,
        *,
        detach: bool = False,
        progress: Progress | None = None,
    ) -> None:
        url = urlsplit(server)
        if url.scheme != "https" or url.hostname is None or url.port is None:
            raise ValueError(f"server {server!r} must be https://HOST:PORT")
        self.workdir = workdir
        self.target = (url.hostname, url.port)
        self.pki = pki
        self.nodes = list(nodes)
        self.mode = check_mode(mode)
        self.detach = detach
        self._progress = progress or _quiet
        self._children: list[Child] = []

    @property
    def records(self) -> tuple[ProcessRecord, ...]:
        return tuple(c.record for c in self._children)

    def start(self) -> None:
        """Start every node's forwarder, then every kube-proxy; return once each kube-proxy
        answers /healthz and has written its rules for both families. On failure stop them all
        and raise ProxyError."""
        self._progress(f"starting kube-proxy ({self.mode}) in {len(self.nodes)} node(s)")
        try:
            for node in self.nodes:
                self._start_forwarder(node)
            proxies = [(node, self._start_proxy(node)) for node in self.nodes]
            for node, child in proxies:
                self._wait(child, lambda n=node: _synced(n))  # type: ignore[misc]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every kube-proxy and forwarder (SIGTERM, then SIGKILL). Idempotent."""
        for child in reversed(self._children):
            child.stop()
        self._children = []

    def _spawn(self, name: str, argv: list[str], log: Path) -> Child:
        child = Child.spawn(name, argv, log, detach=self.detach)
        self._children.append(child)
        return child

    def _start_forwarder(self, node: NodeNet) -> None:
        directory = self.workdir / node.name
        directory.mkdir(parents=True, exist_ok=True)
        ready = directory / "forwarder.ready"
        ready.unlink(missing_ok=True)
        child = self._spawn(
            f"forwarder {node.name}",
            forwarder_argv(node, self.target, ready),
            directory / "forwarder.log",
        )
        self._wait(child, ready.exists)

    def _start_proxy(self, node: NodeNet) -> Child:
        directory = self.workdir / node.name
        kubeconfig = directory / "kube-proxy.kubeconfig"
        client = self.pki.component("kube-proxy")
        write_kubeconfig(
            kubeconfig,
            f"https://{FORWARD_HOST}:{FORWARD_PORT}",
            self.pki.ca_cert,
            client.cert,
            client.key,
            COMPONENT_USERS["kube-proxy"],
        )
        argv = proxy_argv(KUBERNETES.path("kube-proxy"), node, self.nodes, kubeconfig, self.mode)
        return self._spawn(f"kube-proxy {node.name}", argv, directory / "kube-proxy.log")

    @staticmethod
    def _wait(child: Child, healthy: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not child.running():
                raise ProxyError(
                    f"{child.record.name} exited during start-up; last lines of "
                    f"{child.record.log}:\n{log_tail(child.record.log)}"
                )
            if healthy():
                return
            time.sleep(0.1)
        raise ProxyError(
            f"{child.record.name} was not healthy after {START_TIMEOUT:.0f}s; last lines of "
            f"{child.record.log}:\n{log_tail(child.record.log)}"
        )


SYNCED_METRIC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"


def synced_families(metrics: str) -> set[str]:
    """The IP families kube-proxy has written rules for, from its /metrics text."""
    families: set[str] = set()
    for line in metrics.splitlines():
        if not line.startswith(SYNCED_METRIC + "{"):
            continue
        labels, _, value = line[len(SYNCED_METRIC) + 1 :].partition("} ")
        for label in labels.split(","):
            key, _, family = label.partition("=")
            if key == "ip_family" and float(value or 0) > 0:
                families.add(family.strip('"'))
    return families


def _synced(node: NodeNet) -> bool:
    """Whether kube-proxy in `node` answers /healthz and has synced its rules for IPv4 and
    IPv6 (its /healthz answers 200 before the first sync). Asked from inside the node."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with netns.entered(node.netns):
            with direct.open(f"http://{HEALTHZ}/healthz", timeout=2) as health:
                if health.status != 200:
                    return False
            with direct.open(f"http://{METRICS}/metrics", timeout=2) as metrics:
                text = metrics.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return False
    return {"IPv4", "IPv6"} <= synced_families(text)
