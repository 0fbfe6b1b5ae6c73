"""Run a case file against an engine and report: one line per case, then `N passed, M failed`.

Called by `stockade.conformance.command` (the CLI) and by tests. A case passes when every check
of every step is observed as expected; it is unsupported when the engine says so up front or
rejects an action only for lack of a feature (never counted as passed); anything else fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TextIO

from stockade.conformance.casefile import (
    Action,
    Case,
    CaseFile,
    CreatePolicy,
    UpdatePolicy,
)
from stockade.conformance.engine import ActionRejectedError, Addresses, Engine
from stockade.conformance.symbols import resolve


class Status(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    UNSUPPORTED = "UNSUPPORTED"


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    status: Status
    problems: tuple[str, ...] = ()  # wrong checks ("... unexpectedly denied") or errors
    details: tuple[str, ...] = ()  # the engine's explanation of each wrong check

    def line(self) -> str:
        if not self.problems:
            return f"{self.status.value} {self.case_id}"
        return f"{self.status.value} {self.case_id}: {'; '.join(self.problems)}"


@dataclass
class Summary:
    results: list[CaseResult] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def ok(self) -> bool:
        return self.count(Status.FAIL) == 0

    def closing_line(self) -> str:
        line = f"{self.count(Status.PASS)} passed, {self.count(Status.FAIL)} failed"
        unsupported = self.count(Status.UNSUPPORTED)
        return f"{line}, {unsupported} unsupported" if unsupported else line


def resolve_action(action: Action, addresses: Addresses) -> Action:
    """Replace symbolic addresses in policy objects with the engine's real ones."""
    if isinstance(action, CreatePolicy):
        return CreatePolicy(resolve(action.obj, addresses))
    if isinstance(action, UpdatePolicy):
        return UpdatePolicy(resolve(action.obj, addresses))
    return action


def run_case(engine: Engine, casefile: CaseFile, case: Case) -> CaseResult:
    reason = engine.unsupported(case)
    if reason is not None:
        return CaseResult(case.id, Status.UNSUPPORTED, (reason,))
    problems: list[str] = []
    details: list[str] = []
    try:
        addresses = engine.setup(casefile.topology, case)
        for step in case.steps:
            for action in step.actions:
                engine.apply(resolve_action(action, addresses))
            if not step.checks:
                continue
            observed = engine.probe(step.checks)
            if len(observed) != len(step.checks):
                raise RuntimeError(
                    f"engine {engine.name} answered {len(observed)} of {len(step.checks)} checks"
                )
            for seen in observed:
                if not seen.as_expected:
                    problems.append(f"step {step.number}: {seen.describe()}")
                    details.append(f"step {step.number}: {seen.describe()}: {seen.detail}")
    except ActionRejectedError as err:
        status = Status.UNSUPPORTED if err.unsupported else Status.FAIL
        return CaseResult(case.id, status, (*problems, str(err)), tuple(details))
    finally:
        engine.teardown()
    return CaseResult(
        case.id, Status.FAIL if problems else Status.PASS, tuple(problems), tuple(details)
    )


def run_file(
    engine: Engine,
    casefile: CaseFile,
    out: TextIO,
    *,
    cases: Iterable[Case] | None = None,
    verbose: bool = False,
    on_result: Callable[[CaseResult], None] | None = None,
) -> Summary:
    """Run `cases` (default: every case of the file) and print the report to `out`."""
    summary = Summary()
    for case in casefile.cases if cases is None else cases:
        result = run_case(engine, casefile, case)
        summary.results.append(result)
        print(result.line(), file=out, flush=True)
        if verbose:
            for detail in result.details:
                print(f"    {detail}", file=out)
        if on_result is not None:
            on_result(result)
    print(summary.closing_line(), file=out, flush=True)
    return summary
