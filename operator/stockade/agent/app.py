"""The agent process: TableWatch → Runner → Syncer (programs, maps, links, report), plus the
metrics endpoint with the inspecting routes (`stockade.agent.routes`), the flow log, the
policy Events and, with `cni_socket`, the socket stockade-cni relays CNI commands to
(`CniServer` → `PendingPods`: pods attached in the pending state on CNI ADD) and the
`Backstop` (pod veths made without it put in the pending state too).
`stockade agent` (`stockade.agent.command`) and the tests build an `Agent` and call
`run(stop)`, which blocks until the stop flag is set.

Nothing here removes pinned state on exit: programs, maps and links stay in force while no agent
runs, and the next agent adopts them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import kubernetes.client

from stockade.agent.attachments import Attachments
from stockade.agent.backstop import Backstop
from stockade.agent.cniserver import CniServer
from stockade.agent.config import AgentConfig
from stockade.agent.conntrack import ConntrackRecount
from stockade.agent.flows import Flows
from stockade.agent.metrics import FlowLog, events_lost_metrics, gauge_metrics, rule_metrics
from stockade.agent.pending import AgentDatapath, PendingPods
from stockade.agent.policy_events import PolicyEvents
from stockade.agent.programs import Programs
from stockade.agent.report import Reporter
from stockade.agent.routes import flows_route, trace_route, usage_route
from stockade.agent.services import NETFILTER, NetfilterLinks, resolve_mode
from stockade.agent.sync import Syncer
from stockade.agent.trace import Probe, Tracer
from stockade.agent.watch import TableWatch
from stockade.compiler.abi import ConntrackMode
from stockade.datapath import attach, clock, libbpf
from stockade.datapath.clang import Compiler
from stockade.datapath.clock import TickClock
from stockade.datapath.events import RuleCounter, read_counters, read_events_lost
from stockade.datapath.maps import DatapathConfig
from stockade.datapath.netns import NetnsExecutor
from stockade.handoff import TableObject
from stockade.runtime import JsonRoute, load_client_configuration, serve_http
from stockade.runtime.runner import Runner

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.5  # seconds before a failed sync is retried, doubling up to max_backoff


class Agent:
    """One node agent. Attributes are public for metrics and tests."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.api = kubernetes.client.ApiClient(load_client_configuration(config.kubeconfig))
        self.executor = NetnsExecutor.named(config.netns) if config.netns else None
        config.pin_root.mkdir(parents=True, exist_ok=True)
        self.programs = Programs(Compiler(Path(config.cache_dir)), config.pin_root)
        supported = (
            self.executor.run(attach.netfilter_supported)
            if self.executor is not None
            else attach.netfilter_supported()
        )
        self.service_mode = resolve_mode(config.service_mode, supported)
        log.info(
            "Service traffic: %s mode (--service-mode %s)", self.service_mode, config.service_mode
        )
        self.reporter = Reporter(self.api, config.node)
        self.attachments = Attachments(config.pin_root, self.executor)
        self.syncer = Syncer(
            config.node,
            self._objects,
            self.programs,
            self.attachments,
            self.reporter,
            config.pin_root,
            DatapathConfig(ConntrackMode[config.conntrack_on_policy_change.upper()]),
            self.service_mode,
            NetfilterLinks(config.pin_root, self.executor),
            released=self._released,
            conntrack_clock=_conntrack_clock(),
        )
        self.runner = Runner(
            self._sync,
            name="stockade-agent-sync",
            task="sync",
            min_interval=config.min_interval,
            resync=config.resync_seconds,
            min_backoff=MIN_BACKOFF,
            max_backoff=config.max_backoff,
        )
        self.watch = TableWatch(
            self.api, config.node, self.runner.request, timeout_seconds=config.watch_timeout
        )
        self.flowlog: FlowLog | None = None
        self._events_fd: int | None = None
        self.flows = Flows()
        self.tracer = Tracer(self.programs)
        self.policy_events = PolicyEvents.through(self.api, config.node)
        self._lock = threading.Lock()
        self.recount = ConntrackRecount(
            lambda: self.syncer.maps, self._lock, config.conntrack_recount_seconds
        )
        # With the CNI socket, pod veths made without it are put pending too (agent.backstop).
        self.backstop: Backstop | None = None
        if config.cni_socket:
            self.backstop = Backstop(
                self.syncer, self.runner.request, config.pending_on_timeout == "open"
            )
            self.syncer.sweep = self.backstop.sweep
        self.pending = PendingPods(
            AgentDatapath(
                self.syncer,
                self.attachments,
                self.backstop.taken_as if self.backstop is not None else None,
            ),
            self.runner.request,
            self.reporter.pod_event,
            budget=config.pending_budget,
            fail_open=config.pending_on_timeout == "open",
            add_wait=config.pending_add_wait,
        )
        self.cni = CniServer(config.cni_socket, self.pending) if config.cni_socket else None

    def _released(self, ifindexes: list[int]) -> None:
        self.pending.released(ifindexes)

    def _objects(self) -> Mapping[str, TableObject]:
        return self.watch.snapshot()

    def _sync(self, full: bool = True) -> bool:  # the agent only asks for full syncs
        with self._lock:
            applied = self.syncer.sync()
            maps = self.syncer.maps
            events = maps.fds.get("events") if maps is not None else None
            if self.flowlog is not None and events != self._events_fd:
                self.flowlog.stop()  # the ring buffer was migrated to a new size
                self.flowlog = None
            if self.flowlog is None and events is not None:
                self.flowlog = FlowLog(
                    events,
                    lambda: self.syncer.event_rules,
                    self.flows,
                    sink=self.policy_events.add,
                )
                self.flowlog.start()
                self._events_fd = events
        return applied

    def gauges(self) -> dict[str, float]:
        stats, pstats = self.syncer.stats, self.programs.stats
        attach = stats.last_attach
        return {
            "stockade_agent_syncs_total": stats.syncs,
            "stockade_agent_sync_failures_total": self.runner.failures,
            "stockade_agent_applied_generation": stats.applied_generation,
            "stockade_agent_published_set_incomplete": float(bool(stats.waiting)),
            "stockade_agent_endpoints_attached": len(attach.attached),
            "stockade_agent_attach_failures": len(attach.failures),
            "stockade_agent_detached_total": stats.detached,
            "stockade_agent_map_write_syncs_total": stats.map_writes,
            "stockade_agent_last_write_seconds": stats.last_write_seconds,
            "stockade_agent_last_map_change_timestamp_seconds": stats.last_write_at,
            "stockade_agent_last_sync_seconds": stats.last_sync_seconds,
            "stockade_agent_compile_cache_misses_total": pstats.compile_misses,
            "stockade_agent_compile_cache_hits_total": pstats.compile_hits,
            "stockade_agent_map_migrations_total": pstats.migrations,
            "stockade_agent_program_loads_total": pstats.loads,
            "stockade_agent_watch_connected": float(self.watch.connected),
            "stockade_agent_watch_errors_total": self.watch.errors,
            "stockade_agent_watch_lists_total": self.watch.lists,
            **self.recount.gauges(),
            # 1: Service flows judged on the backend by the netfilter program; 0: fallback
            "stockade_agent_service_mode_netfilter": float(self.service_mode == NETFILTER),
            "stockade_agent_netfilter_links_attached_total": self.syncer.netfilter.attaches,
            "stockade_agent_policy_events_posted_total": self.policy_events.posted,
            "stockade_agent_policy_events_suppressed_total": self.policy_events.suppressed,
            **self.pending.metrics(),
            **(self.backstop.metrics() if self.backstop is not None else {}),
        }

    def metrics_text(self) -> str:
        text = gauge_metrics(self.gauges())
        text += self.syncer.apply_seconds.render()
        maps = self.syncer.maps
        rules = dict(self.syncer.rules)
        if maps is not None and "counters" in maps.fds and rules:
            text += rule_metrics(rules, read_counters(maps.fd("counters"), sorted(rules)))
        if self.flowlog is not None:
            text += self.flowlog.metrics()
        if maps is not None and "events_lost" in maps.fds:
            text += events_lost_metrics(read_events_lost(maps.fd("events_lost")))
        return text

    def _counters(self, rule_ids: list[int]) -> Mapping[int, RuleCounter]:
        maps = self.syncer.maps
        if maps is None or "counters" not in maps.fds:
            return {}
        return read_counters(maps.fd("counters"), rule_ids)

    def _events_lost(self) -> int:
        maps = self.syncer.maps
        if maps is None or "events_lost" not in maps.fds:
            return 0
        return read_events_lost(maps.fd("events_lost"))

    def status(self) -> dict[str, object]:
        """What `stockade status` shows of this agent beyond its report on <node>.program.0."""
        return {
            "node": self.config.node,
            "mode": {
                "conntrackOnPolicyChange": self.config.conntrack_on_policy_change,
                "conntrackClock": _clock_name(self.syncer.conntrack_clock),
                "programs": self.programs.digest[:12] or None,
                "shape": self.programs.shape.digest()[:12] if self.programs.shape else None,
            },
            "applied": self.syncer.applied,
            "rules": len(self.syncer.rules),
            "flowEvents": self.flows.events,
            # the agent's part of the last CNI ADD (bench/startup.py reads it)
            "lastCniAdd": self.pending.stats.last_add or None,
            "eventsLost": self._events_lost(),
            "gauges": self.gauges(),
        }

    def trace(self, probe: Probe) -> list[dict[str, object]]:
        """The programs' verdicts on `probe` (`stockade.agent.trace`), between syncs."""
        with self._lock:
            return self.tracer.trace(probe, self.syncer.maps, self.syncer.rules)

    def routes(self) -> dict[str, JsonRoute]:
        """The JSON routes of `stockade.agent.routes`, served beside `/metrics`."""
        node = self.config.node
        return {
            "/flows": flows_route(node, lambda: self.flows, self._events_lost),
            "/usage": usage_route(node, lambda: self.syncer.rules, self._counters),
            "/trace": trace_route(node, self.trace),
            "/status": lambda query: self.status(),
        }

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set."""
        servers = [
            serve_http(
                port,
                self.metrics_text,
                ready=lambda: self.syncer.applied,
                address=self.config.bind_address,
                routes=self.routes() if port == self.config.metrics_port else None,
            )
            for port in {self.config.metrics_port, self.config.health_port}
            if port is not None
        ]
        self.runner.start()
        self.watch.start()
        self.recount.start()
        self.policy_events.start()
        if self.cni is not None:
            self.cni.start()
        if self.backstop is not None:
            self.backstop.start()
        try:
            stop.wait()
        finally:
            if self.cni is not None:
                self.cni.stop()
            if self.backstop is not None:
                self.backstop.stop()
            self.watch.stop()
            self.recount.stop()
            self.runner.stop()
            if self.flowlog is not None:
                self.flowlog.stop()
            self.policy_events.stop()
            for server in servers:
                server.shutdown()
            with self._lock:
                self.syncer.close()
            if self.executor is not None:
                self.executor.close()
            self.api.close()  # type: ignore[no-untyped-call]


def _conntrack_clock() -> TickClock | None:
    """The jiffies clock for conntrack (stockade.datapath.clock), else None: the programs then
    read the coarse clock, which costs more per packet and means the same."""
    try:
        tick = clock.measure()
    except (clock.ClockError, libbpf.BpfError) as exc:
        log.warning("conntrack reads the coarse clock: %s", exc)
        return None
    log.info("conntrack clock: jiffies, %d ns a tick", tick.tick_ns)
    return tick


def _clock_name(tick: TickClock | None) -> str:
    return f"jiffies, {tick.tick_ns} ns a tick" if tick else "coarse"
