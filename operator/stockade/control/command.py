"""`stockade operator`: run the operator (kopf) against a cluster.

`add_parser(subparsers)` plugs the command into `stockade.cli` (it sets `run(args, progress)` as
the parser default, the CLI's convention); `python -m stockade.control` serves it alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from stockade.control.config import OperatorConfig


def _on_off(text: str) -> bool:
    if text not in ("on", "off", "true", "false"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text in ("on", "true")


def _env(name: str, default: str | None = None) -> str | None:
    """Defaults come from the environment the Helm chart sets (STOCKADE_*, POD_*)."""
    return os.environ.get(name) or default


def _env_port(name: str) -> int | None:
    value = _env(name)
    return int(value) if value else None


def add_parser(subparsers: Any) -> None:
    """Add `operator` to a command line built with argparse."""
    op = subparsers.add_parser(
        "operator",
        help="run the stockade operator (watches policies, publishes DatapathTables)",
        description="Watch policies, pods, namespaces and nodes; publish each node's datapath "
        "tables as DatapathTable objects; report policy status.",
    )
    op.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    op.add_argument(
        "--namespace", help="watch namespaced objects in this namespace only (default: all)"
    )
    op.add_argument(
        "--leader-election",
        type=_on_off,
        nargs="?",
        const=True,
        default=True,
        metavar="on|off",
        help="hold a coordination.k8s.io Lease before publishing (default: on)",
    )
    op.add_argument(
        "--identity", default=_env("POD_NAME", ""), help="lease holder identity ($POD_NAME)"
    )
    op.add_argument(
        "--metrics-port",
        type=int,
        default=_env_port("STOCKADE_METRICS_PORT"),
        help="serve Prometheus metrics on this port ($STOCKADE_METRICS_PORT)",
    )
    op.add_argument(
        "--health-port",
        type=int,
        default=_env_port("STOCKADE_HEALTH_PORT"),
        help="serve /healthz and /readyz on this port ($STOCKADE_HEALTH_PORT)",
    )
    op.add_argument(
        "--upstream-cnp",
        type=_on_off,
        default=_on_off(_env("STOCKADE_UPSTREAM_CNP", "on") or "on"),
        metavar="on|off",
        help="enforce policy.networking.k8s.io ClusterNetworkPolicy ($STOCKADE_UPSTREAM_CNP, on)",
    )
    op.add_argument(
        "--lease-namespace",
        default=_env("POD_NAMESPACE", "kube-system"),
        help="namespace of the Lease ($POD_NAMESPACE, else kube-system)",
    )
    op.add_argument(
        "--lease-name",
        default=_env("STOCKADE_LEASE_NAME", "stockade-operator"),
        help="name of the Lease ($STOCKADE_LEASE_NAME, else stockade-operator)",
    )
    op.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    op.add_argument("--renew-period", type=float, default=2.0, help="seconds (default 2)")
    op.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=(_env("STOCKADE_LOG_LEVEL", "") or "").lower() == "debug",
        help="log at debug level ($STOCKADE_LOG_LEVEL=debug)",
    )
    op.set_defaults(run=run_command)


def config_from(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        leader_election=args.leader_election,
        identity=args.identity,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        upstream_cnp=args.upstream_cnp,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_duration=args.lease_duration,
        renew_period=args.renew_period,
    )


def run_command(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    from stockade.control.app import Operator

    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"stockade operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kopf").setLevel(logging.INFO if args.verbose else logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if progress is not None:
        progress(f"operator {config.identity} starting")
    Operator(config).run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.control")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["operator", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.run(args, None)
    return status
