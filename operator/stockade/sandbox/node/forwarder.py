"""A TCP forwarder from inside a node's network namespace to the API server on the machine's
loopback.

The sandbox API server listens on 127.0.0.1 of the machine's own namespace, which a process in a
node namespace (kube-proxy) cannot reach. This process runs in the machine's namespace, opens its
listening socket inside the node namespace (setns there, bind and listen, setns back: a socket
stays in the namespace it was made in) and relays every accepted connection to the target address
in the machine's namespace, bytes both ways, TLS untouched. Nothing is routed between the
namespaces and the node gets no new link or address.

Started by `stockade.sandbox.node.proxy.NodeProxies` as `python -I forwarder.py --netns NAME
--listen 127.0.0.1:6443 --target 127.0.0.1:PORT --ready-file PATH` (standard library only); it
creates the ready file once it listens and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import socket
import sys
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
CHUNK = 65536


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"{flag} {text!r} must be HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def listen_in(netns: str, address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket bound to `address` inside namespace `netns`; the calling thread is
    back in its own namespace when this returns."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(address)
            server.listen(64)
        finally:
            _setns(own)
    finally:
        os.close(own)
    return server


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _relay(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError as exc:
        print(f"forwarder: cannot reach {target[0]}:{target[1]}: {exc}", file=sys.stderr)
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def serve(server: socket.socket, target: tuple[str, int]) -> None:
    """Accept for ever; each connection is relayed to `target` by its own threads."""
    while True:
        client, _ = server.accept()
        threading.Thread(target=_relay, args=(client, target), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--netns", required=True, help="the node namespace to listen in")
    parser.add_argument("--listen", required=True, help="HOST:PORT inside that namespace")
    parser.add_argument("--target", required=True, help="HOST:PORT in this process's namespace")
    parser.add_argument("--ready-file", type=Path, required=True, help="created once listening")
    args = parser.parse_args(argv)
    listen = _address(args.listen, "--listen")
    target = _address(args.target, "--target")
    if not (NETNS_DIR / args.netns).exists():
        raise SystemExit(f"--netns {args.netns!r}: no such namespace in {NETNS_DIR}")
    server = listen_in(args.netns, listen)
    args.ready_file.write_text(f"{os.getpid()}\n")
    print(f"forwarder: {args.netns} {args.listen} -> {args.target}", flush=True)
    serve(server, target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
