"""Servers and probes inside sandbox pods: the traffic side of the test bed.

One long-lived helper process (`stockade/sandbox/workloads/podagent.py`) runs in each pod namespace
that is used, or in a node namespace standing in for host-network pods. `PodProcesses` starts them,
asks them to serve TCP/UDP echo ports and to probe, and matches replies to requests, so a batch of
probes (`probe_many`) runs concurrently across and within pods and costs about one timeout.

Called by the bpf/e2e tests and the e2e conformance engine; `Topology` provides the namespaces.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stockade.sandbox.topology import Topology

AGENT_SCRIPT = Path(__file__).with_name("podagent.py")
START_TIMEOUT_S = 10.0
REPLY_GRACE_S = 5.0
SUPPORTED = ("tcp", "udp")
CRAFTED = ("sctp",)  # no kernel module: handshake packets crafted over raw sockets (podagent.py)


class Outcome(enum.StrEnum):
    """What a probe saw."""

    CONNECTED = "connected"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    ERROR = "error"


@dataclass(frozen=True)
class ProbeResult:
    outcome: Outcome
    detail: str
    elapsed_s: float


@dataclass(frozen=True)
class Probe:
    """One probe: from pod key (or node name, for a host-network source) to an address."""

    src: str
    dst_ip: str
    port: int
    proto: str
    timeout: float = 1.0


class AgentError(RuntimeError):
    """A helper process failed to start, died, or rejected a request."""


class Agent:
    """One helper process inside namespace `netns`, with request/reply matching by id."""

    def __init__(self, netns: str, label: str) -> None:
        self.netns = netns
        self.label = label
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._ready: Future[dict[str, Any]] = Future()
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-u", str(AGENT_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._drain, args=(self._proc.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait_ready(self) -> None:
        try:
            self._ready.result(timeout=START_TIMEOUT_S)
        except Exception as exc:
            raise AgentError(
                f"agent for {self.label} in {self.netns} did not start: {exc}"
            ) from exc

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready"):
                self._ready.set_result(msg)
                continue
            with self._lock:
                fut = self._pending.pop(msg.get("id"), None)
            if fut is not None:
                fut.set_result(msg)
        err = AgentError(
            f"agent for {self.label} exited ({self._proc.poll()}): {' | '.join(self._stderr)}"
        )
        if not self._ready.done():
            self._ready.set_exception(err)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(err)

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line.rstrip())

    def request(self, op: str, **fields: Any) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        rid = next(self._ids)
        line = json.dumps({"id": rid, "op": op, **fields}) + "\n"
        with self._lock:
            self._pending[rid] = fut
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except (OSError, ValueError) as exc:
                self._pending.pop(rid, None)
                fut.set_exception(AgentError(f"agent for {self.label} is gone: {exc}"))
        return fut

    def close(self, wait_s: float = 2.0) -> None:
        """Close stdin (the agent exits), then kill it if it lingers."""
        with contextlib.suppress(OSError, ValueError), self._lock:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for t in self._threads:
            t.join(timeout=wait_s)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _reply(fut: Future[dict[str, Any]], timeout: float, what: str) -> dict[str, Any]:
    msg = fut.result(timeout=timeout + REPLY_GRACE_S)
    if not msg.get("ok"):
        raise AgentError(f"{what}: {msg.get('error')}")
    return msg


class PodProcesses:
    """Helper processes for the pods (and node stand-ins) of one `Topology`."""

    def __init__(self, topology: Topology, *, crafted_sctp: bool = False) -> None:
        """crafted_sctp: serve and probe SCTP with crafted INIT / INIT-ACK packets (podagent.py)
        instead of reporting it unavailable."""
        self.topology = topology
        self.supported = SUPPORTED + CRAFTED if crafted_sctp else SUPPORTED
        self._agents: dict[str, Agent] = {}
        self._lock = threading.Lock()

    # -- agents -----------------------------------------------------------------------------------
    def _target(self, who: str) -> tuple[str, list[str]]:
        """(netns, own addresses) of a pod key ("ns/name") or a node name ("node-1")."""
        pod = self.topology.pods.get(who)
        if pod is not None:
            return pod.netns, [pod.ip_v4, pod.ip_v6]
        try:
            node = self.topology.node(who)
        except KeyError:
            msg = f"{who!r} is neither a pod nor a node of run {self.topology.run_id}"
            raise KeyError(msg) from None
        return node.netns, [node.ip_v4, node.ip_v6]

    def start(self, who: Iterable[str]) -> None:
        """Start the helpers for several pods/nodes at once (they start in parallel)."""
        started: list[Agent] = []
        with self._lock:
            for w in who:
                if w not in self._agents:
                    netns, _ = self._target(w)
                    self._agents[w] = Agent(netns, w)
                    started.append(self._agents[w])
        for agent in started:
            agent.wait_ready()

    def agent(self, who: str) -> Agent:
        self.start([who])
        return self._agents[who]

    def pids(self) -> list[int]:
        with self._lock:
            return [a.pid for a in self._agents.values()]

    def forget(self, who: str) -> None:
        """Stop the helper of `who` (call before removing that pod)."""
        with self._lock:
            agent = self._agents.pop(who, None)
        if agent is not None:
            agent.close()

    def close(self) -> None:
        """Stop every helper process. Idempotent."""
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
        for agent in agents:
            agent.close()

    def __enter__(self) -> PodProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- servers ----------------------------------------------------------------------------------
    def serve(self, who: str, ports: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
        """Serve echo on each (port, protocol) on the pod's (or node's) own addresses.

        Returns the ports actually served: SCTP (no kernel module here) is skipped unless
        `crafted_sctp`."""
        _, hosts = self._target(who)
        agent = self.agent(who)
        wanted = [(int(port), proto.lower()) for port, proto in ports]
        served = [(port, proto) for port, proto in wanted if proto in self.supported]
        futs = [agent.request("serve", proto=p, port=n, hosts=hosts) for n, p in served]
        for (port, proto), fut in zip(served, futs, strict=True):
            _reply(fut, START_TIMEOUT_S, f"serve {proto}/{port} in {who}")
        return served

    # -- probes -----------------------------------------------------------------------------------
    def _source(self, who: str, dst_ip: str) -> str | None:
        """Bind node-sourced probes to the node address, as a host-network pod's would be."""
        if who in self.topology.pods:
            return None
        node = self.topology.node(who)
        return node.ip_v6 if ":" in dst_ip else node.ip_v4

    def probe_many(self, probes: Sequence[Probe]) -> list[ProbeResult]:
        """Run `probes` concurrently; results in the same order."""
        self.start({p.src for p in probes})
        futs: list[Future[dict[str, Any]] | ProbeResult] = []
        for p in probes:
            proto = p.proto.lower()
            if proto not in self.supported:
                futs.append(ProbeResult(Outcome.ERROR, f"proto {p.proto} is not available", 0.0))
                continue
            futs.append(
                self._agents[p.src].request(
                    "probe",
                    proto=proto,
                    dst=p.dst_ip,
                    port=p.port,
                    timeout=p.timeout,
                    src=self._source(p.src, p.dst_ip),
                )
            )
        return [
            f if isinstance(f, ProbeResult) else _result(f, p.timeout, f"probe {p}")
            for p, f in zip(probes, futs, strict=True)
        ]

    def probe(self, src: str, dst_ip: str, port: int, proto: str, timeout: float = 1.0) -> Outcome:
        return self.probe_many([Probe(src, dst_ip, port, proto, timeout)])[0].outcome

    def ping_many(
        self, pings: Sequence[tuple[str, str]], timeout: float = 1.0
    ) -> list[ProbeResult]:
        """ICMP echo from each (src, dst_ip), concurrently."""
        self.start({src for src, _ in pings})
        futs = [
            self._agents[src].request("ping", dst=dst, timeout=timeout, src=self._source(src, dst))
            for src, dst in pings
        ]
        return [
            _result(f, timeout, f"ping {src} -> {dst}")
            for (src, dst), f in zip(pings, futs, strict=True)
        ]

    def ping(self, src: str, dst_ip: str, timeout: float = 1.0) -> Outcome:
        return self.ping_many([(src, dst_ip)], timeout)[0].outcome


def _result(fut: Future[dict[str, Any]], timeout: float, what: str) -> ProbeResult:
    msg = _reply(fut, timeout, what)
    return ProbeResult(Outcome(msg["outcome"]), str(msg["detail"]), float(msg["elapsed"]))
