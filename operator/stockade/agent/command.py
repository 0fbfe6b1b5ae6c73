"""`stockade agent`: run the node agent against a cluster.

`add_parser(subparsers)` plugs the command into `stockade.cli` (it sets `run(args, progress)` as
the parser default, the CLI's convention); `python -m stockade.agent` serves it alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stockade.agent.config import AgentConfig
from stockade.datapath.clang import DEFAULT_CACHE_DIR
from stockade.datapath.maps import DEFAULT_PIN_ROOT


def _env_port(name: str) -> int | None:
    """Defaults the Helm chart sets through the environment."""
    value = os.environ.get(name)
    return int(value) if value else None


def add_parser(subparsers: Any) -> None:
    """Add `agent` to a command line built with argparse."""
    ag = subparsers.add_parser(
        "agent",
        help="run the stockade node agent (compiles, loads and attaches the tc programs)",
        description="Watch this node's DatapathTables; compile and load the programs, write the "
        "maps, attach to every local pod's host-side veth; report on <node>.program.0.",
    )
    ag.add_argument("--node", required=True, help="this node's name (spec.nodeName of its pods)")
    ag.add_argument(
        "--netns", help="attach inside this named network namespace (the sandbox's node)"
    )
    ag.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    ag.add_argument(
        "--pin-root",
        type=Path,
        default=DEFAULT_PIN_ROOT,
        help=f"bpffs directory for maps, programs and links (default {DEFAULT_PIN_ROOT})",
    )
    ag.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"compiled-object cache (default {DEFAULT_CACHE_DIR})",
    )
    ag.add_argument(
        "--resync-seconds", type=float, default=300.0, help="full sync period (default 300)"
    )
    ag.add_argument(
        "--metrics-port",
        type=int,
        default=_env_port("STOCKADE_METRICS_PORT"),
        help="serve Prometheus metrics on this port ($STOCKADE_METRICS_PORT)",
    )
    ag.add_argument(
        "--health-port",
        type=int,
        default=_env_port("STOCKADE_HEALTH_PORT"),
        help="serve /healthz and /readyz on this port ($STOCKADE_HEALTH_PORT)",
    )
    ag.add_argument(
        "--conntrack-on-policy-change",
        choices=("revalidate", "keep"),
        default=os.environ.get("STOCKADE_CONNTRACK_ON_POLICY_CHANGE") or "revalidate",
        help="established connections when policy changes: judged again at their next packet "
        "(revalidate, the default) or kept until they expire (keep) "
        "($STOCKADE_CONNTRACK_ON_POLICY_CHANGE)",
    )
    ag.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=os.environ.get("STOCKADE_LOG_LEVEL", "").lower() == "debug",
        help="log at debug level ($STOCKADE_LOG_LEVEL=debug)",
    )
    ag.set_defaults(run=run_command)


def config_from(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        node=args.node,
        netns=args.netns,
        kubeconfig=args.kubeconfig,
        pin_root=args.pin_root,
        cache_dir=args.cache_dir,
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        conntrack_on_policy_change=args.conntrack_on_policy_change,
    )


def run_command(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    from stockade.agent.app import Agent

    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"stockade agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if progress is not None:
        progress(f"agent for node {config.node} starting")
    Agent(config).run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.agent")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["agent", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.run(args, None)
    return status
