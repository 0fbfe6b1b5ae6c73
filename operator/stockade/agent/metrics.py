"""The agent's Prometheus endpoint (`--metrics-port`) and its flow log.

- `/metrics`: the agent's own gauges, and per-rule packet and byte counters read from the
  `counters` map, labelled with the rule's identity from the `rules` part of the hand-off
  (kind, namespace, name, direction, index): names live only in Python, the kernel counts by id.
- `Histogram`: a Prometheus histogram, such as `stockade_agent_policy_apply_seconds` (from the
  operator taking in a change to this agent applying the generation that carries it,
  `stockade.agent.sync`), rendered as `_bucket`, `_sum` and `_count` series.
- `FlowLog`: a thread that reads drop and audit events from the `events` ring buffer, aggregates
  them in `stockade.agent.flows.Flows` (what `stockade observe` reads) and logs structured (JSON)
  lines on the `stockade.agent.flow` logger naming the deciding rule, at most LOG_RATE a second
  (the rest are counted, and said in one line, never one line per packet of a flood); it counts
  them by kind and reason, and by deciding policy, for `/metrics`.

`stockade.agent.app` starts both.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

from stockade import handoff
from stockade.agent.flows import Flows, LogBudget
from stockade.compiler import ir
from stockade.datapath.events import Event, EventKind, EventReader, RuleCounter

flow_log = logging.getLogger("stockade.agent.flow")
log = logging.getLogger(__name__)

Rules = Callable[[], Mapping[int, ir.RuleInfo]]
LOG_RATE = 20  # flow-log lines a second, at most


# Seconds from 1 ms to 60 s: a change usually lands in milliseconds, a large node's in seconds.
APPLY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
APPLY_SECONDS = "stockade_agent_policy_apply_seconds"


class Histogram:
    """Observations counted in cumulative buckets (upper bounds `buckets`, then +Inf), with their
    sum and count; thread-safe."""

    def __init__(self, name: str, buckets: tuple[float, ...]) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must increase, got {buckets}")
        self.name = name
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1

    def render(self) -> str:
        with self._lock:
            counts, total, count = list(self.counts), self.sum, self.count
        lines = [f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, counts, strict=True):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        lines.append(f"{self.name}_sum {total!r}")
        lines.append(f"{self.name}_count {count}")
        return "\n".join(lines) + "\n"


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def rule_labels(info: ir.RuleInfo | None, rule_id: int) -> str:
    if info is None:
        return f'rule_id="{rule_id}"'
    direction = "Ingress" if info.direction is ir.Direction.INGRESS else "Egress"
    pairs = (
        ("kind", info.kind),
        ("namespace", info.namespace or handoff.NO_NAMESPACE),
        ("name", info.name),
        ("direction", direction),
        ("index", info.index),
    )
    return ",".join(f'{k}="{_label(v)}"' for k, v in pairs)


def rule_metrics(rules: Mapping[int, ir.RuleInfo], counters: Mapping[int, RuleCounter]) -> str:
    lines = [
        "# TYPE stockade_rule_packets_total counter",
        "# TYPE stockade_rule_bytes_total counter",
    ]
    for rule_id, counter in sorted(counters.items()):
        labels = rule_labels(rules.get(rule_id), rule_id)
        lines.append(f"stockade_rule_packets_total{{{labels}}} {counter.packets}")
        lines.append(f"stockade_rule_bytes_total{{{labels}}} {counter.bytes}")
    return "\n".join(lines) + "\n"


def events_lost_metrics(lost: int) -> str:
    """Drop and audit events the ring buffer had no room for: the flow log misses them."""
    name = "stockade_agent_events_lost_total"
    return f"# TYPE {name} counter\n{name} {lost}\n"


def gauge_metrics(gauges: Mapping[str, float]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(gauges.items()))


def event_record(event: Event, rules: Mapping[int, ir.RuleInfo]) -> dict[str, object]:
    """The flow-log line of one event (JSON-serialisable)."""
    info = rules.get(event.rule_id)
    record: dict[str, object] = {
        "event": event.kind.name.lower(),
        "reason": event.reason.name.lower(),
        "direction": "ingress" if event.direction == ir.Direction.INGRESS else "egress",
        "protocol": event.protocol,
        "src": str(event.src),
        "dst": str(event.dst),
        "sport": event.sport,
        "dport": event.dport,
        "endpoint": event.endpoint_id,
        "ifindex": event.ifindex,
        "rule_id": event.rule_id,
    }
    if info is not None:
        record["policy"] = {
            "kind": info.kind,
            "namespace": info.namespace,
            "name": info.name,
            "direction": "Ingress" if info.direction is ir.Direction.INGRESS else "Egress",
            "index": info.index,
        }
    return record


class FlowLog:
    """Reads the events ring buffer in a thread until `stop()`."""

    def __init__(
        self,
        events_fd: int,
        rules: Rules,
        flows: Flows | None = None,
        clock: Callable[[], float] = time.monotonic,
        sink: Callable[[Event, Mapping[int, ir.RuleInfo]], None] | None = None,
    ) -> None:
        self._reader = EventReader(events_fd)
        self._rules = rules
        self.flows = flows if flows is not None else Flows()
        self.budget = LogBudget(LOG_RATE, clock)
        self._sink = sink  # the policy Events' tally (`stockade.agent.policy_events`)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stockade-flowlog", daemon=True)
        self.counts: Counter[tuple[str, str]] = Counter()  # (kind, reason) -> events

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._reader.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._reader.poll(200)
            except OSError as exc:
                log.warning("events ring buffer: %s", exc)
                self._stop.wait(1.0)
                continue
            if not events:
                continue
            self.handle(events)

    def handle(self, events: list[Event]) -> None:
        """Count, aggregate and (within LOG_RATE) log `events`."""
        rules = self._rules()
        for event in events:
            self.counts[(event.kind.name.lower(), event.reason.name.lower())] += 1
            self.flows.add(event, rules)
            if self._sink is not None:
                self._sink(event, rules)
            if self._may_log():
                level = logging.INFO if event.kind is EventKind.DROP else logging.DEBUG
                flow_log.log(level, json.dumps(event_record(event, rules), sort_keys=True))

    def _may_log(self) -> bool:
        allowed, suppressed = self.budget.take()
        if suppressed:
            flow_log.info(json.dumps({"suppressed": suppressed, "seconds": 1}))
        return allowed

    def metrics(self) -> str:
        lines = ["# TYPE stockade_datapath_events_total counter"]
        for (kind, reason), count in sorted(self.counts.items()):
            lines.append(
                f'stockade_datapath_events_total{{event="{kind}",reason="{reason}"}} {count}'
            )
        lines.append("# TYPE stockade_datapath_policy_events_total counter")
        for (kind, pkind, namespace, name), count in sorted(self.flows.by_policy.items()):
            labels = ",".join(
                f'{k}="{_label(v)}"'
                for k, v in (
                    ("event", kind),
                    ("kind", pkind),
                    ("namespace", namespace),
                    ("name", name),
                )
            )
            lines.append(f"stockade_datapath_policy_events_total{{{labels}}} {count}")
        return "\n".join(lines) + "\n"
