"""Restarts under continuous traffic: killing and restarting the operator, or the agent of the
node that enforces a policy, neither opens nor blackholes anything.

A policy admits x/b to x/a and so denies y/b (both clients on node-2, the server x/a on node-1).
A background loop probes the allowed pair and the denied pair every 100 ms with fresh TCP
connections, from before the kill until the restarted process has caught up, and afterwards.

The invariant, with nothing else allowed for: every probe of the allowed pair connects (within
2 s) and every probe of the denied pair times out (no answer for 0.5 s); a refusal, an error, a
connected denied probe or a timed-out allowed probe fails the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from stockade.sandbox.workloads.traffic import Outcome, Probe
from tests.e2e.stack_fixtures import PORT, Stack, running_stack
from tests.fixtures.controlplane import wait_for

SERVER, ALLOWED, DENIED = "x/a", "x/b", "y/b"
PERIOD_S = 0.1
ALLOWED_TIMEOUT_S = 2.0
DENIED_TIMEOUT_S = 0.5
ROUNDS_PER_PHASE = 10  # rounds completed before the kill, while it is down, and after it is back
POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "only-b", "namespace": "x"},
    "spec": {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("restarts")) as running:
        yield running


@dataclass
class Round:
    sent: float
    allowed: Outcome
    denied: Outcome


@dataclass
class Traffic:
    """Probes the allowed and the denied pair every PERIOD_S until `stop()`."""

    stack: Stack
    rounds: list[Round] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        server_ip = self.stack.pod(SERVER).ip_v4
        self._probes = [
            Probe(ALLOWED, server_ip, PORT, "tcp", ALLOWED_TIMEOUT_S),
            Probe(DENIED, server_ip, PORT, "tcp", DENIED_TIMEOUT_S),
        ]
        self._pool = ThreadPoolExecutor(max_workers=32)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _round(self) -> None:
        sent = time.monotonic()
        try:
            allowed, denied = self.stack.workload.probe_many(self._probes)
        except Exception as exc:  # reported by the test, never swallowed
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        self.rounds.append(Round(sent, allowed.outcome, denied.outcome))

    def _loop(self) -> None:
        tick = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._round)
            tick += PERIOD_S
            self._stop.wait(max(0.0, tick - time.monotonic()))

    def wait_rounds(self, more: int, what: str) -> None:
        target = len(self.rounds) + more
        wait_for(f"{more} probe rounds {what}", lambda: len(self.rounds) >= target)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)

    def wrong(self) -> list[str]:
        return [
            f"t={r.sent:.3f}: allowed pair {r.allowed}, denied pair {r.denied}"
            for r in self.rounds
            if (r.allowed, r.denied) != (Outcome.CONNECTED, Outcome.TIMEOUT)
        ]


def operator_back(stack: Stack) -> bool:
    return stack.metrics("operator-0").get("stockade_operator_reconcile_passes_total", 0) >= 1


def agent_back(stack: Stack) -> bool:
    applied = stack.metrics("agent-node-1").get("stockade_agent_applied_generation")
    return applied is not None and applied == stack.published()["node-1"]


RESTARTS: dict[str, tuple[str, Callable[[Stack], bool]]] = {
    "the operator killed and restarted": ("operator-0", operator_back),
    "the agent of the enforcing node killed and restarted": ("agent-node-1", agent_back),
}


@pytest.mark.parametrize(("name", "back"), list(RESTARTS.values()), ids=list(RESTARTS))
def test_a_restart_under_probe_traffic_wrongly_allows_and_drops_nothing(
    stack: Stack, name: str, back: Callable[[Stack], bool]
) -> None:
    stack.apply(POLICY)
    stack.wait_reachability(denied={(DENIED, SERVER), ("y/a", SERVER)})
    traffic = Traffic(stack)
    try:
        traffic.wait_rounds(ROUNDS_PER_PHASE, "before the kill")
        stack.kill(name)
        traffic.wait_rounds(ROUNDS_PER_PHASE, f"while {name} is down")
        stack.start(name)
        wait_for(f"{name} is back and caught up", lambda: back(stack), timeout=60)
        traffic.wait_rounds(ROUNDS_PER_PHASE, f"after {name} is back")
    finally:
        traffic.stop()
    assert traffic.errors == []
    wrong = traffic.wrong()
    assert wrong == [], f"{len(wrong)} of {len(traffic.rounds)} rounds were wrong: {wrong}"
    assert len(traffic.rounds) >= 3 * ROUNDS_PER_PHASE

    if name.startswith("operator"):
        # It found everything published already and rewrote nothing.
        assert stack.metrics(name)["stockade_operator_tables_written_total"] == 0
    else:
        # It adopted the pinned programs and links instead of loading new ones.
        assert stack.metrics(name)["stockade_agent_program_loads_total"] == 0
    # The new process does its job: deleting the policy opens x/a again.
    stack.delete(POLICY)
    stack.wait_reachability(denied=())
