"""Network namespaces and veths for the datapath attach tests: a node namespace with a pod
behind a routed veth, or pods behind a bridge. Names start with `stkdp-`; everything is deleted
on exit, also when the test fails. Each namespace comes with a `NetnsExecutor` so that the test
process can open sockets and attach programs inside it without spawning processes.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from stockade.datapath.netns import NetnsExecutor


def sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=True, capture_output=True)


@dataclass
class Namespaces:
    run_id: str
    names: list[str] = field(default_factory=list)
    executors: dict[str, NetnsExecutor] = field(default_factory=dict)

    def add(self, role: str) -> str:
        name = f"stkdp-{self.run_id}-{role}"
        sh(f"ip netns add {name}")
        self.names.append(name)
        self.executors[role] = NetnsExecutor.named(name)
        sh(f"ip -n {name} link set lo up")
        return name

    def ns(self, role: str) -> str:
        return f"stkdp-{self.run_id}-{role}"

    def run(self, role: str) -> NetnsExecutor:
        return self.executors[role]

    def ifindex(self, role: str, ifname: str) -> int:
        def lookup() -> int:
            with IPRoute() as ipr:
                return int(ipr.link_lookup(ifname=ifname)[0])

        return self.run(role).run(lookup)

    def close(self) -> None:
        for ex in self.executors.values():
            ex.close()
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextmanager
def namespaces() -> Iterator[Namespaces]:
    spaces = Namespaces(uuid.uuid4().hex[:8])
    try:
        yield spaces
    finally:
        spaces.close()


NODE_IP, POD_IP = "10.200.0.1", "10.200.0.2"


def wait_carrier(*links: tuple[str, str], timeout: float = 10.0) -> None:
    """Until each (namespace, interface) has its carrier (LOWER_UP): a veth set up a moment ago
    may not pass packets yet on a loaded machine, and a test's first datagrams would be lost."""
    deadline = time.monotonic() + timeout
    for ns, ifname in links:
        while True:
            out = subprocess.run(
                ["ip", "-n", ns, "link", "show", ifname], capture_output=True, text=True, check=True
            ).stdout
            if "LOWER_UP" in out:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{ns}/{ifname} has no carrier after {timeout:.0f}s: {out}")
            time.sleep(0.02)


@contextmanager
def routed_pod() -> Iterator[Namespaces]:
    """`node` holds vh0 (NODE_IP) with a route to the pod; `pod` holds vp0 (POD_IP)."""
    with namespaces() as spaces:
        node, pod = spaces.add("node"), spaces.add("pod")
        sh(
            f"ip -n {node} link add vh0 type veth peer name vp0 netns {pod}",
            f"ip -n {node} addr add {NODE_IP}/32 dev vh0",
            f"ip -n {node} link set vh0 up",
            f"ip -n {node} route add {POD_IP}/32 dev vh0",
            f"ip -n {pod} addr add {POD_IP}/32 dev vp0",
            f"ip -n {pod} link set vp0 up",
            f"ip -n {pod} route add {NODE_IP}/32 dev vp0",
            f"ip -n {pod} route add default via {NODE_IP} dev vp0",
        )
        wait_carrier((node, "vh0"), (pod, "vp0"))
        yield spaces


BRIDGE_IP, BRIDGED_PODS = "10.201.0.1", ("10.201.0.2", "10.201.0.3")


@contextmanager
def bridged_pods() -> Iterator[Namespaces]:
    """`node` holds br0 (BRIDGE_IP/24) with ports vh1, vh2 to pods `pod1`, `pod2`."""
    with namespaces() as spaces:
        node = spaces.add("node")
        sh(
            f"ip -n {node} link add br0 type bridge",
            f"ip -n {node} link set br0 up",
            f"ip -n {node} addr add {BRIDGE_IP}/24 dev br0",
        )
        for i, ip in enumerate(BRIDGED_PODS, start=1):
            pod = spaces.add(f"pod{i}")
            sh(
                f"ip -n {node} link add vh{i} type veth peer name eth0 netns {pod}",
                f"ip -n {node} link set vh{i} master br0 up",
                f"ip -n {pod} addr add {ip}/24 dev eth0",
                f"ip -n {pod} link set eth0 up",
            )
        yield spaces


@contextmanager
def udp_socket(ex: NetnsExecutor, bind: tuple[str, int] | None = None) -> Iterator[socket.socket]:
    sock = ex.run(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with ExitStack() as stack:
        stack.callback(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        if bind:
            sock.bind(bind)
        yield sock


def resolve_neighbour(ex: NetnsExecutor, ip: str, attempts: int = 40) -> None:
    """Make the namespace resolve `ip` (ARP), which also teaches a bridge the pod's port."""
    with udp_socket(ex) as sock:
        for _ in range(attempts):
            sock.sendto(b"hello", (ip, 9))
            if ex.run(_has_neighbour, ip):
                return
            time.sleep(0.05)
    raise AssertionError(f"{ip} did not answer ARP")


def _has_neighbour(ip: str) -> bool:
    with IPRoute() as ipr:
        return any(
            n.get_attr("NDA_DST") == ip and n.get_attr("NDA_LLADDR")
            for n in ipr.get_neighbours(family=socket.AF_INET)
        )


def drain(sock: socket.socket, timeout: float = 0.5) -> list[bytes]:
    sock.settimeout(timeout)
    got = []
    try:
        while True:
            got.append(sock.recv(2048))
    except TimeoutError:
        return got
