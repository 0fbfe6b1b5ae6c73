"""The seam between the conformance runner and what it tests: the `Engine` protocol.

The runner (`stockade.conformance.runner`) drives every engine the same way, once per case:

    reason = engine.unsupported(case)          # None, or why the engine cannot run the case
    addresses = engine.setup(topology, case)   # fresh world: namespaces, pods, nodes, addresses
    for step in case.steps:
        for action in step.actions:
            engine.apply(action)               # symbols already resolved against `addresses`
        observed = engine.probe(step.checks)   # one Observed per check, in order
    engine.teardown()                          # always, also after a failure
    ...                                        # the next case
    engine.close()                             # once, when the run ends (the command does it)

Engines: `reference` (the pure evaluator, `engines/reference.py`), `datapath` (compiled programs
under BPF_PROG_TEST_RUN) and `e2e` (API server, operator, agents, real pods). They can keep their
view of the case in a `stockade.conformance.world.World`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from stockade.conformance.casefile import Action, Case, Check, Expect, Topology
from stockade.model.policy import IPAddress


@dataclass(frozen=True)
class Addresses:
    """Where the engine put things: pod and node addresses (host-network pods: their node's)."""

    pods: Mapping[str, tuple[IPAddress, ...]]
    nodes: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    family: int = 4  # the address family that checks use

    def pod_ip(self, pod: str) -> IPAddress:
        return _pick(self.pods, pod, self.family, "pod")

    def node_ip(self, node: str) -> IPAddress:
        return _pick(self.nodes, node, self.family, "node")


def _pick(
    table: Mapping[str, tuple[IPAddress, ...]], key: str, family: int, what: str
) -> IPAddress:
    if key not in table:
        raise KeyError(f"unknown {what} {key!r}")
    for address in table[key]:
        if address.version == family:
            return address
    raise KeyError(f"{what} {key!r} has no IPv{family} address")


class Outcome(StrEnum):
    CONNECTED = "connected"
    TIMEOUT = "timeout"  # a silent drop: what `denied` means
    REFUSED = "refused"  # reset, ICMP error or abort: never what a check expects
    ERROR = "error"  # the probe itself failed


@dataclass(frozen=True)
class Observed:
    check: Check
    outcome: Outcome
    detail: str = ""  # why, when the engine knows (the reference engine: the decision's reason)

    @property
    def as_expected(self) -> bool:
        wanted = Outcome.CONNECTED if self.check.expect is Expect.ALLOWED else Outcome.TIMEOUT
        return self.outcome is wanted

    def describe(self) -> str:
        """`x/b -> x/a TCP/80 unexpectedly denied` (or allowed, refused, error)."""
        word = {
            Outcome.CONNECTED: "allowed",
            Outcome.TIMEOUT: "denied",
            Outcome.REFUSED: "refused",
            Outcome.ERROR: "failed",
        }[self.outcome]
        return f"{self.check} unexpectedly {word}"


class ActionRejectedError(RuntimeError):
    """The engine refused an action (a policy the API would reject, an unknown object).

    `unsupported` marks a well-formed action that needs a feature the engine lacks: the runner
    then reports the case as unsupported rather than failed.
    """

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


class Engine(Protocol):
    name: str

    def unsupported(self, case: Case) -> str | None:
        """Why this engine cannot run `case` at all (a missing feature), or None."""
        ...

    def setup(self, topology: Topology, case: Case) -> Addresses:
        """Create the case's fresh world (nothing carries over between cases)."""
        ...

    def apply(self, action: Action) -> None:
        """Apply one action; raise `ActionRejectedError` when it cannot be applied."""
        ...

    def probe(self, checks: Sequence[Check]) -> list[Observed]:
        """Attempt each connection and report what happened, one `Observed` per check."""
        ...

    def teardown(self) -> None:
        """Remove everything `setup` and `apply` created; safe to call after any failure."""
        ...

    def close(self) -> None:
        """Release what the engine keeps across cases (loaded programs, a sandbox); called once
        when the run ends, also after a failure. Idempotent."""
        ...
