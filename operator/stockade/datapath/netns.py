"""Run kernel work inside another network namespace from a process that stays in its own.

The agent runs in the root namespace and attaches programs inside a node's namespace (in the
sandbox; on a real node this is the root namespace itself). Netlink sockets and the tcx
BPF_LINK_CREATE resolve interface indexes in the calling thread's namespace, so the work runs on
a dedicated thread that entered the namespace with setns(2) and never leaves it. BPF map and
program fds are not per-namespace and can be shared with that thread freely.

`socket_in` is the cheap way for one query in a namespace visited once (a new pod's, on CNI
ADD): a socket belongs to the namespace it was made in, so the calling thread enters the
namespace only for the socket(2) call and returns at once; no thread is started.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int

P = ParamSpec("P")
T = TypeVar("T")


def _enter(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsExecutor:
    """A single thread living in the network namespace at `path` (e.g. /run/netns/<name>)."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"network namespace {path} does not exist")
        self.path = path
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns-{path.name}",
            initializer=_enter,
            initargs=(path,),
        )

    @classmethod
    def named(cls, name: str) -> NetnsExecutor:
        return cls(NETNS_RUN_DIR / name)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` in the namespace and return its result (or raise its exception)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NetnsExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def socket_in(path: Path, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket made in the network namespace at `path` (it stays there whatever thread uses
    it); the calling thread is back in its own namespace when this returns, or it raises."""
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {path}: {os.strerror(err)}")
        try:
            return socket.socket(family, kind, proto)
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                # The thread would go on in the pod's namespace: nothing it does is safe.
                raise SystemExit(f"setns back from {path}: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)
