"""Pods the agent attached before their tables were applied: the pending state.

`stockade.agent.cniserver` calls `PendingPods.add()` for a CNI ADD relayed by stockade-cni. It finds
the pod's host-side veth from the container interface the chain's result names (its peer's
ifindex: `stockade.datapath.iface.peer_ifindex`), marks that ifindex PENDING_CLOSED in the pinned
`pending` map and attaches both programs there, all before answering, so the pod's first packet
meets them. The backstop's link watch (`stockade.agent.backstop`) has usually done just that
already, when the primary plugin made the veth: then the ADD writes nothing and waits for no
sync. Its writes otherwise hold the Syncer's `apply_lock`, not the agent's sync lock. It then
waits, up to the budget, until a sync has applied tables that make the pod an endpoint on that
interface: `Syncer` calls `released()` with the interfaces it cleared from
the `pending` map (an interface leaves it only once its endpoint, binding and policy entries are
written and its links carry them).

The ADD itself waits only the first `add_wait` of the budget (none by default), then returns
with the pod still closed, and the rest of the budget runs on: a pod's address reaches the API
server only when the kubelet writes the Pod's status, after ADD returned, so the operator cannot
publish tables naming it before that, and blocking ADD for them would delay every pod start by
the whole budget for nothing (measured on the sandbox: every ADD ran out a 2 s budget, the tables
arrived about 0.3 s later). When the budget runs out, the pod stays PENDING_CLOSED (fail
closed) and is released the moment its tables arrive, or, with `fail_open`, is set
PENDING_OPEN (everything passes until its tables arrive); either way a Warning Event goes on the
Pod and the counters below go up.

A pod whose namespace the applied program lists as fast-open (`stockade.model.fastopen`: no
namespaced policy there, no cluster-scoped policy whose subject can hold it; the operator
publishes the list in every node's program part) is marked PENDING_OPEN at once instead: it is
judged as with no policy anyway, so it waits for nothing and no budget runs. The list is the
one of the last applied generation: a policy made in that namespace moments before takes effect
on the pod when its tables arrive, as for any pod it selects.

The `pending` map is the state: it is pinned, so a restarted agent finds every pending
interface there, keeps its links, and releases it on the sync that applies its tables.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stockade.agent.attachments import Attachments
from stockade.agent.sync import Syncer
from stockade.compiler.abi import PendingState
from stockade.compiler.ir import IPAddress
from stockade.datapath.maps import Pending

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 2.0  # seconds a pod may stay pending before the setting applies
DEFAULT_ADD_WAIT = 0.0  # seconds of the budget the ADD itself waits before it returns


class CniRequestError(ValueError):
    """A relayed CNI request that cannot be acted on; the message names the field."""


@dataclass(frozen=True)
class CniRequest:
    """One command relayed by stockade-cni (cni/main.go documents the wire format)."""

    command: str  # ADD, CHECK or DEL
    container_id: str
    netns: str  # a path, e.g. /var/run/netns/<name>; may be empty on DEL
    ifname: str
    args: Mapping[str, str]  # CNI_ARGS
    config: Mapping[str, Any]  # the network configuration, prevResult included

    @classmethod
    def parse(cls, data: object) -> CniRequest:
        if not isinstance(data, dict):
            raise CniRequestError("request: must be a JSON object")
        command = data.get("command")
        if command not in ("ADD", "CHECK", "DEL"):
            raise CniRequestError(f"request field 'command': ADD, CHECK or DEL, got {command!r}")
        fields = {}
        for key in ("containerID", "netns", "ifName", "args"):
            value = data.get(key, "")
            if not isinstance(value, str) or len(value) > 4096:
                raise CniRequestError(f"request field {key!r}: must be a string")
            fields[key] = value
        if not fields["containerID"]:
            raise CniRequestError("request field 'containerID': must not be empty")
        config = data.get("config")
        if not isinstance(config, dict):
            raise CniRequestError("request field 'config': must be the network configuration")
        args = {}
        for pair in filter(None, fields["args"].split(";")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise CniRequestError(f"request field 'args': {pair!r} is not KEY=VALUE")
            args[key] = value
        return cls(command, fields["containerID"], fields["netns"], fields["ifName"], args, config)

    @property
    def pod(self) -> tuple[str, str, str]:
        """(namespace, name, uid) from CNI_ARGS, empty strings when the runtime gave none."""
        a = self.args
        return a.get("K8S_POD_NAMESPACE", ""), a.get("K8S_POD_NAME", ""), a.get("K8S_POD_UID", "")

    def addresses(self) -> tuple[IPAddress, ...]:
        """The pod's addresses from the previous result (`ips[].address`, CIDR form)."""
        prev = self.config.get("prevResult")
        if not isinstance(prev, dict):
            raise CniRequestError("config field 'prevResult': missing (chain stockade-cni last)")
        out: list[IPAddress] = []
        for i, entry in enumerate(prev.get("ips") or []):
            try:
                out.append(ipaddress.ip_interface(str(entry["address"])).ip)
            except (KeyError, TypeError, ValueError) as exc:
                raise CniRequestError(f"prevResult field 'ips[{i}].address': {exc}") from exc
        return tuple(out)


class Phases:
    """Where one ADD's time went: milliseconds per phase, in the order they ran."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._mark = time.monotonic()

    def lap(self, phase: str) -> None:
        """The time since the last lap (or since this stopwatch was made) is `phase`'s."""
        now = time.monotonic()
        self.ms[phase] = round(self.ms.get(phase, 0.0) + (now - self._mark) * 1000, 3)
        self._mark = now


class Datapath(Protocol):
    """What PendingPods needs of the agent's datapath (`stockade.agent.app` provides it)."""

    def host_ifindex(self, netns: Path, ifname: str) -> int: ...
    def open_namespaces(self) -> frozenset[str]: ...
    def attach_pending(self, ifindex: int, state: PendingState, phases: Phases) -> str: ...
    def set_pending(self, ifindex: int, state: PendingState) -> None: ...
    def is_pending(self, ifindex: int) -> bool: ...
    def forget(self, ifindex: int) -> None: ...


class AgentDatapath:
    """`Datapath` over the agent's own Syncer and Attachments. Its writes hold the Syncer's
    `apply_lock`, so that a sync never sees an interface marked pending without its links, nor
    attaches with programs it is replacing; they do not wait for the rest of a sync (assembling
    the set, reporting status to the API server)."""

    def __init__(
        self,
        syncer: Syncer,
        attachments: Attachments,
        taken: Callable[[int], tuple[PendingState, str] | None] | None = None,
    ) -> None:
        self.syncer = syncer
        self.attachments = attachments
        self.lock = syncer.apply_lock
        # `Backstop.taken_as`: the link watch usually puts a new pod's veth in the pending
        # state milliseconds after the CNI plugin made it, before stockade-cni's ADD comes.
        self.taken = taken

    def host_ifindex(self, netns: Path, ifname: str) -> int:
        return self.attachments.host_ifindex(netns, ifname)

    def open_namespaces(self) -> frozenset[str]:
        """Where a new pod may open at once, as the applied program lists them (the set in force
        is replaced whole by a sync: read without a lock, it is the one before or after)."""
        current = self.syncer.current
        return current.program.open_namespaces if current is not None else frozenset()

    def attach_pending(self, ifindex: int, state: PendingState, phases: Phases) -> str:
        """Mark `ifindex` pending, then attach the programs there. When the backstop has done
        just that already (same state, links attached), nothing is left to do: the ADD then
        waits for no sync in progress."""
        already = self.taken(ifindex) if self.taken is not None else None
        maps = self.syncer.maps
        if (
            already is not None
            and already[0] is state
            and maps is not None
            and Pending(maps).state(ifindex) is state  # not released nor forgotten since
        ):
            phases.lap("taken_by_backstop")
            return already[1]
        with self.lock:
            phases.lap("lock_wait")
            maps = self.syncer.maps
            programs = {hook: (p.fd, p.id) for hook, p in self.syncer.programs.programs.items()}
            if maps is None or not programs:
                raise RuntimeError(
                    "the agent has applied no tables yet: no programs to attach the pod to"
                )
            Pending(maps).mark(ifindex, state)
            phases.lap("map_write")
            name = self.attachments.attach_interface(ifindex, programs)
            phases.lap("attach")
            return name

    def set_pending(self, ifindex: int, state: PendingState) -> None:
        with self.lock:
            maps = self.syncer.maps
            if maps is not None and ifindex in Pending(maps).read():
                Pending(maps).mark(ifindex, state)

    def is_pending(self, ifindex: int) -> bool:
        with self.lock:
            maps = self.syncer.maps
            return maps is not None and ifindex in Pending(maps).read()

    def forget(self, ifindex: int) -> None:
        with self.lock:
            if self.syncer.maps is not None:
                Pending(self.syncer.maps).clear(ifindex)


@dataclass
class PendingStats:
    adds: int = 0
    released_in_budget: int = 0
    woken_by_sync: int = 0  # waiting ADDs a sync's release ended
    budget_out_closed: int = 0  # stayed pending after the budget (fail closed)
    budget_out_open: int = 0  # set open after the budget (fail open)
    add_failures: int = 0
    fast_open: int = 0  # opened at once: their namespace is one no policy can select
    add_seconds: list[float] = field(default_factory=list)
    last_add: dict[str, object] = field(default_factory=dict)  # the last ADD's phases, in ms


@dataclass
class _Waiter:
    ifindex: int
    done: threading.Event = field(default_factory=threading.Event)


class PendingPods:
    def __init__(
        self,
        datapath: Datapath,
        request_sync: Callable[[], None],
        event: Callable[[str, str, str, str, str], None] | None = None,
        budget: float = DEFAULT_BUDGET,
        fail_open: bool = False,
        add_wait: float = DEFAULT_ADD_WAIT,
    ) -> None:
        self.add_wait = add_wait
        self.datapath = datapath
        self.request_sync = request_sync
        self.event = event
        self.budget = budget
        self.fail_open = fail_open
        self.stats = PendingStats()
        self._lock = threading.Lock()
        self._waiters: dict[int, list[_Waiter]] = {}
        self._containers: dict[str, int] = {}  # container id -> the ifindex its ADD attached

    def handle(self, req: CniRequest) -> None:
        """Act on one relayed command; raises with a message for the runtime on failure."""
        if req.command == "ADD":
            self.add(req)
        elif req.command == "DEL":
            self.delete(req)
        else:
            self.check(req)

    def add(self, req: CniRequest) -> None:
        began = time.monotonic()
        phases = Phases()
        self.stats.adds += 1
        try:
            req.addresses()  # the result must name the pod's addresses
            if not req.netns or not req.ifname:
                raise CniRequestError("ADD needs CNI_NETNS and CNI_IFNAME")
            phases.lap("parse")
            ifindex = self.datapath.host_ifindex(Path(req.netns), req.ifname)
            phases.lap("netns_lookup")
            namespace = req.pod[0]
            fast = bool(namespace) and namespace in self.datapath.open_namespaces()
            phases.lap("open_namespaces")
            if fast:
                # The fast path: no policy can select a pod of this namespace, so it is judged as
                # with none; it passes everything until its tables arrive, and no budget runs.
                self.datapath.attach_pending(ifindex, PendingState.OPEN, phases)
                with self._lock:
                    self._containers[req.container_id] = ifindex
                self.stats.fast_open += 1
                self._record(req, began, phases)
                self.request_sync()
                return
            waiter = _Waiter(ifindex)
            with self._lock:
                self._waiters.setdefault(ifindex, []).append(waiter)
                self._containers[req.container_id] = ifindex
            name = self.datapath.attach_pending(ifindex, PendingState.CLOSED, phases)
        except Exception:
            self.stats.add_failures += 1
            raise
        self.request_sync()
        held = min(self.add_wait, self.budget)
        if held > 0:
            released = waiter.done.wait(held) or not self.datapath.is_pending(ifindex)
            phases.lap("wait")
        else:  # no wait: only a sync that ran since the attach can have released it
            released = waiter.done.is_set()
        self._record(req, began, phases)
        if released or held >= self.budget:
            self._settle(req, ifindex, name, waiter, released)
        else:  # the rest of the budget runs after ADD returned; the pod stays closed meanwhile
            threading.Thread(
                target=self._wait_rest,
                args=(req, ifindex, name, waiter, self.budget - held),
                name=f"pending-{ifindex}",
                daemon=True,
            ).start()

    def _record(self, req: CniRequest, began: float, phases: Phases) -> None:
        total = time.monotonic() - began
        self.stats.add_seconds.append(total)
        del self.stats.add_seconds[:-10000]
        self.stats.last_add = {
            "containerID": req.container_id,
            "total_ms": round(total * 1000, 3),
            "phases_ms": dict(phases.ms),
        }

    def _wait_rest(
        self, req: CniRequest, ifindex: int, name: str, waiter: _Waiter, rest: float
    ) -> None:
        released = waiter.done.wait(rest) or not self.datapath.is_pending(ifindex)
        self._settle(req, ifindex, name, waiter, released)

    def _settle(
        self, req: CniRequest, ifindex: int, name: str, waiter: _Waiter, released: bool
    ) -> None:
        """The budget is over for `waiter`: count it, and apply the setting if still pending."""
        with self._lock:
            waiting = self._waiters.get(ifindex, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(ifindex, None)
        if released:
            self.stats.released_in_budget += 1
            return
        namespace, pod, uid = req.pod
        if self.fail_open:
            self.datapath.set_pending(ifindex, PendingState.OPEN)
            self.stats.budget_out_open += 1
            reason = "PolicyPendingOpen"
            text = (
                f"the pod's policy tables were not applied within {self.budget:g}s; its "
                f"interface {name} passes all traffic until they are (fail-open setting)"
            )
        else:
            self.stats.budget_out_closed += 1
            reason = "PolicyPending"
            text = (
                f"the pod's policy tables were not applied within {self.budget:g}s; its "
                f"interface {name} drops all but node and neighbour traffic until they are"
            )
        log.warning("pod %s/%s: %s", namespace, pod, text)
        if self.event is not None and namespace and pod:
            try:
                self.event(namespace, pod, uid, reason, text)
            except Exception as exc:
                log.warning("could not post %s on %s/%s: %s", reason, namespace, pod, exc)

    def delete(self, req: CniRequest) -> None:
        """Forget the container; the next sync detaches its interface unless it is an endpoint.
        Harmless when repeated, or for a container this agent never saw."""
        with self._lock:
            ifindex = self._containers.pop(req.container_id, None)
        if ifindex is not None:
            self.datapath.forget(ifindex)
        self.request_sync()

    def check(self, req: CniRequest) -> None:
        with self._lock:
            known = req.container_id in self._containers
        if not known:
            raise CniRequestError(f"container {req.container_id} was not added through stockade")

    def released(self, ifindexes: Iterable[int]) -> None:
        """Called by the sync with the interfaces it just released from the pending state."""
        with self._lock:
            for ifindex in ifindexes:
                for waiter in self._waiters.get(ifindex, []):
                    if not waiter.done.is_set():
                        self.stats.woken_by_sync += 1
                    waiter.done.set()

    def metrics(self) -> dict[str, float]:
        s = self.stats
        return {
            "stockade_agent_cni_adds_total": s.adds,
            "stockade_agent_cni_add_failures_total": s.add_failures,
            "stockade_agent_pending_fast_open_total": s.fast_open,
            "stockade_agent_pending_released_in_budget_total": s.released_in_budget,
            "stockade_agent_pending_budget_out_closed_total": s.budget_out_closed,
            "stockade_agent_pending_budget_out_open_total": s.budget_out_open,
        }
