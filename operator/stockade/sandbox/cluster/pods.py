"""Finding a sandbox pod's network namespace, and asking the cluster DNS from inside it.

Pods reach the sandbox by two paths: those added with `Topology.add_pod` (the topology state
file records their namespace), and those the kubelet stand-in runs, whose namespace is named
`stk-<run id>-pod-<first 12 hex digits of the pod UID>`. `pod_netns` tries both, for a pod that
the API server says is Running. `lookup` sends a DNS query from inside a namespace, as a process
of the pod would. `stockade sandbox exec` and `probe` (`stockade.sandbox.cluster.podcmd`) call
these.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from stockade.sandbox import netns
from stockade.sandbox.cluster.dnswire import HEADER, TC, RType, encode_name
from stockade.sandbox.topology import PREFIX, Topology

HTTP_NOT_FOUND = 404
UID_CHARS = 12
DNS_RESEND_S = 0.5


class PodError(RuntimeError):
    """The pod cannot be found, is not running, or has no network namespace; or a name in it
    does not resolve. The message names the pod (or the name)."""


def kubelet_netns(run_id: str, uid: str) -> str:
    """The namespace the kubelet stand-in gives the pod with UID `uid`."""
    return f"{PREFIX}-{run_id}-pod-{uid.replace('-', '')[:UID_CHARS]}"


def read_pod(api: Any, namespace: str, name: str) -> Any:
    try:
        return kubernetes.client.CoreV1Api(api).read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == HTTP_NOT_FOUND:
            raise PodError(f"pod {namespace}/{name} not found") from None
        raise


def pod_netns(api: Any, topology: Topology | None, namespace: str, name: str) -> str:
    """The network namespace of the Running pod `namespace/name`; PodError if there is none.

    `topology` is the sandbox's (from its state file), or None when it has none."""
    pod = read_pod(api, namespace, name)
    phase = (pod.status.phase if pod.status else None) or "Pending"
    if phase != "Running":
        raise PodError(f"pod {namespace}/{name} is {phase}, not Running")
    if pod.spec is not None and pod.spec.host_network:
        return _node_netns(api, namespace, name, pod.spec.node_name)
    candidates: list[str] = []
    if topology is not None:
        recorded = topology.pods.get(f"{namespace}/{name}")
        if recorded is not None:
            candidates.append(recorded.netns)
    uid = str(pod.metadata.uid or "")
    if uid:
        if topology is not None:
            candidates.append(kubelet_netns(topology.run_id, uid))
        suffix = f"-pod-{uid.replace('-', '')[:UID_CHARS]}"
        candidates += [n for n in netns.list_names(f"{PREFIX}-") if n.endswith(suffix)]
    for candidate in dict.fromkeys(candidates):
        if netns.exists(candidate):
            return candidate
    tried = ", ".join(dict.fromkeys(candidates)) or "none known"
    raise PodError(
        f"pod {namespace}/{name} is Running but has no network namespace on this machine "
        f"(tried: {tried}); is it a pod of this sandbox?"
    )


def _node_netns(api: Any, namespace: str, name: str, node_name: str | None) -> str:
    """A host-network pod lives in its node's namespace (recorded as a label on the Node)."""
    if not node_name:
        raise PodError(f"host-network pod {namespace}/{name} is bound to no node")
    node = kubernetes.client.CoreV1Api(api).read_node(node_name)
    found = ((node.metadata.labels if node.metadata else None) or {}).get(
        "stockade.io/sandbox-netns"
    )
    if not found or not netns.exists(found):
        raise PodError(
            f"host-network pod {namespace}/{name}: node {node_name} has no network namespace here"
        )
    return str(found)


def pod_ip(api: Any, namespace: str, name: str, family: int = 4) -> str:
    """The pod's address of `family` (4 or 6), else its first one; PodError if it has none."""
    pod = read_pod(api, namespace, name)
    status = pod.status
    ips = [p.ip for p in (status.pod_ips or []) if p.ip] if status else []
    if not ips and status is not None and status.pod_ip:
        ips = [status.pod_ip]
    if not ips:
        raise PodError(f"pod {namespace}/{name} has no IP address (is it Running?)")
    for ip in ips:
        if ipaddress.ip_address(ip).version == family:
            return str(ip)
    return str(ips[0])


def socket_in(ns: str, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    """A socket created inside namespace `ns` by a thread of its own: setns is per thread, so
    the calling thread never changes namespace."""
    try:
        return netns.made_inside(ns, lambda: socket.socket(family, kind))
    except Exception as exc:
        raise OSError(f"cannot open a socket in netns {ns!r}: {exc}") from exc


# -- a small DNS client ------------------------------------------------------------------------


def _skip_name(data: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at `offset`; ValueError if malformed."""
    while True:
        if offset >= len(data):
            raise ValueError("name runs past the end of the reply")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length & 0xC0:
            raise ValueError("bad label type in reply")
        offset += 1 + length
        if length == 0:
            return offset


def parse_reply(data: bytes, qid: int, qtype: int) -> tuple[int, bool, list[str]]:
    """(rcode, truncated, addresses of type `qtype`) of a reply to query `qid`."""
    if len(data) < HEADER.size:
        raise ValueError("reply shorter than a header")
    rid, flags, qdcount, ancount, _, _ = HEADER.unpack_from(data)
    if rid != qid or not flags & 0x8000:
        raise ValueError("not a reply to this query")
    offset = HEADER.size
    for _ in range(qdcount):
        offset = _skip_name(data, offset) + 4
    addresses = []
    for _ in range(ancount):
        offset = _skip_name(data, offset)
        if offset + 10 > len(data):
            raise ValueError("answer record truncated")
        rtype, _, _, size = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        rdata = data[offset : offset + size]
        if len(rdata) != size:
            raise ValueError("answer data truncated")
        offset += size
        if rtype == qtype == RType.A and size == 4:
            addresses.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == qtype == RType.AAAA and size == 16:
            addresses.append(str(ipaddress.IPv6Address(rdata)))
    return flags & 0xF, bool(flags & TC), addresses


def lookup(
    ns: str, name: str, qtype: int, server: str, timeout: float = 3.0
) -> tuple[int, list[str]]:
    """(rcode, addresses) for `name` asked of `server`:53 from inside namespace `ns`, over UDP
    (TCP when the answer is truncated). TimeoutError if the server does not answer."""
    qid = secrets.randbelow(0x10000)
    query = HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket_in(ns, family, socket.SOCK_DGRAM) as udp:
        udp.connect((server, 53))
        while (left := deadline - time.monotonic()) > 0:
            try:
                udp.send(query)
                udp.settimeout(min(DNS_RESEND_S, left))
                data = udp.recv(65535)
                rcode, truncated, addresses = parse_reply(data, qid, qtype)
            except (TimeoutError, ValueError):
                continue
            except ConnectionRefusedError:
                raise TimeoutError(f"nothing listens on {server}:53") from None
            if not truncated:
                return rcode, addresses
            break
        else:
            raise TimeoutError(f"no answer from {server}:53 within {timeout:g}s")
    with socket_in(ns, family, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(max(0.1, deadline - time.monotonic()))
        tcp.connect((server, 53))
        tcp.sendall(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", _recv_exactly(tcp, 2))[0]
        rcode, _, addresses = parse_reply(_recv_exactly(tcp, size), qid, qtype)
        return rcode, addresses


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise TimeoutError("the DNS server closed the connection early")
        data += chunk
    return data
