"""The `stockade` command: the one composition root of the command line.

Each package contributes its subcommands with an `add_parser(subparsers)` function that sets
`run(args, progress) -> int` as the parser default; this module only builds the parser, prints
progress lines and turns errors into an exit status.
"""

from __future__ import annotations

import argparse
import sys
import time

from stockade import __version__
from stockade.agent import command as agent
from stockade.conformance import command as conformance
from stockade.control import command as operator
from stockade.sandbox import demo, session

_STARTED = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only results, such as a kubeconfig path)."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Kubernetes network policy enforced with eBPF tc programs, beside any CNI.",
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    session.add_parser(subparsers)
    conformance.add_parser(subparsers)
    operator.add_parser(subparsers)
    agent.add_parser(subparsers)
    demo.add_parser(subparsers)
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
    return status


if __name__ == "__main__":
    raise SystemExit(main())
