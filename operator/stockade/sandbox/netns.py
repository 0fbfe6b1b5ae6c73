"""Kernel plumbing for the sandbox's network namespaces: create and remove named namespaces, set
per-namespace sysctls, open netlink sockets inside a namespace, create veth pairs whose ends are
born inside their namespaces, and find or kill the processes that live in a namespace.

`stockade.sandbox.topology` composes these into nodes and pods; nothing here knows about either.
Nothing in this module ever adds a link, address or route to the machine's own namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ_MAX = 15
# Keep IPv6 addresses usable at once: no duplicate address detection.
IFA_F_NODAD = 0x02


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the namespace and the step."""


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


def check_ifname(name: str) -> str:
    """Return `name` if it is a valid interface name (1..15 chars, no '/' or whitespace)."""
    if not 0 < len(name) <= IFNAMSIZ_MAX or any(c in name for c in "/ \t\n:"):
        raise NetnsError(f"interface name {name!r} must be 1..{IFNAMSIZ_MAX} chars, no '/', ':'")
    return name


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_names(prefix: str = "") -> list[str]:
    """Names of the namespaces under /var/run/netns that start with `prefix`."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def create(name: str, sysctls: Mapping[str, str] | None = None) -> None:
    """Create the namespace `name`, bring its loopback up and apply `sysctls` inside it."""
    if exists(name):
        raise NetnsError(f"netns {name!r} already exists")
    try:
        _netns.create(name)
    except OSError as exc:
        raise NetnsError(f"netns {name!r}: create failed: {exc}") from exc
    if sysctls:
        set_sysctls(name, sysctls)
    with ipr(name) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> bool:
    """Kill every process in the namespace, then unmount and unlink it. Idempotent."""
    if not exists(name):
        return False
    kill_processes(name)
    try:
        _netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NetnsError(f"netns {name!r}: remove failed: {exc}") from exc
    return True


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name` (setns is per thread)."""
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(saved)
    finally:
        os.close(saved)


def made_inside(name: str, make: Callable[[], T]) -> T:
    """`make()` run by a thread of its own inside namespace `name`, for what must be created
    there (a socket stays in the namespace it was made in): setns is per thread, so the calling
    thread never changes namespace. Its exception, if any, is raised here."""
    made: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with entered(name):
                made.append(make())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name=f"in-netns-{name}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def set_sysctls(name: str, sysctls: Mapping[str, str]) -> None:
    """Write `sysctls` (dotted keys, e.g. "net.ipv4.ip_forward") inside namespace `name`."""
    with entered(name):
        for key, value in sysctls.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(value)
            except OSError as exc:
                raise NetnsError(f"netns {name!r}: sysctl {key}={value}: {exc}") from exc


@contextlib.contextmanager
def ipr(name: str) -> Iterator[Any]:
    """An `IPRoute` whose netlink socket lives inside namespace `name`."""
    ip = IPRoute(netns=name)
    try:
        yield ip
    finally:
        ip.close()


def link_index(ip: Any, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"link {ifname!r} not found")
    return int(found[0])


def add_veth(ns_a: str, name_a: str, ns_b: str, name_b: str, mac_a: str | None = None) -> None:
    """Create a veth pair with end `name_a` born in `ns_a` and its peer `name_b` in `ns_b`."""
    check_ifname(name_a)
    check_ifname(name_b)
    peer: dict[str, Any] = {"ifname": name_b, "net_ns_fd": str(NETNS_DIR / ns_b)}
    spec: dict[str, Any] = {"ifname": name_a, "kind": "veth", "peer": peer}
    if mac_a is not None:
        spec["address"] = mac_a
    with ipr(ns_a) as ip:
        try:
            ip.link("add", **spec)
        except Exception as exc:
            raise NetnsError(f"veth {name_a}@{ns_a} <-> {name_b}@{ns_b}: {exc}") from exc


def add_address(ip: Any, index: int, cidr: str) -> None:
    """Add `cidr` (address/prefix) to link `index`, without DAD for IPv6."""
    address, prefix = cidr.split("/")
    kwargs: dict[str, Any] = {"index": index, "address": address, "prefixlen": int(prefix)}
    if ":" in address:
        kwargs["flags"] = IFA_F_NODAD
    ip.addr("add", **kwargs)


def netns_inode(name: str) -> int | None:
    try:
        return (NETNS_DIR / name).stat().st_ino
    except FileNotFoundError:
        return None


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is `name` (found by the namespace inode)."""
    inode = netns_inode(name)
    if inode is None:
        return []
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_processes(name: str, wait_s: float = 2.0) -> list[int]:
    """SIGKILL every process inside namespace `name` and wait until they are gone."""
    pids = pids_in(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.01)
    return pids


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie has released its namespaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of `pid`, to tell a live owner from a reused id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    """True if `pid` runs and, when `start_time` is given, is the same process that started then."""
    if not _alive(pid):
        return False
    return start_time is None or process_start_time(pid) == start_time


def ignore_missing(exc: BaseException) -> bool:
    """True for netlink errors that mean "already gone" (used by idempotent teardown)."""
    code = getattr(exc, "code", None)
    return code in (errno.ENODEV, errno.ENOENT, errno.ESRCH)


# -- run records and exit cleanup -----------------------------------------------------------------
# A run (one Topology) writes a JSON record under state_dir() naming its owner process, so that a
# later process can destroy it or, once the owner is dead, remove it as a leftover. Live runs of
# this process are destroyed at interpreter exit; SIGTERM is turned into SystemExit so that exit
# cleanup runs too (SIGINT already raises KeyboardInterrupt, which unwinds the same way).


@dataclass(frozen=True)
class Owner:
    """The process that owns a run: its pid and start time (so a reused pid is not mistaken)."""

    pid: int
    start: int | None

    @classmethod
    def of(cls, pid: int) -> Owner:
        return cls(pid=pid, start=process_start_time(pid))

    @classmethod
    def current(cls) -> Owner:
        return cls.of(os.getpid())

    def alive(self) -> bool:
        return process_alive(self.pid, self.start)


def state_dir() -> Path:
    """Where run records live: $STOCKADE_SANDBOX_STATE, else /run/stockade/sandbox/netns."""
    env = os.environ.get("STOCKADE_SANDBOX_STATE")
    return Path(env) if env else Path("/run/stockade/sandbox/netns")


def record_path(run_id: str) -> Path:
    return state_dir() / f"{run_id}.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a topology record must be a JSON object")
    return data


def read_record(run_id: str) -> dict[str, Any] | None:
    try:
        return read_json(record_path(run_id))
    except (OSError, ValueError):
        return None


def delete_record(run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(run_id).unlink()


def recorded_runs() -> list[str]:
    d = state_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


_live: dict[str, Callable[[], None]] = {}
_live_lock = threading.Lock()
_hooks_installed = False
_hooks_pid = 0


def register(run_id: str, destroy: Callable[[], None]) -> None:
    """Destroy run `run_id` at exit of this process unless it is unregistered first."""
    global _hooks_installed, _hooks_pid
    with _live_lock:
        _live[run_id] = destroy
        if not _hooks_installed:
            _hooks_installed = True
            _hooks_pid = os.getpid()
            atexit.register(_destroy_live, os.getpid())
            main = threading.current_thread() is threading.main_thread()
            if main and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _raise_exit)


def unregister(run_id: str) -> None:
    with _live_lock:
        _live.pop(run_id, None)


def live_runs() -> list[str]:
    with _live_lock:
        return list(_live)


def _destroy_live(pid: int) -> None:
    if os.getpid() != pid:  # a forked child must not tear down its parent's runs
        return
    for run_id in live_runs():
        with _live_lock:
            destroy = _live.get(run_id)
        if destroy is not None:
            with contextlib.suppress(Exception):
                destroy()


def _raise_exit(signum: int, _frame: object) -> None:
    if os.getpid() != _hooks_pid:
        # A forked helper (pyroute2 forks to enter namespaces) must die as if untouched, never
        # unwind its copy of the parent's stack, which could run the parent's teardown code.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)
