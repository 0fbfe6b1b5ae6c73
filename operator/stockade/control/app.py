"""The operator process: Store ← kopf handlers; Runner → Reconciler (the Store's changes →
lowering worker process → Publisher → DatapathTables, StatusReporter → policy status and Events);
a Lease that gates all writing. `stockade operator` (`stockade.control.command`) and the tests
build an `Operator` and call `run()`, which blocks until the stop flag is set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes.client

from stockade.control.config import OperatorConfig
from stockade.control.discovery import CatchUp
from stockade.control.handlers import build_registry, custom_resources
from stockade.control.lease import LeaseElector
from stockade.control.metrics import prometheus_text
from stockade.control.reconciler import Reconciler
from stockade.control.store import Store
from stockade.runtime import load_client_configuration, serve_http
from stockade.runtime.runner import Runner

log = logging.getLogger(__name__)

RETRY = 1.0  # seconds before a failed pass runs again, every time (no growing backoff)
TLS_GOODBYE_S = 0.5  # time given to the watch connections to close over TLS when kopf stops


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the client configuration (certificates or a bearer token)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def _seconds(ns: int | None) -> float:
    return ns / 1e9 if ns is not None else 0.0


class Operator:
    """One operator replica. Attributes are public for metrics and tests."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.client_configuration = load_client_configuration(config.kubeconfig)
        self.api = kubernetes.client.ApiClient(self.client_configuration)
        self.runner = Runner(
            self._reconcile,
            name="stockade-reconcile",
            task="reconcile",
            debounce=config.debounce,
            min_interval=config.min_interval,
            min_backoff=RETRY,
            max_backoff=RETRY,
        )
        self.store = Store(on_change=self.runner.request)
        self.elector: LeaseElector | None = None
        if config.leader_election:
            self.elector = LeaseElector(
                self.api,
                namespace=config.lease_namespace,
                name=config.lease_name,
                identity=config.identity,
                duration=config.lease_duration,
                renew_period=config.renew_period,
                on_started=self._became_leader,
            )
        self.reconciler = Reconciler(
            self.store,
            self.api,
            is_leader=self.is_leader,
            upstream_cnp=config.upstream_cnp,
            inline_entries=config.inline_entries,
            services=config.service_space,
            again=lambda: self.runner.request(True),
            mode=config.lowering,
        )
        self.store.configured_cidrs = tuple(ipaddress.ip_network(c) for c in config.service_cidrs)
        self.store.node_port_range = config.node_port_range
        self.catch_up = CatchUp(custom_resources(upstream_cnp=config.upstream_cnp))
        self.registry = build_registry(
            self.store,
            self._table_event,
            upstream_cnp=config.upstream_cnp,
            services=config.service_space,
            # CRDs are watched only with the upstream kind (the chart grants that access then)
            catch_up=self.catch_up if config.upstream_cnp else None,
        )
        self.ready = threading.Event()

        self._stop: threading.Event | None = None  # run()'s stop flag

        @kopf.on.login(registry=self.registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return connection_info(self.client_configuration)

        # kopf's own SIGTERM/SIGINT handler (in the main thread) stops it without raising the
        # stop flag, and its "stop-flag waiter" task, blocked on the flag in an executor thread,
        # is then a hung task that kopf waits 5 s for before it cancels it: every SIGTERM took
        # 5.9 s. kopf runs cleanup handlers while it stops its root tasks, before that wait:
        # raising the flag there releases the waiter, and a SIGTERM takes under a second.
        @kopf.on.cleanup(registry=self.registry)
        def release_stop_flag(**_: Any) -> None:
            if self._stop is not None:
                self._stop.set()

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def _became_leader(self) -> None:
        self.reconciler.became_leader()
        self.runner.request(True)

    def _reconcile(self, tables: bool) -> None:
        self.reconciler.run(tables)

    def _table_event(self, obj: Mapping[str, Any], deleted: bool) -> None:
        if self.reconciler.observe(obj, deleted):
            self.runner.request(True)

    def gauges(self) -> dict[str, float]:
        stats = self.reconciler.stats
        stages = {
            f'stockade_operator_reconcile_stage_seconds{{stage="{stage}"}}': seconds
            for stage, seconds in stats.stage_seconds.items()
        }
        return {
            **stages,
            "stockade_operator_leader": float(self.is_leader()),
            "stockade_operator_reconcile_passes_total": stats.passes,
            "stockade_operator_reconcile_running": float(stats.running),
            "stockade_operator_reconcile_failures_total": self.runner.failures,
            "stockade_operator_reconcile_seconds": stats.last_seconds,
            "stockade_operator_generation": self.reconciler.publisher.generation,
            "stockade_operator_tables_written_total": self.reconciler.publisher.writes,
            "stockade_operator_tables_deleted_total": self.reconciler.publisher.deletes,
            "stockade_operator_write_conflicts_total": self.reconciler.publisher.conflicts,
            "stockade_operator_status_writes_total": self.reconciler.reporter.status_writes,
            "stockade_operator_events_total": self.reconciler.reporter.events,
            "stockade_operator_last_status_write_timestamp_seconds": (
                self.reconciler.reporter.last_status_write
            ),
            "stockade_operator_input_change_timestamp_seconds": _seconds(self.store.latest_change),
            "stockade_operator_published_input_change_timestamp_seconds": _seconds(
                stats.published_inputs
            ),
            "stockade_operator_published_timestamp_seconds": stats.published_at,
            # when that pass began: from the change to it, the runner's wait (a pass under way,
            # the rate limit); from it to the publish, the pass's own work
            "stockade_operator_published_pass_started_timestamp_seconds": (
                stats.published_pass_began
            ),
            "stockade_operator_pod_events_total": self.store.pod_events,
            "stockade_operator_first_pod_event_timestamp_seconds": _seconds(
                self.store.first_pod_event
            ),
            "stockade_operator_last_pod_event_timestamp_seconds": _seconds(
                self.store.last_pod_event
            ),
        }

    def settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        settings.posting.enabled = False  # stockade posts its own Events, on policies only
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        return settings

    async def _kopf(self, stop: threading.Event) -> None:
        self._stop = stop
        settings = self.settings()
        try:
            await kopf.operator(
                registry=self.registry,
                settings=settings,
                insights=self.catch_up.started(self.registry, settings),
                clusterwide=self.config.namespace is None,
                namespaces=[self.config.namespace] if self.config.namespace else (),
                standalone=True,
                stop_flag=stop,
                ready_flag=self.ready,
            )
        finally:
            # kopf waits for `stop` in an executor thread; when a signal (kopf's own handler)
            # stopped it instead, that thread must be released or asyncio.run() never returns.
            stop.set()
            # kopf closes its API session last; each watch connection then says goodbye to the
            # API server over TLS, which takes a few turns of this loop. Closing the loop before
            # that would leave the connections half-closed until the garbage collector finds them.
            await asyncio.sleep(TLS_GOODBYE_S)

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set (blocking; kopf gets its own event loop in this thread)."""
        servers = [
            serve_http(
                port,
                lambda: prometheus_text(self.gauges()),
                ready=self.ready.is_set,
                address=self.config.bind_address,
            )
            for port in {self.config.metrics_port, self.config.health_port}
            if port is not None
        ]
        self.runner.start()
        if self.elector is not None:
            self.elector.start()
        else:
            self.runner.request(True)
        try:
            asyncio.run(self._kopf(stop))
        finally:
            if self.elector is not None:
                self.elector.stop()
            self.runner.stop()
            self.reconciler.close()  # the lowering's worker process, if any, is reaped
            for server in servers:
                server.shutdown()
            self.api.close()  # type: ignore[no-untyped-call]
