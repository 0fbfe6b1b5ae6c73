"""`stockade operator`: run the operator (kopf) against a cluster.

`add_parser(subparsers)` plugs the command into `stockade.cli` (it sets `run(args, progress)` as
the parser default, the CLI's convention); `python -m stockade.control` serves it alone.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from stockade.control.config import OperatorConfig


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text == "on"


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
        default=True,
        metavar="on|off",
        help="hold a coordination.k8s.io Lease before publishing (default: on)",
    )
    op.add_argument("--identity", default="", help="lease holder identity (default: host-pid)")
    op.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    op.add_argument(
        "--lease-namespace", default="kube-system", help="namespace of the Lease (kube-system)"
    )
    op.add_argument("--lease-name", default="stockade-operator", help="name of the Lease")
    op.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    op.add_argument("--renew-period", type=float, default=2.0, help="seconds (default 2)")
    op.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    op.set_defaults(run=run_command)


def config_from(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        leader_election=args.leader_election,
        identity=args.identity,
        metrics_port=args.metrics_port,
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
