"""`stockade operator`: run the operator (kopf) against a cluster.

`add_parser(subparsers)` plugs the command into `stockade.cli` (it sets `run(args, progress)` as
the parser default, the CLI's convention); `python -m stockade.control` serves it alone. The
plumbing shared with the agent (common flags, signals, logging) is `stockade.runtime.command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from stockade.control.config import LOWERING_MODES, OperatorConfig
from stockade.runtime.command import add_process_arguments, env, on_off, run_process, serve_alone


def add_parser(subparsers: Any) -> None:
    """Add `operator` to a command line built with argparse."""
    op = subparsers.add_parser(
        "operator",
        help="run the stockade operator (watches policies, publishes DatapathTables)",
        description="Watch policies, pods, namespaces and nodes; publish each node's datapath "
        "tables as DatapathTable objects; report policy status.",
    )
    add_process_arguments(op)
    op.add_argument(
        "--namespace", help="watch namespaced objects in this namespace only (default: all)"
    )
    op.add_argument(
        "--leader-election",
        type=on_off,
        nargs="?",
        const=True,
        default=True,
        metavar="on|off",
        help="hold a coordination.k8s.io Lease before publishing (default: on)",
    )
    op.add_argument(
        "--identity", default=env("POD_NAME", ""), help="lease holder identity ($POD_NAME)"
    )
    op.add_argument(
        "--upstream-cnp",
        type=on_off,
        default=on_off(env("STOCKADE_UPSTREAM_CNP", "on") or "on"),
        metavar="on|off",
        help="enforce policy.networking.k8s.io ClusterNetworkPolicy ($STOCKADE_UPSTREAM_CNP, on)",
    )
    op.add_argument(
        "--lease-namespace",
        default=env("POD_NAMESPACE", "kube-system"),
        help="namespace of the Lease ($POD_NAMESPACE, else kube-system)",
    )
    op.add_argument(
        "--lease-name",
        default=env("STOCKADE_LEASE_NAME", "stockade-operator"),
        help="name of the Lease ($STOCKADE_LEASE_NAME, else stockade-operator)",
    )
    op.add_argument(
        "--service-space",
        type=on_off,
        default=on_off(env("STOCKADE_SERVICE_SPACE", "on") or "on"),
        metavar="on|off",
        help="judge flows to Services on their backends: hand the agents the Service address "
        "space and a Shape with services ($STOCKADE_SERVICE_SPACE, on)",
    )
    op.add_argument(
        "--service-cidrs",
        default=env("STOCKADE_SERVICE_CIDRS", ""),
        help="comma-separated Service CIDRs, used while the API serves no ServiceCIDR "
        "($STOCKADE_SERVICE_CIDRS)",
    )
    op.add_argument(
        "--node-port-range",
        default=env("STOCKADE_NODE_PORT_RANGE", "30000-32767"),
        help="the API server's --service-node-port-range ($STOCKADE_NODE_PORT_RANGE, 30000-32767)",
    )
    op.add_argument(
        "--lowering",
        choices=LOWERING_MODES,
        default=env("STOCKADE_LOWERING", "process") or "process",
        help="where the lowering runs: a worker process fed the store's changes, so that "
        "the watches never wait for it, or the reconcile thread, for debugging "
        "($STOCKADE_LOWERING, process)",
    )
    op.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    op.add_argument("--renew-period", type=float, default=2.0, help="seconds (default 2)")
    op.set_defaults(run=run_command)


def config_from(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        leader_election=args.leader_election,
        identity=args.identity,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        bind_address=args.bind_address,
        upstream_cnp=args.upstream_cnp,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_duration=args.lease_duration,
        renew_period=args.renew_period,
        service_space=args.service_space,
        service_cidrs=tuple(c.strip() for c in args.service_cidrs.split(",") if c.strip()),
        node_port_range=_port_range(args.node_port_range),
        lowering=args.lowering,
    )


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--node-port-range: {text!r} is not LOW-HIGH") from None


def run_command(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    from stockade.control.app import Operator

    return run_process(
        args,
        "operator",
        config_from,
        Operator,
        lambda config: f"operator {config.identity} starting",
        progress,
        quiet_loggers=("kopf",),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m stockade.control [options]`."""
    return serve_alone("python -m stockade.control", "operator", add_parser, argv)
