"""Helpers for the agent e2e tests: publishing a `Cluster`'s tables through the operator's own
planner and publisher, running the agent in-process or as a `python -m stockade.agent` process,
and reading its report back from `<node>.program.0`."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.agent.app import Agent
from stockade.agent.config import AgentConfig
from stockade.compiler.shape import Shape
from stockade.control.plan import plan
from stockade.control.publish import Publisher
from stockade.model.crd_schema import GROUP, VERSION
from stockade.sandbox import stack
from stockade.sandbox.controlplane.server import free_port
from tests.bpf.agent_harness import CACHE_DIR, Cluster
from tests.fixtures.controlplane import wait_for

PLURAL = "datapathtables"


def unique_node() -> str:
    return f"agent-{secrets.token_hex(3)}"


class Publication:
    """Publishes `cluster`'s node tables as the operator does (only changed shards)."""

    def __init__(self, api: Any, cluster: Cluster) -> None:
        self.api = api
        self.cluster = cluster
        self.publisher = Publisher(api)

    def publish(self, shape: Shape | None = None, changed_at: int | None = None) -> int:
        """Publish the next generation; its program object carries `changed_at` (Unix ns) when
        given, as the operator stamps it."""
        self.cluster.generation += 1
        desired = {self.cluster.node_name: handoff.encode(self.cluster.tables(), shape)}
        planned = plan(self.publisher.published, desired, self.cluster.generation)
        self.publisher.apply(self.publisher.stamp(planned, changed_at))
        return planned.generations[self.cluster.node_name]

    def delete_all(self) -> None:
        objects = kubernetes.client.CustomObjectsApi(self.api)
        for name in list(self.publisher.published):
            try:
                objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def report(api: Any, node: str) -> dict[str, Any]:
    obj: Any = kubernetes.client.CustomObjectsApi(api).get_cluster_custom_object(
        GROUP, VERSION, PLURAL, handoff.object_name(node, handoff.PROGRAM, 0)
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status


def wait_applied(api: Any, node: str, generation: int) -> dict[str, Any]:
    return wait_for(
        f"{node} reports generation {generation}",
        lambda: ((r := report(api, node)).get("appliedGeneration") == generation and r) or None,
    )


class AgentThread:
    """The agent in this process (its internals stay inspectable)."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = Agent(config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.agent.run, args=(self._stop,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the agent did not stop"


def agent_config(node: str, netns: str, kubeconfig: Path, pin_root: Path) -> AgentConfig:
    return AgentConfig(
        node=node,
        netns=netns,
        kubeconfig=str(kubeconfig),
        pin_root=pin_root,
        cache_dir=CACHE_DIR,
        resync_seconds=30,
        max_backoff=2.0,
        watch_timeout=30,
    )


class AgentProcess:
    """`python -m stockade.agent` for one node, with its metrics on a free port."""

    def __init__(self, node: str, netns: str, kubeconfig: Path, pin_root: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        argv = [
            sys.executable,
            "-m",
            "stockade.agent",
            "--node",
            node,
            "--netns",
            netns,
            "--kubeconfig",
            str(kubeconfig),
            "--pin-root",
            str(pin_root),
            "--cache-dir",
            str(CACHE_DIR),
            "--resync-seconds",
            "30",
            "--metrics-port",
            str(self.port),
        ]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def metrics(self) -> dict[str, float]:
        return stack.read_metrics(self.port)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            return str(r.read().decode())

    def wait_synced(self, generation: int) -> None:
        def synced() -> bool:
            m = self.metrics()
            return m.get("stockade_agent_applied_generation") == generation

        wait_for(f"agent pid {self.proc.pid} applied generation {generation}", synced)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
