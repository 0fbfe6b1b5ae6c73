"""The `stockade` command: the one composition root of the command line.

Each package contributes its subcommands with an `add_parser(subparsers)` function that sets
`run(args, progress) -> int` as the parser default; this module only builds the parser, prints
progress lines and turns errors into an exit status.

`operator` and `agent` are the runtime, and `explain`, `observe`, `usage` and `status`
(`stockade.inspect`) its clients; `sandbox`, `conformance` and `demo` belong to the bench
(`.importlinter`: the runtime never imports the bench). The operator and agent images install only
the runtime, and the bench's own dependencies come with the `bench` extra (pyproject.toml), so a
bench command is added only if its modules import; if they do not, it stays listed and says what
to install, as does a bench command that reaches a missing module while it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from stockade import __version__
from stockade.agent import cniinstall
from stockade.agent import command as agent
from stockade.control import command as operator
from stockade.inspect import command as inspect

_STARTED = time.monotonic()

# The bench's packages and the dependencies only the bench needs (the `bench` extra): the
# forbidden side of the runtime/bench contract in .importlinter (a unit test holds them equal).
BENCH_MODULES = ("stockade.sandbox", "stockade.conformance", "stockade.harness", "cryptography")


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only results, such as a kubeconfig path)."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def is_bench_module(name: str | None) -> bool:
    """Whether `name` (a missing module's) is part of the bench or a dependency only it needs."""
    return name is not None and any(
        name == module or name.startswith(f"{module}.") for module in BENCH_MODULES
    )


def bench_missing(command: str, module: str) -> str:
    """What `stockade COMMAND` says when the bench, or a dependency of it, is not installed."""
    return (
        f"`stockade {command}` is part of stockade's bench (the sandbox, the conformance engines "
        f"and the datapath test harness), and this installation has no module {module!r}: the "
        "operator and agent images install only the runtime. Install the bench from a source "
        "checkout with `pip install -e '.[bench]'` (`make venv` does)."
    )


def _add_sandbox(subparsers: Any) -> None:
    from stockade.sandbox import session

    session.add_parser(subparsers)


def _add_conformance(subparsers: Any) -> None:
    from stockade.conformance import command

    command.add_parser(subparsers)


def _add_demo(subparsers: Any) -> None:
    from stockade.sandbox import demo

    demo.add_parser(subparsers)


def _add_bench(subparsers: Any, command: str, add: Callable[[Any], None]) -> None:
    """`add(subparsers)`, or, when the bench is not installed, a stand-in for `command`."""
    try:
        add(subparsers)
    except ModuleNotFoundError as missing:
        if not is_bench_module(missing.name):
            raise
        _add_stand_in(subparsers, command, missing)


def _add_stand_in(subparsers: Any, command: str, missing: ModuleNotFoundError) -> None:
    """`command`, taking any arguments and failing with `bench_missing` (through `main`)."""

    def unavailable(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
        raise missing

    # No options (no argument starts with NUL), so every argument, `--help` too, reaches
    # `unavailable` and the user reads what to install rather than a usage error.
    stand_in = subparsers.add_parser(
        command, help="(not installed: part of the bench)", add_help=False, prefix_chars="\0"
    )
    stand_in.add_argument("arguments", nargs=argparse.REMAINDER)
    stand_in.set_defaults(run=unavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Kubernetes network policy enforced with eBPF tc programs, beside any CNI.",
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(subparsers, "sandbox", _add_sandbox)
    _add_bench(subparsers, "conformance", _add_conformance)
    operator.add_parser(subparsers)
    agent.add_parser(subparsers)
    inspect.add_parsers(subparsers)
    cniinstall.add_parser(subparsers)
    _add_bench(subparsers, "demo", _add_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args, progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"stockade: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as missing:
        if missing.name is None or not is_bench_module(missing.name):
            raise
        print(f"stockade: error: {bench_missing(args.command, missing.name)}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
