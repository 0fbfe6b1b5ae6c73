"""The helper process that runs inside one sandbox pod (or node) network namespace.

`stockade.sandbox.workloads.traffic` starts one per namespace with `ip netns exec NS python
podagent.py` and talks to it over stdin/stdout, one JSON object per line. The agent serves TCP and
UDP echo ports and runs probes (TCP connect + echo, UDP echo, ICMP echo) concurrently with asyncio,
so a batch of probes costs about one probe timeout. It exits when its stdin closes.

SCTP ("sctp"): the kernel here has no SCTP module, so the agent crafts the handshake's first two
packets over raw IP sockets (protocol 132): a probe sends INIT (resent every 0.25 s) and waits for
INIT-ACK (connected) or ABORT (refused); a served address answers INIT with INIT-ACK on a served
port and ABORT on any other. Raw sockets take the packets, so the kernel sends no
protocol-unreachable. That is the part of an association that policy enforcement judges.

Requests:  {"id": N, "op": "serve", "proto": "tcp"|"udp"|"sctp", "port": P, "hosts": [ip, ...]}
           {"id": N, "op": "probe", "proto": "tcp"|"udp"|"sctp", "dst": ip, "port": P,
            "timeout": s, "src": ip|null}
           {"id": N, "op": "ping", "dst": ip, "timeout": s, "src": ip|null}
Replies:   {"id": N, "ok": true, "outcome": "connected"|"timeout"|"refused"|"error",
            "detail": str, "elapsed": s}   or   {"id": N, "ok": false, "error": str}
At start the agent prints {"ready": true, "pid": PID}.

Standard library only: it runs with `python -I -S`, outside the package's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import socket
import struct
import sys
import time
from typing import Any

PAYLOAD = b"stockade-probe\n"
UDP_RESEND_S = 0.25
TCP_IDLE_S = 10.0

_servers: dict[tuple[str, int], list[Any]] = {}

IPPROTO_SCTP = 132
SCTP_INIT, SCTP_INIT_ACK, SCTP_ABORT = 1, 2, 6


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return ~crc & 0xFFFFFFFF


def sctp_packet(sport: int, dport: int, vtag: int, chunk: bytes) -> bytes:
    """Common header + one chunk, with the CRC32c checksum (little-endian on the wire)."""
    pkt = struct.pack("!HHII", sport, dport, vtag, 0) + chunk
    return pkt[:8] + struct.pack("<I", _crc32c(pkt)) + pkt[12:]


def _init_chunk(chunk_type: int, tag: int, params: bytes = b"") -> bytes:
    # type, flags, length, initiate tag, a_rwnd, outbound streams, inbound streams, initial TSN
    body = struct.pack("!IIHHI", tag, 65535, 1, 1, tag) + params
    return struct.pack("!BBH", chunk_type, 0, 4 + len(body)) + body


def _parse_sctp(data: bytes, family: socket.AddressFamily) -> tuple[int, int, int, int, int]:
    """(sport, dport, vtag, chunk type, initiate tag or 0) of a received packet; IPv4 raw
    sockets deliver the IP header too."""
    if family == socket.AF_INET:
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < 16:
        raise ValueError("short SCTP packet")
    sport, dport, vtag = struct.unpack("!HHI", data[:8])
    chunk_type = data[12]
    tag = struct.unpack("!I", data[16:20])[0] if len(data) >= 20 else 0
    return sport, dport, vtag, chunk_type, tag


def _raw_sctp(family: socket.AddressFamily, bind: str | None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_RAW, IPPROTO_SCTP)
    sock.setblocking(False)
    if bind:
        sock.bind((bind, 0))
    return sock


class _SctpResponder:
    """Answers INIT on one address: INIT-ACK on served ports, ABORT on the others."""

    def __init__(self, host: str) -> None:
        self.family = _family(host)
        self.ports: set[int] = set()
        self.sock = _raw_sctp(self.family, host)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                sport, dport, _, chunk_type, tag = _parse_sctp(data, self.family)
            except (ValueError, IndexError, struct.error):
                continue
            if chunk_type != SCTP_INIT:
                continue
            if dport in self.ports:
                cookie = struct.pack("!HH", 7, 8) + b"\0\0\0\1"  # a State Cookie parameter
                chunk = _init_chunk(SCTP_INIT_ACK, random.getrandbits(32) or 1, cookie)
            else:
                chunk = struct.pack("!BBH", SCTP_ABORT, 0, 4)
            with contextlib.suppress(OSError):
                self.sock.sendto(sctp_packet(dport, sport, tag, chunk), (addr[0], 0))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


_sctp_responders: dict[str, _SctpResponder] = {}


async def probe_sctp(dst: str, port: int, timeout: float, src: str | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    family = _family(dst)
    sport = random.randint(32768, 60999)
    tag = random.getrandbits(32) or 1
    init = sctp_packet(sport, port, 0, _init_chunk(SCTP_INIT, tag))
    wanted = socket.inet_pton(family, dst)
    with _raw_sctp(family, src) as sock:
        deadline = started + timeout
        next_send = started
        while (left := deadline - time.monotonic()) > 0:
            if time.monotonic() >= next_send:
                try:
                    sock.sendto(init, (dst, 0))
                except OSError as exc:
                    return _oserror(exc, started)
                next_send = time.monotonic() + UDP_RESEND_S
            wait = min(left, max(0.0, next_send - time.monotonic()))
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), wait)
            except TimeoutError:
                continue
            if socket.inet_pton(family, addr[0].split("%")[0]) != wanted:
                continue
            try:
                got_sport, got_dport, vtag, chunk_type, _ = _parse_sctp(data, family)
            except (ValueError, IndexError, struct.error):
                continue
            if (got_sport, got_dport, vtag) != (port, sport, tag):
                continue
            if chunk_type == SCTP_INIT_ACK:
                return _result("connected", "INIT-ACK received", started)
            if chunk_type == SCTP_ABORT:
                return _result("refused", "ABORT received", started)
    return _result("timeout", "no answer to INIT", started)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _result(outcome: str, detail: str, started: float) -> dict[str, Any]:
    return {"outcome": outcome, "detail": detail, "elapsed": round(time.monotonic() - started, 4)}


def _oserror(exc: OSError, started: float) -> dict[str, Any]:
    if exc.errno == errno.ECONNREFUSED:
        return _result("refused", "connection refused", started)
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return _result("error", f"{name}: {exc.strerror}", started)


def _socket(dst: str, kind: int, proto: int, src: str | None) -> socket.socket:
    sock = socket.socket(_family(dst), kind, proto)
    sock.setblocking(False)
    if src:
        sock.bind((src, 0))
    return sock


async def probe_tcp(dst: str, port: int, timeout: float, src: str | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with _socket(dst, socket.SOCK_STREAM, 0, src) as sock:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (dst, port)), timeout)
        except TimeoutError:
            return _result("timeout", "no answer to SYN", started)
        except OSError as exc:
            return _oserror(exc, started)
        remaining = max(0.05, timeout - (time.monotonic() - started))
        try:
            await loop.sock_sendall(sock, PAYLOAD)
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), remaining)
        except TimeoutError:
            return _result("timeout", "connected but no echo", started)
        except OSError as exc:
            return _oserror(exc, started)
        if not data:
            return _result("error", "connected but closed without echo", started)
        return _result("connected", "echo received", started)


async def probe_udp(dst: str, port: int, timeout: float, src: str | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with _socket(dst, socket.SOCK_DGRAM, 0, src) as sock:
        try:
            await loop.sock_connect(sock, (dst, port))
        except OSError as exc:
            return _oserror(exc, started)
        deadline = started + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                sock.send(PAYLOAD)
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), min(UDP_RESEND_S, left))
            except TimeoutError:
                continue
            except OSError as exc:
                return _oserror(exc, started)
            if data:
                return _result("connected", "echo received", started)
        return _result("timeout", "no UDP reply", started)


async def ping(dst: str, timeout: float, src: str | None) -> dict[str, Any]:
    """One ICMP echo over a ping socket (net.ipv4.ping_group_range is opened in sandbox netns)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    v6 = _family(dst) == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    seq = os.getpid() & 0xFFFF
    # A ping socket fills in the identifier and the checksum itself.
    packet = struct.pack("!BBHHH", request_type, 0, 0, 0, seq) + PAYLOAD
    with _socket(dst, socket.SOCK_DGRAM, proto, src) as sock:
        try:
            sock.connect((dst, 0))  # a datagram connect does not block
            sock.send(packet)
            deadline = started + timeout
            while (left := deadline - time.monotonic()) > 0:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                if len(data) >= 8 and data[0] == reply_type:
                    return _result("connected", "echo reply", started)
        except TimeoutError:
            pass
        except OSError as exc:
            return _oserror(exc, started)
    return _result("timeout", "no echo reply", started)


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await asyncio.wait_for(reader.read(4096), TCP_IDLE_S):
            writer.write(data)
            await writer.drain()
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve(proto: str, port: int, hosts: list[str]) -> str:
    loop = asyncio.get_running_loop()
    if (proto, port) in _servers:
        return "already serving"
    if proto == "sctp":
        for host in hosts:
            if host not in _sctp_responders:
                _sctp_responders[host] = _SctpResponder(host)
            _sctp_responders[host].ports.add(port)
        _servers[(proto, port)] = []
        return f"answering SCTP INIT on {port} at {','.join(hosts)}"
    handles: list[Any] = []
    try:
        for host in hosts:
            if proto == "tcp":
                handles.append(
                    await asyncio.start_server(_tcp_echo, host=host, port=port, reuse_address=True)
                )
            elif proto == "udp":
                transport, _ = await loop.create_datagram_endpoint(
                    _UdpEcho, local_addr=(host, port), family=_family(host)
                )
                handles.append(transport)
            else:
                raise ValueError(f"proto {proto!r} must be tcp or udp")
    except BaseException:
        for h in handles:
            h.close()
        raise
    _servers[(proto, port)] = handles
    return f"serving {proto}/{port} on {','.join(hosts)}"


async def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    src = req.get("src")
    if op == "probe":
        proto, dst, port, timeout = req["proto"], req["dst"], int(req["port"]), req["timeout"]
        if proto == "tcp":
            return await probe_tcp(dst, port, float(timeout), src)
        if proto == "udp":
            return await probe_udp(dst, port, float(timeout), src)
        if proto == "sctp":
            return await probe_sctp(dst, port, float(timeout), src)
        return _result(
            "error", f"proto {proto!r} is not supported by the sandbox", time.monotonic()
        )
    if op == "ping":
        return await ping(req["dst"], float(req["timeout"]), src)
    if op == "serve":
        return {"detail": await serve(req["proto"], int(req["port"]), list(req["hosts"]))}
    raise ValueError(f"op {op!r} must be probe, ping or serve")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _run_one(req: dict[str, Any]) -> None:
    rid = req.get("id")
    try:
        reply = await handle(req)
    except Exception as exc:
        _emit({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    else:
        _emit({"id": rid, "ok": True, **reply})


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"ready": True, "pid": os.getpid()})
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        try:
            req = json.loads(line)
        except ValueError as exc:
            _emit({"id": None, "ok": False, "error": f"bad request line: {exc}"})
            continue
        task = asyncio.create_task(_run_one(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
