"""Drops and audit hits as Kubernetes Events on the policy whose rule decided, where people
already look (`kubectl describe networkpolicy`, `kubectl get events`).

Never one Event per packet: `PolicyEvents.add()` (called by the flow log for every drop and audit
event it reads) only counts, per (verdict, policy, source address) and wall-clock minute. Once a
minute is over, `flush()` posts one Event per such key, the busiest first, with `count` the
number of packets, the first and last time seen, and the destination, port and rule of the first
packet: a flood of 10,000 denied packets from one pod is one Event saying 10,000. Both what is
kept and what is posted are bounded: at most MAX_KEYS keys a minute and MAX_EVENTS Events a
minute per agent; what goes over is counted in `suppressed` (the agent's
`stockade_agent_policy_events_suppressed_total`), never posted.

Events on a namespaced policy go to its namespace; those on a cluster-scoped policy to
`default`, as kubectl looks for them. The agent posts from a thread of its own (`start()`), so a
slow API server never slows reading the ring buffer.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kubernetes.client import ApiClient, CoreV1Api, CoreV1Event
from kubernetes.client.exceptions import ApiException

from stockade.agent.report import COMPONENT, EVENTS_NAMESPACE
from stockade.compiler import ir
from stockade.datapath.events import Event, EventKind
from stockade.model.kinds import RESOURCE_OF
from stockade.model.policy import PolicyKind

log = logging.getLogger(__name__)

MAX_KEYS = 1000  # (verdict, policy, source) kept per minute
MAX_EVENTS = 30  # Events posted per minute
FLUSH_SECONDS = 5.0
REASONS = {EventKind.DROP: "PolicyDenied", EventKind.AUDIT: "PolicyAudited"}
PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}

TallyKey = tuple[int, EventKind, str, str, str, str]  # minute, kind, policy kind/ns/name, src


@dataclass
class Tally:
    packets: int
    first: float
    last: float
    dst: str
    protocol: int
    port: int
    direction: ir.Direction
    index: int


def _time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _port(protocol: int, port: int) -> str:
    name = PROTOCOL_NAMES.get(protocol, str(protocol))
    if protocol in (1, 58):
        return f"{name} type {port >> 8} code {port & 0xFF}"
    return f"{name}/{port}"


class PolicyEvents:
    """Counts drop and audit events per minute and posts them as Events on their policies."""

    def __init__(
        self,
        post: Callable[[str, dict[str, object]], None],
        node: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._post = post
        self.node = node
        self._clock = clock
        self._lock = threading.Lock()
        self._tallies: dict[TallyKey, Tally] = {}
        self._posted: dict[int, int] = {}  # minute -> Events posted
        self.posted = 0
        self.suppressed = 0  # keys not kept or not posted, for the metrics
        self.failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def through(cls, api: ApiClient, node: str) -> PolicyEvents:
        """Posting with the agent's API client."""
        core = CoreV1Api(api)

        def post(namespace: str, body: dict[str, object]) -> None:
            core.create_namespaced_event(
                namespace, CoreV1Event.model_validate(body), _request_timeout=(5, 15)
            )

        return cls(post, node)

    def add(self, event: Event, rules: Mapping[int, ir.RuleInfo]) -> None:
        info = rules.get(event.rule_id)
        if info is None or event.kind not in REASONS:
            return
        now = self._clock()
        key: TallyKey = (
            int(now // 60),
            event.kind,
            info.kind,
            info.namespace,
            info.name,
            str(event.src),
        )
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None:
                if len(self._tallies) >= MAX_KEYS:
                    self.suppressed += 1
                    return
                tally = Tally(
                    0,
                    now,
                    now,
                    str(event.dst),
                    event.protocol,
                    event.port,
                    info.direction,
                    info.index,
                )
                self._tallies[key] = tally
            tally.packets += 1
            tally.last = now

    def flush(self) -> int:
        """Post the Events of every minute that is over; returns how many were posted."""
        minute = int(self._clock() // 60)
        with self._lock:
            done = {k: t for k, t in self._tallies.items() if k[0] < minute}
            for key in done:
                del self._tallies[key]
        posted = 0
        for key, tally in sorted(done.items(), key=lambda kv: (kv[0][0], -kv[1].packets)):
            if self._posted.get(key[0], 0) >= MAX_EVENTS:
                self.suppressed += 1
                continue
            self._posted[key[0]] = self._posted.get(key[0], 0) + 1
            try:
                self._post(*self.body(key, tally))
            except ApiException as exc:
                self.failed += 1
                log.warning("could not post %s on %s: %s", REASONS[key[1]], key[4], exc.reason)
                continue
            posted += 1
        self.posted += posted
        for old in [m for m in self._posted if m < minute - 1]:
            del self._posted[old]
        return posted

    def body(self, key: TallyKey, tally: Tally) -> tuple[str, dict[str, object]]:
        """(namespace, Event) for one tally."""
        _, kind, policy_kind, namespace, name, src = key
        resource = RESOURCE_OF[PolicyKind(policy_kind)]
        involved: dict[str, str] = {
            "apiVersion": resource.api_version,
            "kind": resource.name,
            "name": name,
        }
        if namespace:
            involved["namespace"] = namespace
        verb = "denied" if kind is EventKind.DROP else "audited (would be denied; passed)"
        rule = "isolation default" if tally.index == -1 else f"rule {tally.index}"
        message = (
            f"{tally.packets} packet(s) from {src} to {tally.dst} "
            f"{_port(tally.protocol, tally.port)} {verb} by {tally.direction.name.lower()} "
            f"{rule} on node {self.node}"
        )
        body: dict[str, object] = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{name[:200]}.",
                "namespace": namespace or EVENTS_NAMESPACE,
            },
            "involvedObject": involved,
            "reason": REASONS[kind],
            "message": message,
            "type": "Warning" if kind is EventKind.DROP else "Normal",
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": _time(tally.first),
            "lastTimestamp": _time(tally.last),
            "count": tally.packets,
        }
        return namespace or EVENTS_NAMESPACE, body

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="stockade-policy-events", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # never take the agent down over an Event
                log.exception("posting policy Events")
