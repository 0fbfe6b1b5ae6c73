"""Policy status from what the agents report: `Accepted`, `Programmed` and observedGeneration.

Pure. The status reporter (`stockade.control.reporter`) calls `desired_status()` after each pass
for every policy whose record or progress changed, and writes only the statuses that differ from
what the object already carries
(`status_differs`), so that agent reports are aggregated: one write per policy whose conditions
actually change, never one per node. `Programmed` counts the endpoints the policy selects whose
node agent reports a program generation at least the one that first carried the policy's current
generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.control.policies import PolicyRecord
from stockade.handoff import applied_generation

ACCEPTED = "Accepted"
PROGRAMMED = "Programmed"
MAX_MESSAGE = 4096


@dataclass(frozen=True)
class Progress:
    """How many of the policy's selected endpoints enforce its current generation."""

    done: int
    total: int

    def __str__(self) -> str:
        return f"{self.done}/{self.total} endpoints"


def progress(
    selected: Mapping[str, int],
    required: Mapping[str, int],
    reports: Mapping[str, Mapping[str, Any]],
) -> Progress:
    """`selected`: node -> the policy's endpoints there; `required`: node -> the program
    generation that carries the policy; `reports`: node -> its agent's report."""
    total = sum(selected.values())
    done = sum(
        count
        for node, count in selected.items()
        if node in required and applied_generation(reports.get(node)) >= required[node]
    )
    return Progress(done, total)


def _condition(
    kind: str, ok: bool, reason: str, message: str, generation: int, now: str, old: Any
) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = now
    if isinstance(old, Mapping) and old.get("status") == status and old.get("lastTransitionTime"):
        since = str(old["lastTransitionTime"])
    return {
        "type": kind,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
    }


def desired_status(record: PolicyRecord, done: Progress | None, now: str) -> dict[str, Any]:
    """The whole status for `record`; `done` is None for a policy that is not accepted."""
    old = {
        c.get("type"): c
        for c in record.status.get("conditions") or ()
        if isinstance(c, Mapping) and isinstance(c.get("type"), str)
    }
    gen = record.generation
    if record.accepted:
        accepted = _condition(ACCEPTED, True, "Accepted", "valid", gen, now, old.get(ACCEPTED))
    else:
        message = "; ".join(record.problems) or "invalid"
        accepted = _condition(ACCEPTED, False, record.reason, message, gen, now, old.get(ACCEPTED))
    if done is None:
        programmed = _condition(
            PROGRAMMED, False, "NotAccepted", "not accepted", gen, now, old.get(PROGRAMMED)
        )
    else:
        complete = done.done == done.total
        programmed = _condition(
            PROGRAMMED,
            complete,
            "Programmed" if complete else "Pending",
            str(done),
            gen,
            now,
            old.get(PROGRAMMED),
        )
    return {"observedGeneration": gen, "conditions": [accepted, programmed]}


def _essence(status: Mapping[str, Any]) -> tuple[Any, ...]:
    conditions = sorted(
        (
            (
                c.get("type"),
                c.get("status"),
                c.get("reason"),
                c.get("message"),
                c.get("observedGeneration"),
            )
            for c in status.get("conditions") or ()
            if isinstance(c, Mapping)
        ),
        key=str,
    )
    return (status.get("observedGeneration"), tuple(conditions))


def status_differs(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """True when writing `desired` would change what a reader sees (transition times aside)."""
    return _essence(current) != _essence(desired)
