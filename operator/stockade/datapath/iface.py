"""Find the host-side interface of a pod from its IP address, in the calling thread's netns.

The agent calls `host_interface()` for each local pod before attaching. Routed CNIs (Calico,
kindnet, the AWS VPC CNI) install a route to each pod IP through its veth: the route's output
interface is the answer. Bridge CNIs (flannel, the bridge plugin) route the pod subnet to a
bridge: then the pod's MAC comes from the bridge's neighbour table and its port from the bridge's
forwarding database.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from stockade.datapath.netns import socket_in

AF_BRIDGE = 7
RTM_NEWLINK = 16
RTM_GETLINK = 18
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
IFLA_IFNAME = 3
IFLA_LINK = 5
_NLMSG_HEADER = struct.Struct("=IH")  # nlmsg_len, nlmsg_type (the rest of the header unread)
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BBHiII")  # family, pad, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # rta_len, rta_type


class InterfaceNotFoundError(LookupError):
    """The pod's interface could not be determined; the message says which step failed."""


@dataclass(frozen=True)
class HostInterface:
    ifindex: int
    name: str
    bridge: str | None = None  # the bridge the interface is a port of, when found through one


def _link(ipr: IPRoute, index: int) -> tuple[str, str | None]:
    (link,) = ipr.link("get", index=index)
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    return link.get_attr("IFLA_IFNAME"), kind


def host_interface(pod_ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> HostInterface:
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(pod_ip))
        except Exception as exc:  # pyroute2 raises NetlinkError for unreachable addresses
            raise InterfaceNotFoundError(f"no route to pod {pod_ip}: {exc}") from exc
        if not routes:
            raise InterfaceNotFoundError(f"no route to pod {pod_ip}")
        oif = routes[0].get_attr("RTA_OIF")
        name, kind = _link(ipr, oif)
        if kind != "bridge":
            return HostInterface(oif, name)
        family = socket.AF_INET if pod_ip.version == 4 else socket.AF_INET6
        mac = None
        for neigh in ipr.get_neighbours(family=family, ifindex=oif):
            if neigh.get_attr("NDA_DST") == str(pod_ip) and neigh.get_attr("NDA_LLADDR"):
                mac = neigh.get_attr("NDA_LLADDR")
        if mac is None:
            raise InterfaceNotFoundError(
                f"pod {pod_ip} is behind bridge {name} but not in its neighbours"
            )
        for entry in ipr.get_neighbours(family=AF_BRIDGE):
            if entry.get_attr("NDA_LLADDR") == mac and entry.get_attr("NDA_MASTER") == oif:
                port = entry["ifindex"]
                return HostInterface(port, _link(ipr, port)[0], bridge=name)
        raise InterfaceNotFoundError(f"MAC {mac} of pod {pod_ip} is not in bridge {name}'s FDB")


def node_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of the calling thread's netns (the node's own stack), loopback and
    link-local ones left out: those it may send from toward a pod, a CNI gateway included."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            address = ipaddress.ip_address(str(text).split("%")[0])
            if not (address.is_loopback or address.is_link_local):
                found.add(address)
    return sorted(found, key=lambda a: (a.version, int(a)))


def peer_ifindex(pod_netns: Path, ifname: str) -> int:
    """The ifindex, in the node's namespace, of the host-side peer of the veth `ifname` inside the
    pod's namespace `pod_netns` (its IFLA_LINK). The CNI chain's result lists the container
    interface by name and namespace; the host side is found from it, never by guessing among the
    result's sandbox-less interfaces (the bridge plugin lists the bridge there too).

    It runs on every CNI ADD, so it asks with one RTM_GETLINK on a plain netlink socket made in
    the pod's namespace (`netns.socket_in`: no thread, no pyroute2 machinery)."""
    with socket_in(pod_netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        name = ifname.encode() + b"\0"
        attr = _RTATTR.pack(_RTATTR.size + len(name), IFLA_IFNAME) + name
        attr += b"\0" * (-len(attr) % 4)
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0) + attr
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), RTM_GETLINK, NLM_F_REQUEST, 1, 0) + body)
        data = sock.recv(1 << 16)
    return _link_of_reply(data, ifname)


def _link_of_reply(data: bytes, ifname: str) -> int:
    """IFLA_LINK of the RTM_NEWLINK answer in `data` (or the error it carries)."""
    if len(data) < _NLMSG.size:
        raise InterfaceNotFoundError(f"{ifname}: a short netlink answer ({len(data)} bytes)")
    length, kind, _, _, _ = _NLMSG.unpack_from(data)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", data, _NLMSG.size)
        raise InterfaceNotFoundError(
            f"no interface {ifname} in the pod's namespace: {os.strerror(-error)}"
        )
    if kind != RTM_NEWLINK:
        raise InterfaceNotFoundError(f"{ifname}: unexpected netlink answer type {kind}")
    offset = _NLMSG.size + _IFINFOMSG.size
    end = min(length, len(data))
    while offset + _RTATTR.size <= end:
        size, attr_type = _RTATTR.unpack_from(data, offset)
        if size < _RTATTR.size:
            break
        if attr_type == IFLA_LINK and size >= _RTATTR.size + 4:
            (peer,) = struct.unpack_from("=I", data, offset + _RTATTR.size)
            if peer:
                return int(peer)
        offset += (size + 3) & ~3
    raise InterfaceNotFoundError(f"{ifname} in the pod's namespace is no veth")


def pod_veths() -> dict[int, str]:
    """The calling thread's namespace's pod-side veths, ifindex -> name: a veth whose peer is in
    another namespace (IFLA_LINK_NETNSID set) and that carries no subnet, only host addresses
    (/32, /128: the ptp plugin puts the pod's gateway there), link-local ones or none. Bridges and
    loopback are no veths; a veth pair inside one namespace has no peer namespace; the node's own
    uplink when it is a veth (a kind node's eth0, the sandbox's node uplink) carries the node's
    addresses with their subnet: none of these is a pod's."""
    with IPRoute() as ipr:
        addressed = set()
        for msg in ipr.get_addr():
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            address = ipaddress.ip_address(str(text).split("%")[0])
            if not address.is_link_local and msg["prefixlen"] < address.max_prefixlen:
                addressed.add(msg["index"])
        found = {}
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            if kind != "veth" or link.get_attr("IFLA_LINK_NETNSID") is None:
                continue
            if link["index"] not in addressed:
                found[link["index"]] = link.get_attr("IFLA_IFNAME")
        return found


class LinkEvents:
    """A netlink socket subscribed to link changes (RTMGRP_LINK) in the namespace of the thread
    that made it (it stays there, whichever thread reads it). A plain socket: pyroute2's may be
    opened later, on another thread, so in another namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK))
        self._sock.setblocking(False)

    def wait(self, timeout: float) -> bool:
        """Some link message is ready to read within `timeout` seconds."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        return bool(ready)

    def new_links(self) -> bool:
        """Read what is ready; True when it held an RTM_NEWLINK (a link made or changed), or when
        messages were lost (ENOBUFS: the caller must look at every link)."""
        seen = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return seen
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                seen = True
                continue
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind = _NLMSG_HEADER.unpack_from(data, offset)
                seen = seen or kind == RTM_NEWLINK
                offset += max((length + 3) & ~3, _NLMSG_HEADER.size)

    def close(self) -> None:
        self._sock.close()


def interface_at(ifindex: int) -> HostInterface:
    """The interface with `ifindex` in the calling thread's namespace."""
    with IPRoute() as ipr:
        try:
            name, _ = _link(ipr, ifindex)
        except Exception as exc:  # NetlinkError: no such device
            raise InterfaceNotFoundError(f"no interface with index {ifindex}: {exc}") from exc
        return HostInterface(ifindex, name)
