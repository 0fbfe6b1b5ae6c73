"""The command-line and process plumbing of `stockade operator` and `stockade agent`.

Both commands take their defaults from the environment the Helm chart sets (`env`), share the
flags of a long-running process (`add_process_arguments`: kubeconfig, metrics and health ports,
the address they listen on, log level) and run the same way (`run_process`): build the frozen
configuration (an invalid one exits with status 2 and every error), set up logging, turn SIGTERM
and SIGINT into a stop flag and run the process's app until it is set. `serve_alone` serves a
command alone, as `python -m stockade.control` and `python -m stockade.agent` do.

Called by `stockade.control.command` and `stockade.agent.command`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from stockade.runtime import DEFAULT_BIND_ADDRESS

C = TypeVar("C")


class App(Protocol):
    def run(self, stop: threading.Event) -> None: ...


def env(name: str, default: str | None = None) -> str | None:
    """A default from the environment the Helm chart sets (STOCKADE_*, POD_*)."""
    return os.environ.get(name) or default


def env_port(name: str) -> int | None:
    value = env(name)
    return int(value) if value else None


def on_off(text: str) -> bool:
    if text not in ("on", "off", "true", "false"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text in ("on", "true")


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every long-running stockade process takes."""
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=env_port("STOCKADE_METRICS_PORT"),
        help="serve Prometheus metrics on this port ($STOCKADE_METRICS_PORT)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=env_port("STOCKADE_HEALTH_PORT"),
        help="serve /healthz and /readyz on this port ($STOCKADE_HEALTH_PORT)",
    )
    parser.add_argument(
        "--bind-address",
        default=env("STOCKADE_BIND_ADDRESS", DEFAULT_BIND_ADDRESS),
        help="serve metrics and probes on this address only "
        f"($STOCKADE_BIND_ADDRESS, default {DEFAULT_BIND_ADDRESS})",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=(env("STOCKADE_LOG_LEVEL", "") or "").lower() == "debug",
        help="log at debug level ($STOCKADE_LOG_LEVEL=debug)",
    )


def run_process(
    args: argparse.Namespace,
    command: str,
    config_from: Callable[[argparse.Namespace], C],
    app: Callable[[C], App],
    starting: Callable[[C], str],
    progress: Callable[[str], None] | None = None,
    quiet_loggers: Sequence[str] = (),
) -> int:
    """Run `app(config)` until SIGTERM or SIGINT; 2 when the configuration is invalid.
    `quiet_loggers` (a library's chatty loggers) log warnings only, unless verbose."""
    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"stockade {command}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if progress is not None:
        progress(starting(config))
    process = app(config)
    # Everything alive now (the imported modules: about 150,000 objects that the collector
    # tracks, the kubernetes client's models most of them) lives as long as the process. Frozen,
    # Python's automatic full collections no longer scan it: one took 75 ms, a stall of kopf's
    # event loop and of the reconcile or sync thread alike (bench/convergence.py showed it as a
    # label change taken in 90 ms late).
    gc.freeze()
    process.run(stop)
    return 0


def serve_alone(
    prog: str, command: str, add_parser: Callable[[Any], None], argv: list[str] | None = None
) -> int:
    """Serve one command alone: `prog [options]` is `stockade <command> [options]`."""
    parser = argparse.ArgumentParser(prog=prog)
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    status: int = args.run(args, None)
    return status
