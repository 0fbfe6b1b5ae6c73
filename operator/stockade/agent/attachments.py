"""Attach the node's programs to every local endpoint's host-side interface, and detach from
interfaces whose endpoint is gone.

`stockade.agent.sync` calls `Attachments.reconcile(endpoints, programs, bindings)` on every
sync. For each endpoint it finds the host-side interface (`stockade.datapath.iface`: the route to
the pod, or a bridge's neighbour table and FDB; on a bridge whose neighbour entry is missing it
first makes the node resolve the pod's address), binds the interface's ifindex to the endpoint
in the `bindings` map (`stockade.datapath.maps.Bindings`: the programs drop what a pod sends
from an address that is not its own) and attaches both hooks: tc ingress of the host veth runs
the pod's egress program (`Hook.FROM_POD`), tc egress runs `Hook.TO_POD`. Links are pinned at
`<pin root>/links/<interface>/<program>` so that a restarted agent re-adopts them: a link that
already runs the wanted program is left alone, one that runs another program is updated in place
(BPF_LINK_UPDATE, atomic); nothing is ever detached to be attached again.

Only links pinned under the agent's own pin root are ever detached: never another tc filter.
Interface lookups and attach run on the node namespace's thread (`NetnsExecutor`) when the agent
lives outside that namespace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from stockade.compiler.ir import IPAddress
from stockade.compiler.render import Hook
from stockade.datapath import attach, libbpf
from stockade.datapath.iface import (
    HostInterface,
    InterfaceNotFoundError,
    LinkEvents,
    host_interface,
    interface_at,
    node_addresses,
    peer_ifindex,
    pod_veths,
)
from stockade.datapath.maps import Bindings
from stockade.datapath.netns import NetnsExecutor

log = logging.getLogger(__name__)

LINKS_DIR = "links"
POINTS = {Hook.FROM_POD: attach.AttachPoint.INGRESS, Hook.TO_POD: attach.AttachPoint.EGRESS}
RESOLVE_ATTEMPTS = 20
RESOLVE_PAUSE = 0.05
DISCARD_PORT = 9
T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """A local pod as the tables name it: its endpoint id and addresses."""

    endpoint_id: int
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class Failure:
    endpoint: Endpoint
    reason: str  # a short CamelCase reason for Events
    message: str


@dataclass
class AttachResult:
    attached: dict[int, str] = field(default_factory=dict)  # endpoint id -> interface
    failures: list[Failure] = field(default_factory=list)
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    detached: list[str] = field(default_factory=list)  # interfaces
    ifindexes: set[int] = field(default_factory=set)  # of the attached endpoints' interfaces
    seconds_per_new_interface: list[float] = field(default_factory=list)


def _resolve_neighbour(address: IPAddress) -> None:
    """Make this namespace resolve `address` (a datagram to its discard port triggers ARP/NDP,
    which also teaches the bridge the pod's port)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"", (str(address), DISCARD_PORT))


def find_interface(endpoint: Endpoint, attempts: int = RESOLVE_ATTEMPTS) -> HostInterface:
    """The endpoint's host-side interface from the first address that resolves; an address
    whose neighbour is not resolved yet is tried `attempts` times, RESOLVE_PAUSE apart."""
    problems = []
    for address in sorted(endpoint.addresses, key=lambda a: a.version):
        for attempt in range(attempts):
            try:
                return host_interface(address)
            except InterfaceNotFoundError as exc:
                if "neighbours" not in str(exc) and "FDB" not in str(exc):
                    problems.append(str(exc))
                    break
                if attempt == attempts - 1:
                    problems.append(str(exc))
                    break
                _resolve_neighbour(address)
                time.sleep(RESOLVE_PAUSE)
    raise InterfaceNotFoundError("; ".join(problems) or "endpoint has no address")


def pin_folder(ifname: str) -> str:
    """The pin folder of an interface (bpffs reserves dots in names, interface names may hold
    them; '%' never appears in an interface name)."""
    return ifname.replace("%", "%25").replace(".", "%2e")


def ifname_of(folder: str) -> str:
    return folder.replace("%2e", ".").replace("%25", "%")


@dataclass(frozen=True)
class PinnedLink:
    ifindex: int  # 0 when the interface is gone (the kernel detached the link)
    prog_id: int
    attach_type: int


def read_link(pin: Path) -> PinnedLink | None:
    try:
        fd = libbpf.obj_get(pin)
    except OSError:
        return None
    try:
        info = libbpf.link_info(fd)
        return PinnedLink(info.ifindex, info.prog_id, info.attach_type)
    finally:
        os.close(fd)


class Attachments:
    """The links of one agent, under `<pin_root>/links`."""

    def __init__(self, pin_root: Path, executor: NetnsExecutor | None = None) -> None:
        self.root = pin_root / LINKS_DIR
        self._executor = executor
        # Interfaces found in earlier syncs: trusted while their links are alive on that
        # ifindex (a deleted veth leaves its link with ifindex 0), so a sync does not look up
        # every pod's route again.
        self._found: dict[tuple[IPAddress, ...], HostInterface] = {}
        # Looked up by `prefetch` before a sync's apply: an interface, or why it was not found.
        self._prefetched: dict[tuple[IPAddress, ...], HostInterface | str] = {}
        self._resolver: NetnsExecutor | None = None
        self._looked_ahead = False  # a prefetch ran for the coming reconcile
        self.lookups = 0

    def _run(self, fn: Callable[[], T]) -> T:
        return self._executor.run(fn) if self._executor is not None else fn()

    def node_addresses(self) -> list[IPAddress]:
        """The addresses of the node's own stack (its netns), as `iface.node_addresses`."""
        return self._run(node_addresses)

    def pod_veths(self) -> dict[int, str]:
        """The node namespace's pod-side veths (`iface.pod_veths`), ifindex -> name."""
        return self._run(pod_veths)

    def link_events(self) -> LinkEvents:
        """A netlink socket in the node namespace subscribed to link changes (RTM_NEWLINK)."""
        return self._run(LinkEvents)

    def pinned_interfaces(self) -> list[str]:
        """Interfaces with links pinned under this agent's root."""
        if not self.root.is_dir():
            return []
        return sorted(ifname_of(p.name) for p in self.root.iterdir())

    def reconcile(
        self,
        endpoints: Sequence[Endpoint],
        programs: Mapping[Hook, tuple[int, int]],
        bindings: Bindings,
        pending: Collection[int] = (),
    ) -> AttachResult:
        """Bind every endpoint's interface to it and attach `programs` (hook -> (fd, id)) there;
        detach and unbind the rest, except the interfaces in `pending` (ifindexes of pods
        attached before their tables arrived: see `stockade.agent.pending`)."""
        return self._run(lambda: self._reconcile(endpoints, programs, bindings, pending))

    def prefetch(self, endpoints: Sequence[Endpoint]) -> None:
        """Look up the interfaces of endpoints no earlier sync found, before the sync's apply
        takes its lock: on a bridge a lookup may wait up to a second for the node to resolve
        the pod's address, and a CNI ADD must not wait for that. It runs on a thread of its own
        in the node's namespace, so the one that attaches is free meanwhile. `reconcile` uses
        what it found (and does not retry what it did not). An interface found before whose
        links are gone (the pod was deleted, its endpoint not yet) is looked up again here too:
        left to `reconcile`, that lookup waited out its retries (two seconds on a bridge) under
        the lock, and every CNI ADD meanwhile with it."""
        self._looked_ahead = True
        wanted = [
            e
            for e in endpoints
            if e.addresses not in self._found or not self._alive(self._found[e.addresses])
        ]
        if not wanted:
            self._prefetched = {}
            return

        def look() -> dict[tuple[IPAddress, ...], HostInterface | str]:
            out: dict[tuple[IPAddress, ...], HostInterface | str] = {}
            for endpoint in wanted:
                self.lookups += 1
                try:
                    out[endpoint.addresses] = find_interface(endpoint)
                except InterfaceNotFoundError as exc:
                    out[endpoint.addresses] = str(exc)
            return out

        if self._executor is None:
            self._prefetched = look()
            return
        if self._resolver is None:
            self._resolver = NetnsExecutor(self._executor.path)
        self._prefetched = self._resolver.run(look)

    def close(self) -> None:
        if self._resolver is not None:
            self._resolver.close()
            self._resolver = None

    def attach_interface(self, ifindex: int, programs: Mapping[Hook, tuple[int, int]]) -> str:
        """Attach `programs` to the interface `ifindex` (a pending pod's); its name."""

        def attach_one() -> str:
            found = interface_at(ifindex)
            self._attach(found, programs, AttachResult())
            return found.name

        return self._run(attach_one)

    def host_ifindex(self, pod_netns: Path, ifname: str) -> int:
        """The node-side ifindex of the veth `ifname` of the pod's namespace `pod_netns`."""
        return peer_ifindex(pod_netns, ifname)

    def _reconcile(
        self,
        endpoints: Sequence[Endpoint],
        programs: Mapping[Hook, tuple[int, int]],
        bindings: Bindings,
        pending: Collection[int] = (),
    ) -> AttachResult:
        result = AttachResult()
        bound = bindings.read()
        wanted: set[str] = set()
        found_now: dict[tuple[IPAddress, ...], HostInterface] = {}
        for endpoint in endpoints:
            known = self._found.get(endpoint.addresses)
            prefetched = self._prefetched.get(endpoint.addresses)
            if known is not None and self._alive(known):
                found = known
            elif isinstance(prefetched, HostInterface):
                found = prefetched
            elif isinstance(prefetched, str):  # not found just now: the next sync looks again
                result.failures.append(Failure(endpoint, "InterfaceNotFound", prefetched))
                continue
            else:
                try:
                    self.lookups += 1
                    # After a prefetch, only an interface that went away since (its pod was
                    # deleted while the sync waited for the lock) comes here: one look, no
                    # waiting for a neighbour under the lock; the next sync looks again.
                    found = find_interface(endpoint, 1 if self._looked_ahead else RESOLVE_ATTEMPTS)
                except InterfaceNotFoundError as exc:
                    result.failures.append(Failure(endpoint, "InterfaceNotFound", str(exc)))
                    continue
            found_now[endpoint.addresses] = found
            wanted.add(found.name)
            began = time.monotonic()
            try:
                # Bound before the programs run there: they drop what an unbound interface sends.
                if bound.get(found.ifindex) != endpoint.endpoint_id:
                    bindings.bind(found.ifindex, endpoint.endpoint_id)
                fresh = self._attach(found, programs, result)
            except OSError as exc:
                result.failures.append(
                    Failure(endpoint, "AttachFailed", f"attach to {found.name}: {exc}")
                )
                continue
            if fresh:
                result.seconds_per_new_interface.append(time.monotonic() - began)
            result.attached[endpoint.endpoint_id] = found.name
            result.ifindexes.add(found.ifindex)
        self._found = found_now
        self._prefetched = {}
        self._looked_ahead = False
        for name in self.pinned_interfaces():
            if name in wanted or (pending and self._on_any(name, pending)):
                continue
            # A failed lookup may hide an endpoint's interface: then only links whose interface
            # is gone are dropped, live ones stay until the endpoint is known to be gone.
            if result.failures and not self._defunct(name):
                continue
            self._detach(name)
            result.detached.append(name)
        # Bindings of interfaces no endpoint has now: unbound once their links are gone (an
        # ifindex may come back on another pod's veth, which is bound before it is attached).
        live = {found.ifindex for found in found_now.values()}
        attached = set(self._attached_ifindexes())
        for ifindex in bound.keys() - live - attached:
            bindings.unbind(ifindex)
        return result

    def _attached_ifindexes(self) -> list[int]:
        """The interfaces that still carry a link pinned under this agent's root."""
        out = []
        for name in self.pinned_interfaces():
            for pin in (self.root / pin_folder(name)).iterdir():
                link = read_link(pin)
                if link is not None and link.ifindex:
                    out.append(link.ifindex)
        return out

    def _attach(
        self, found: HostInterface, programs: Mapping[Hook, tuple[int, int]], result: AttachResult
    ) -> bool:
        """Both hooks of one interface; True when a link had to be created."""
        created = False
        for hook, point in POINTS.items():
            fd, prog_id = programs[hook]
            pin = self.root / pin_folder(found.name) / hook.program
            link = read_link(pin)
            if link is not None and (link.ifindex, link.attach_type) == (
                found.ifindex,
                point.tcx_attach_type,
            ):
                if link.prog_id == prog_id:
                    result.unchanged += 1
                    continue
                result.updated += 1
            else:
                result.created += 1
                created = True
            attach.attach(found.ifindex, point, fd, pin, hook.program)
        return created

    def _on_any(self, name: str, ifindexes: Collection[int]) -> bool:
        """Some link pinned for interface `name` sits on one of `ifindexes`."""
        for pin in (self.root / pin_folder(name)).iterdir():
            link = read_link(pin)
            if link is not None and link.ifindex in ifindexes:
                return True
        return False

    def attached_ifindexes(self) -> set[int]:
        return set(self._attached_ifindexes())

    def _alive(self, found: HostInterface) -> bool:
        """Both links of a previously found interface still sit on its ifindex."""
        for hook in POINTS:
            link = read_link(self.root / pin_folder(found.name) / hook.program)
            if link is None or link.ifindex != found.ifindex:
                return False
        return True

    def _defunct(self, name: str) -> bool:
        links = [read_link(p) for p in (self.root / pin_folder(name)).iterdir()]
        return all(link is None or link.ifindex == 0 for link in links)

    def _detach(self, name: str) -> None:
        folder = self.root / pin_folder(name)
        for pin in folder.iterdir():
            try:
                attach.detach_tcx(pin)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        folder.rmdir()
        log.info("detached from %s", name)
