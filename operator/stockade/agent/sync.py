"""The agent's one idempotent `sync()`: bring the node's datapath to the published hand-off set.

The `Runner` calls `Syncer.sync()` whenever the watch saw a change, after a failure and every
resync period; it is safe to call at any time and does only what differs:

1. assemble the complete set from the watched DatapathTables (an incomplete set changes nothing);
2. make the Shape's programs current (render and compile through the cache, load or adopt the
   pinned ones: only a new Shape does any of this);
3. write the tables into the pinned maps as a diff (`TableWriter`);
4. attach both hooks to every local endpoint's host-side veth, detach from the gone ones; link
   the SERVICE and SERVICE_NAT programs at the node's netfilter hooks in netfilter mode
   (`agent.services`);
5. report status on `<node>.program.0` and Events on Pods whose attach failed.

When a new generation is in force, and its program object says when the operator took in the
earliest change it carries (`stockade.handoff.CHANGED_AT`), the time from then to now (wall
clocks of two machines: a skew between them shifts it; a negative one counts as 0) is observed
in `apply_seconds` (`stockade_agent_policy_apply_seconds`). The first generation the agent applies
after it starts is not: it may have been in force before the restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import ChainMap, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stockade.agent.attachments import Attachments, AttachResult, Endpoint
from stockade.agent.metrics import APPLY_BUCKETS, APPLY_SECONDS, Histogram
from stockade.agent.nodestack import with_node_stack
from stockade.agent.programs import Programs
from stockade.agent.report import Reporter
from stockade.agent.services import NETFILTER, NetfilterLinks, effective_shape
from stockade.compiler import ir
from stockade.compiler.render import Hook
from stockade.datapath.clock import TickClock
from stockade.datapath.maps import (
    Bindings,
    DatapathConfig,
    Pending,
    PinnedMaps,
    TableWriter,
    WriteStats,
    read_clock,
    read_config,
    write_clock,
    write_config,
)
from stockade.handoff import (
    Assembler,
    HandoffError,
    HandoffSet,
    IncompleteError,
    Report,
    TableObject,
)

log = logging.getLogger(__name__)


@dataclass
class SyncStats:
    syncs: int = 0
    applied_generation: int = -1
    waiting: str = ""  # why the published set is not applied yet
    last_write: WriteStats = field(default_factory=WriteStats)
    map_writes: int = 0  # syncs that changed map entries
    last_sync_seconds: float = 0.0
    last_write_seconds: float = 0.0
    last_write_at: float = 0.0  # wall clock (time.time()) when a map write last changed entries
    attach_seconds: list[float] = field(default_factory=list)  # per newly attached interface
    last_attach: AttachResult = field(default_factory=AttachResult)
    detached: int = 0


def _identity(handoff_set: HandoffSet) -> tuple[object, ...]:
    """What tells two sets apart without comparing their tables entry by entry."""
    return (handoff_set.generation, handoff_set.program, handoff_set.digests)


def endpoints_of(tables: ir.NodeTables) -> list[Endpoint]:
    addresses: dict[int, list[ir.IPAddress]] = defaultdict(list)
    for entry in tables.endpoints:
        addresses[entry.endpoint_id].append(entry.address)
    return [Endpoint(eid, tuple(addrs)) for eid, addrs in sorted(addresses.items())]


class Syncer:
    def __init__(
        self,
        node: str,
        objects: Callable[[], Mapping[str, TableObject]],
        programs: Programs,
        attachments: Attachments,
        reporter: Reporter | None,
        pin_root: Path,
        datapath_config: DatapathConfig | None = None,
        service_mode: str = NETFILTER,
        netfilter: NetfilterLinks | None = None,
        released: Callable[[list[int]], None] | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        conntrack_clock: TickClock | None = None,
    ) -> None:
        self._wall_clock = wall_clock
        # what the programs read for conntrack's "now" (stockade.datapath.clock); None: the
        # coarse clock
        self.conntrack_clock = conntrack_clock
        self.apply_seconds = Histogram(APPLY_SECONDS, APPLY_BUCKETS)
        self.service_mode = service_mode  # resolved: netfilter or fallback (agent.services)
        self.netfilter = netfilter or NetfilterLinks(pin_root)
        self.released = released  # told the interfaces each sync releases from pending
        # `Backstop.sweep`, run at the end of each sync; with it, attached pod veths that no
        # endpoint owns keep their links (the sweep makes them pending) instead of being detached.
        self.sweep: Callable[[], object] | None = None
        self.datapath_config = datapath_config or DatapathConfig()
        self.node = node
        self._objects = objects
        self.programs = programs
        self.attachments = attachments
        self.reporter = reporter
        self.pin_root = pin_root
        self.assembler = Assembler(node)
        self.maps: PinnedMaps | None = None
        self.writer: TableWriter | None = None
        self.current: HandoffSet | None = None
        self._event_rules: Mapping[int, ir.RuleInfo] = {}
        self.stats = SyncStats()
        self.retired_fds: list[int] = []  # old maps' fds, closed on the next sync
        # Held while the datapath is changed (`_apply`: programs, maps, links, the pending
        # state), not while the set is assembled or status is reported: a CNI ADD marking and
        # attaching a new pod (`stockade.agent.pending`) waits for this one only.
        self.apply_lock = threading.Lock()

    @property
    def applied(self) -> bool:
        """This node's tables have been applied at least once: the agent's `/readyz`. A later
        failed sync leaves the applied set in force, so it does not take readiness away."""
        return self.stats.applied_generation >= 0

    @property
    def rules(self) -> Mapping[int, ir.RuleInfo]:
        return self.current.tables.rules if self.current is not None else {}

    @property
    def event_rules(self) -> Mapping[int, ir.RuleInfo]:
        """The rules a datapath event read now may name: the applied set's and the previous
        set's. The programs decide with the new maps as soon as they are written, before
        `current` moves, and an event decided under the old maps may be read after it moved;
        an id that both sets hold names the new set's rule."""
        return self._event_rules

    def sync(self) -> bool:
        """Apply the published set; False when it changed nothing: there was no complete set to
        apply, or the set was the one already applied and the datapath already matched it (a
        new table shard that no manifest lists yet changes nothing, for example)."""
        began = time.monotonic()
        self.stats.syncs += 1
        try:
            wanted = self.assembler.assemble(self._objects())
        except IncompleteError as exc:
            if self.stats.waiting != str(exc):  # usual while a change lands object by object
                log.debug("waiting for a complete set: %s", exc)
            self.stats.waiting = str(exc)
            return False
        except HandoffError as exc:
            # Refused whole: the maps keep the last good set, and the runner tries again.
            self._report_problem(f"hand-off: {exc}")
            if self.reporter is not None:
                self.reporter.refused(str(exc))
            raise
        self.stats.waiting = ""
        same = self.current is not None and _identity(self.current) == _identity(wanted)
        try:
            self.attachments.prefetch(endpoints_of(wanted.tables))  # before the lock: it may wait
            with self.apply_lock:
                result = self._apply(wanted)
        except Exception as exc:
            self._report_problem(f"datapath: {exc}")
            raise
        self.stats.last_sync_seconds = time.monotonic() - began
        if self.reporter is not None:
            errors = tuple(f"{f.reason}: {f.message}" for f in result.failures)
            self.reporter.report(
                Report(
                    wanted.generation,
                    len(result.attached),
                    errors,
                    self.programs.digest,
                    self.service_mode,
                )
            )
            self.reporter.pod_failures(result.failures)
        unchanged = not (result.created or result.updated or result.detached or result.failures)
        return not (same and unchanged and not self.stats.last_write.total)

    def _ensure_config(self, maps: PinnedMaps) -> None:
        """The settings and the conntrack clock in the config map, written where they differ."""
        if read_config(maps) != self.datapath_config:
            write_config(maps, self.datapath_config)
        if read_clock(maps) != self.conntrack_clock:
            write_clock(maps, self.conntrack_clock)

    def _apply(self, wanted: HandoffSet) -> AttachResult:
        self._close_retired()
        changed = self.programs.ensure(effective_shape(wanted.program.shape, self.service_mode))
        migration = self.programs.migration
        if migration is not None and self.maps is not None and not migration.reopened:
            # New maps under the old pins: write the tables into those, before any link moves.
            self.retired_fds += self.maps.reopen(sorted(migration.old))
            self.writer = TableWriter(self.maps)  # adopts what was copied over
        if migration is not None:
            migration.reopened = True
        if self.maps is None:
            self.maps = PinnedMaps.open(self.pin_root)
            self.writer = TableWriter(self.maps)  # adopts what the maps hold
            self._ensure_config(self.maps)
        elif migration is not None:
            self._ensure_config(self.maps)  # a config of another layout starts empty
        assert self.writer is not None
        began = time.monotonic()
        tables = with_node_stack(wanted.tables, self.attachments.node_addresses())
        # read only: ChainMap wants mutable maps only for writes, which nothing makes
        self._event_rules = ChainMap(wanted.tables.rules, self.rules)  # type: ignore[arg-type]
        written = self.writer.write(tables)
        self.stats.last_write_seconds = time.monotonic() - began
        self.stats.last_write = written
        if written.total:
            self.stats.map_writes += 1
            self.stats.last_write_at = time.time()
            log.info(
                "generation %d: %d added, %d changed, %d deleted map entries in %.1f ms",
                wanted.generation,
                written.added,
                written.changed,
                written.deleted,
                self.stats.last_write_seconds * 1000,
            )
        self.current = wanted
        programs = {hook: (p.fd, p.id) for hook, p in self.programs.programs.items()}
        pending = Pending(self.maps)
        waiting = pending.read()
        keep = set(waiting)
        if self.sweep is not None:
            keep |= self.attachments.attached_ifindexes() & set(self.attachments.pod_veths())
        result = self.attachments.reconcile(
            endpoints_of(wanted.tables), programs, Bindings(self.maps), keep
        )
        if Hook.SERVICE in programs:
            assert self.programs.shape is not None
            self.netfilter.ensure(programs, self.programs.shape.ipv6)
        else:
            self.netfilter.remove()
        self._release(pending, waiting, result)
        self.stats.last_attach = result
        self.stats.attach_seconds.extend(result.seconds_per_new_interface)
        del self.stats.attach_seconds[:-1000]
        self.stats.detached += len(result.detached)
        self.observe_applied(self.stats.applied_generation, wanted)
        self.stats.applied_generation = wanted.generation
        for failure in result.failures:
            log.warning("endpoint %d: %s", failure.endpoint.endpoint_id, failure.message)
        if self.sweep is not None:
            try:
                self.sweep()
            except Exception as exc:  # the tables are applied; the next sync sweeps again
                log.warning("backstop sweep failed: %s", exc)
        if migration is not None and not result.failures:
            again = migration.settle()
            self.programs.migration = None
            log.info(
                "map migration done: %s; %d live entries copied again after the swap",
                migration.describe(),
                again,
            )
        if changed:
            self.programs.retire()
        return result

    def observe_applied(self, before: int, applied: HandoffSet) -> None:
        """`applied` is now in force, `before` was (-1: none since the agent started): observe
        the time since its change in `apply_seconds`, once per new generation."""
        if before < 0 or applied.generation == before or applied.changed_at is None:
            return
        nanos = self._wall_clock() - applied.changed_at
        self.apply_seconds.observe(max(nanos, 0) / 1e9)  # a clock skew can make it negative

    def _close_retired(self) -> None:
        for fd in self.retired_fds:
            os.close(fd)
        self.retired_fds = []

    def _release(
        self, pending: Pending, waiting: Mapping[int, object], result: AttachResult
    ) -> None:
        """Clear the pending state of the interfaces that are now attached endpoints (their
        endpoint, binding and policy entries are written) and of those that are gone."""
        if not waiting:
            return
        alive = self.attachments.attached_ifindexes()
        released = []
        for ifindex in waiting:
            if ifindex in result.ifindexes:
                pending.clear(ifindex)
                released.append(ifindex)
            elif ifindex not in alive:
                pending.clear(ifindex)  # its veth (and with it its links) is gone
        if released:
            log.info("released %d pending interface(s): %s", len(released), released)
            if self.released is not None:
                self.released(released)

    def _report_problem(self, message: str) -> None:
        if self.reporter is None:
            return
        attached = len(self.stats.last_attach.attached)
        try:
            self.reporter.report(
                Report(
                    max(self.stats.applied_generation, 0),
                    attached,
                    (message,),
                    self.programs.digest,
                    self.service_mode,
                )
            )
        except Exception as exc:
            log.warning("could not report %r: %s", message, exc)

    def close(self) -> None:
        self.attachments.close()
        self._close_retired()
        if self.programs.migration is not None and self.programs.migration.swapped:
            self.programs.migration.close()
            self.programs.migration = None
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        self.programs.close()
