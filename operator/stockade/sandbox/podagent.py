"""The helper process that runs inside one sandbox pod (or node) network namespace.

`stockade.sandbox.workload` starts one per namespace with `ip netns exec NS python podagent.py`
and talks to it over stdin/stdout, one JSON object per line. The agent serves TCP and UDP echo
ports and runs probes (TCP connect + echo, UDP echo, ICMP echo) concurrently with asyncio, so a
batch of probes costs about one probe timeout. It exits when its stdin closes.

Requests:  {"id": N, "op": "serve", "proto": "tcp"|"udp", "port": P, "hosts": [ip, ...]}
           {"id": N, "op": "probe", "proto": "tcp"|"udp", "dst": ip, "port": P, "timeout": s,
            "src": ip|null}
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
import socket
import struct
import sys
import time
from typing import Any

PAYLOAD = b"stockade-probe\n"
UDP_RESEND_S = 0.25
TCP_IDLE_S = 10.0

_servers: dict[tuple[str, int], list[Any]] = {}


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
