"""The backstop for pods that came up without stockade-cni (the plugin not installed yet, an agent
restarted in the middle of an ADD): every unknown pod veth is put in the pending state.

A pod veth is a veth of the node's namespace whose peer is in another namespace and that carries
no subnet, only host or link-local addresses (`stockade.datapath.iface.pod_veths`): the node's
bridges, its loopback and its own uplink (a veth carrying the node's addresses with their subnet
on kind and in the sandbox) are never taken. It is unknown when it is no interface of an
endpoint the last sync attached and not pending already. `Backstop.sweep()` marks each unknown
one PENDING_CLOSED (PENDING_OPEN with the fail-open setting) and attaches the programs there,
then asks for a sync; the sync releases it the moment its tables make it an endpoint
(`Syncer._release`), as for a pod added through CNI.

The sweep runs after every sync (`Syncer.sweep`), so the agent's first sync at start takes
every unknown pod veth, attached before or not; with a backstop that sync, and every later one,
keeps the links of attached pod veths no endpoint owns (they become pending, never detached for
a moment). A sync whose interface lookups failed sweeps nothing: an unknown veth may then be the
interface of a known endpoint. Between syncs, a thread watches link changes (RTM_NEWLINK) in the
node's namespace and sweeps at each, so a veth made without CNI is pending within milliseconds.
A veth is judged at each link change and each sync; one taken stays pending until its tables
arrive or it goes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from stockade.agent.sync import Syncer
from stockade.compiler.abi import PendingState
from stockade.datapath.iface import LinkEvents
from stockade.datapath.maps import Pending

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often the link watch looks at its stop flag


class Backstop:
    def __init__(
        self,
        syncer: Syncer,
        request_sync: Callable[[], None],
        fail_open: bool = False,
    ) -> None:
        self.syncer = syncer
        self.request_sync = request_sync
        self.state = PendingState.OPEN if fail_open else PendingState.CLOSED
        self.adopted = 0
        self.events = 0
        # The veths a sweep took, their links attached: ifindex -> (state, name). A CNI ADD of a
        # pod whose veth is here finds it pending already (`taken_as`). Replaced whole by each
        # sweep, so it is read without a lock.
        self._taken: dict[int, tuple[PendingState, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[int]:
        """Put every unknown pod veth in the pending state; the caller holds the Syncer's
        `apply_lock` (the Syncer calls this at the end of `_apply`; the link watch takes it,
        not the whole sync's lock, so a sync looking up interfaces does not hold it back). The
        ifindexes it took."""
        syncer = self.syncer
        maps = syncer.maps
        programs = {hook: (p.fd, p.id) for hook, p in syncer.programs.programs.items()}
        last = syncer.stats.last_attach
        if maps is None or not programs or not syncer.applied or last.failures:
            return []
        pending = Pending(maps)
        waiting = pending.read()
        taken = []
        veths = syncer.attachments.pod_veths()
        held = {i: t for i, t in self._taken.items() if i in veths and i in waiting}
        for ifindex, name in veths.items():
            if ifindex in last.ifindexes or ifindex in waiting:
                continue
            try:
                pending.mark(ifindex, self.state)
                syncer.attachments.attach_interface(ifindex, programs)
            except OSError as exc:  # the veth went away meanwhile: the next sync clears it
                log.warning("could not put pod veth %s in the pending state: %s", name, exc)
                continue
            taken.append(ifindex)
            held[ifindex] = (self.state, name)
            log.info("pod veth %s (%d) is no known endpoint's: pending", name, ifindex)
        self._taken = held
        if taken:
            self.request_sync()
            self.adopted += len(taken)
        return taken

    def taken_as(self, ifindex: int) -> tuple[PendingState, str] | None:
        """How a sweep left `ifindex` (its state, its interface's name) when a sweep took it and
        attached its links; None when no sweep did (or the veth, or its pending mark, is gone)."""
        return self._taken.get(ifindex)

    def start(self) -> None:
        links = self.syncer.attachments.link_events()
        self._thread = threading.Thread(
            target=self._watch, args=(links,), name="stockade-backstop", daemon=True
        )
        self._thread.start()

    def _watch(self, links: LinkEvents) -> None:
        try:
            while not self._stop.is_set():
                if not links.wait(POLL_SECONDS) or not links.new_links():
                    continue
                self.events += 1
                try:
                    with self.syncer.apply_lock:
                        self.sweep()
                except Exception as exc:
                    log.warning("backstop sweep failed: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                links.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def metrics(self) -> dict[str, float]:
        return {"stockade_agent_backstop_pending_total": self.adopted}
