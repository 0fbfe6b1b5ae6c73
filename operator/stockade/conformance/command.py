"""`stockade conformance run FILE --engine NAME`: the command-line face of the runner.

`add_parser(subparsers)` plugs the command into `stockade.cli` (it sets `run(args, progress)` as
the parser default, the CLI's convention); `main()` serves `python -m stockade.conformance`.
Exit status: 0 only when no case failed, 1 when one did, 2 for a bad file or bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from stockade.conformance.casefile import CaseFileError, load_case_file
from stockade.conformance.engines import ENGINES, EngineOptions, create_engine
from stockade.conformance.runner import run_file

PROFILES = ("all", "standard", "experimental")


def add_parser(subparsers: Any) -> None:
    """Add `conformance run` to a command line built with argparse."""
    conformance = subparsers.add_parser(
        "conformance",
        help="run conformance case files against an engine",
        description="Run conformance case files (shared/conformance/FORMAT.md) against an engine.",
    )
    commands = conformance.add_subparsers(
        dest="conformance_command", required=True, metavar="COMMAND"
    )
    run = commands.add_parser(
        "run",
        help="run one case file; exit 0 only when no case fails",
        description="Print one line per case and a closing 'N passed, M failed' line.",
    )
    run.add_argument("file", help="the case file (YAML)")
    run.add_argument(
        "--engine", choices=sorted(ENGINES), default="reference", help="default: reference"
    )
    run.add_argument(
        "--case", action="append", default=[], metavar="ID", help="run only this case (repeat)"
    )
    run.add_argument(
        "--profile",
        choices=PROFILES,
        default="all",
        help="run only cases of this profile (default: all)",
    )
    run.add_argument(
        "--ip-family", type=int, choices=(4, 6), default=4, help="address family (default 4)"
    )
    run.add_argument(
        "--via",
        choices=("pod", "service", "nodeport"),
        default="pod",
        help="e2e engine: probe each pod at its address (pod, the default), through a "
        "ClusterIP Service of its own (service) or through that Service's node port on another "
        "node (nodeport)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="explain every wrong check")
    run.set_defaults(run=run_command)


def run_command(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    try:
        casefile = load_case_file(args.file)
    except CaseFileError as err:
        print(f"stockade conformance: {err}", file=sys.stderr)
        return 2
    cases = [
        c
        for c in casefile.cases
        if (not args.case or c.id in args.case) and args.profile in ("all", c.profile)
    ]
    missing = sorted(set(args.case) - {c.id for c in casefile.cases})
    if missing:
        print(f"stockade conformance: no case with id {', '.join(missing)}", file=sys.stderr)
        return 2
    if progress is not None:
        progress(f"running {len(cases)} cases of {args.file} on the {args.engine} engine")
    engine = create_engine(args.engine, EngineOptions(ip_family=args.ip_family, via=args.via))
    try:
        summary = run_file(engine, casefile, sys.stdout, cases=cases, verbose=args.verbose)
    finally:
        engine.close()
    return 0 if summary.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.conformance")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["conformance", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.run(args, None)
    return status
