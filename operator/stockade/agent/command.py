"""`stockade agent`: run the node agent against a cluster.

`add_parser(subparsers)` plugs the command into `stockade.cli` (it sets `run(args, progress)` as
the parser default, the CLI's convention); `python -m stockade.agent` serves it alone. The
plumbing shared with the operator (common flags, signals, logging) is `stockade.runtime.command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stockade.agent.config import AgentConfig
from stockade.datapath.clang import DEFAULT_CACHE_DIR
from stockade.datapath.maps import DEFAULT_PIN_ROOT
from stockade.runtime.command import add_process_arguments, env, run_process, serve_alone


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
    add_process_arguments(ag)
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
        "--conntrack-on-policy-change",
        choices=("revalidate", "keep"),
        default=env("STOCKADE_CONNTRACK_ON_POLICY_CHANGE", "revalidate"),
        help="established connections when policy changes: judged again at their next packet "
        "(revalidate, the default) or kept until they expire (keep) "
        "($STOCKADE_CONNTRACK_ON_POLICY_CHANGE)",
    )
    ag.add_argument(
        "--service-mode",
        choices=("auto", "netfilter", "fallback"),
        default=env("STOCKADE_SERVICE_MODE", "auto"),
        help="where Service traffic is judged: on the backend after DNAT by a netfilter program "
        "(netfilter, Linux >= 6.4), at the veth on the Service address (fallback), or the first "
        "the kernel supports (auto, the default) ($STOCKADE_SERVICE_MODE)",
    )
    ag.add_argument(
        "--cni-socket",
        type=Path,
        default=env("STOCKADE_CNI_SOCKET", "") or None,
        help="serve stockade-cni's relayed ADD/CHECK/DEL on this unix socket "
        "(e.g. /run/stockade/cni.sock; default: none) ($STOCKADE_CNI_SOCKET)",
    )
    ag.add_argument(
        "--pending-budget",
        type=float,
        default=float(env("STOCKADE_PENDING_BUDGET") or 2),
        help="seconds a new pod may stay pending, waiting for its tables, before "
        "--pending-on-timeout applies (default 2) ($STOCKADE_PENDING_BUDGET)",
    )
    ag.add_argument(
        "--pending-add-wait",
        type=float,
        default=float(env("STOCKADE_PENDING_ADD_WAIT") or 0),
        help="seconds of the budget the CNI ADD itself waits for the pod's tables before it "
        "returns with the pod pending (default 0) ($STOCKADE_PENDING_ADD_WAIT)",
    )
    ag.add_argument(
        "--pending-on-timeout",
        choices=("closed", "open"),
        default=env("STOCKADE_PENDING_ON_TIMEOUT", "closed"),
        help="a pod whose tables missed the budget: closed (only node and neighbour traffic "
        "until they arrive, the default) or open ($STOCKADE_PENDING_ON_TIMEOUT)",
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
        bind_address=args.bind_address,
        conntrack_on_policy_change=args.conntrack_on_policy_change,
        service_mode=args.service_mode,
        cni_socket=args.cni_socket,
        pending_budget=args.pending_budget,
        pending_add_wait=args.pending_add_wait,
        pending_on_timeout=args.pending_on_timeout,
    )


def run_command(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    from stockade.agent.app import Agent

    return run_process(
        args,
        "agent",
        config_from,
        Agent,
        lambda config: f"agent for node {config.node} starting",
        progress,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m stockade.agent [options]`."""
    return serve_alone("python -m stockade.agent", "agent", add_parser, argv)
