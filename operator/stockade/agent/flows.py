"""The agent's flow log as a reader sees it: drop and audit events aggregated per (source,
destination, rule, verdict), bounded in memory, with a count of what was lost.

A flood of denied packets is one record whose count grows, not one line per packet: `FlowLog`
(`stockade.agent.metrics`) feeds every event it reads from the ring buffer to `Flows.add()`, and
`stockade observe` reads `Flows.since(cursor)` through the agent's `/flows` endpoint (the
`stockade.agent.app` composition). Every change to a record gives it a new sequence number, so
that a follower asks only for what changed since its last cursor. At most `capacity` records are
kept (the least recently seen goes first, and its events count as evicted) and at most `limit`
records are returned per request (the rest wait for the next one): both bound what a flood
costs the agent and the reader. Events the ring buffer had no room for are counted by the
programs (`events_lost`) and reported beside the records.

Records carry addresses and the rule's identity; pod names are the reader's to resolve (the agent
only knows its own node's endpoints).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stockade import handoff
from stockade.compiler import ir
from stockade.datapath.events import Event

CAPACITY = 4096  # records kept
LIMIT = 500  # records per request

FlowKey = tuple[str, str, str, int, int, str, str, int]


@dataclass
class FlowRecord:
    """Events of one (verdict, direction, source, destination, protocol, port, rule)."""

    event: str  # drop | audit
    reason: str
    direction: str  # ingress | egress: the hook that decided
    src: str
    dst: str
    protocol: int
    port: int  # the policy port: destination port, or ICMP type << 8 | code
    rule_id: int
    policy: dict[str, object] | None
    count: int
    first_seen: float  # Unix time
    last_seen: float
    seq: int

    def body(self) -> dict[str, object]:
        return {
            "event": self.event,
            "reason": self.reason,
            "direction": self.direction,
            "src": self.src,
            "dst": self.dst,
            "protocol": self.protocol,
            "port": self.port,
            "ruleId": self.rule_id,
            "policy": self.policy,
            "count": self.count,
            "firstSeen": self.first_seen,
            "lastSeen": self.last_seen,
            "seq": self.seq,
        }


def rule_identity(info: ir.RuleInfo | None) -> dict[str, object] | None:
    """The rule's identity as readers see it (None: no rule of a policy, such as a spoofed
    source dropped before any policy)."""
    if info is None:
        return None
    return {
        "kind": info.kind,
        "namespace": info.namespace or handoff.NO_NAMESPACE,
        "name": info.name,
        "direction": "Ingress" if info.direction is ir.Direction.INGRESS else "Egress",
        "index": info.index,
    }


def _policy_key(policy: Mapping[str, object] | None) -> tuple[str, str, str]:
    p = policy or {}
    return str(p.get("kind", "")), str(p.get("namespace", "")), str(p.get("name", ""))


class Flows:
    """The aggregated records; `add()` from the flow-log thread, `since()` from HTTP threads."""

    def __init__(
        self,
        capacity: int = CAPACITY,
        limit: int = LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1 or limit < 1:
            raise ValueError("capacity and limit must be at least 1")
        self.capacity = capacity
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[FlowKey, FlowRecord] = OrderedDict()  # least recent first
        self._seq = 0
        self.events = 0  # events aggregated
        self.evicted = 0  # events of records dropped to keep `capacity`
        # events per (event, policy kind, namespace, name), since the agent started
        self.by_policy: Counter[tuple[str, str, str, str]] = Counter()

    def add(self, event: Event, rules: Mapping[int, ir.RuleInfo]) -> None:
        kind = event.kind.name.lower()
        direction = "ingress" if event.direction == ir.Direction.INGRESS else "egress"
        key: FlowKey = (
            kind,
            direction,
            str(event.src),
            event.protocol,
            event.port,
            str(event.dst),
            event.reason.name.lower(),
            event.rule_id,
        )
        now = self._clock()
        with self._lock:
            self._seq += 1
            self.events += 1
            record = self._records.get(key)
            if record is None:
                record = FlowRecord(
                    event=kind,
                    reason=event.reason.name.lower(),
                    direction=direction,
                    src=str(event.src),
                    dst=str(event.dst),
                    protocol=event.protocol,
                    port=event.port,
                    rule_id=event.rule_id,
                    policy=rule_identity(rules.get(event.rule_id)),
                    count=0,
                    first_seen=now,
                    last_seen=now,
                    seq=0,
                )
                self._records[key] = record
                while len(self._records) > self.capacity:
                    _, oldest = self._records.popitem(last=False)
                    self.evicted += oldest.count
            else:
                self._records.move_to_end(key)
                if record.policy is None:  # its first event came before its rule was known
                    record.policy = rule_identity(rules.get(event.rule_id))
            record.count += 1
            p = record.policy or {}
            self.by_policy[
                (kind, str(p.get("kind", "")), str(p.get("namespace", "")), str(p.get("name", "")))
            ] += 1
            record.last_seen = now
            record.seq = self._seq

    def since(self, cursor: int = 0, limit: int | None = None) -> dict[str, object]:
        """Records changed after sequence number `cursor`, oldest change first, at most `limit`
        (or `self.limit`); `cursor` of the answer is where the next request starts, and
        `pending` says how many changed records wait beyond this answer."""
        limit = self.limit if limit is None else max(1, min(limit, self.limit))
        with self._lock:
            changed = sorted(
                (r for r in self._records.values() if r.seq > cursor), key=lambda r: r.seq
            )
            sent = changed[:limit]
            return {
                "cursor": sent[-1].seq if sent else max(cursor, 0),
                "head": self._seq,
                "pending": len(changed) - len(sent),
                "events": self.events,
                "evicted": self.evicted,
                "flows": [r.body() for r in sent],
            }


class LogBudget:
    """At most `rate` flow-log lines a second: `take()` says whether one more may be logged now,
    and, at the first call of a new second, how many the previous second did not log."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._second = -1
        self._used = 0
        self._suppressed = 0

    def take(self) -> tuple[bool, int]:
        second, said = int(self._clock()), 0
        if second != self._second:
            said, self._second, self._used, self._suppressed = self._suppressed, second, 0, 0
        if self._used < self.rate:
            self._used += 1
            return True, said
        self._suppressed += 1
        return False, said
