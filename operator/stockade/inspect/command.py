"""`stockade explain | observe | usage | status`, and the same as `kubectl stockade ...`
(`kubectl_main`, the `kubectl-stockade` entry point: kubectl runs any `kubectl-<name>` on the
PATH as `kubectl <name>`).

`add_parsers(subparsers)` plugs the four commands into `stockade.cli`, each setting
`run(args, progress) -> int` as its parser default (the CLI's convention). Exit status: 0 when
all is well, 1 on an error (a bad argument names it; an agent that could not be asked is named
too), 2 when `explain` finds the datapath disagreeing with the reference evaluator or `status`
finds a node that is not healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import kubernetes.client

from stockade.inspect import explain, live, observe, status
from stockade.inspect.agents import (
    DEFAULT_NAMESPACE,
    DEFAULT_PORT,
    Agents,
    DirectAgents,
    ProxyAgents,
    parse_agent_urls,
)
from stockade.model.policy import Protocol
from stockade.runtime import AGENTS_ENV, load_client_configuration

EXIT_UNHEALTHY = 2
NAMES_EVERY = 10  # observe --follow reads the pods again every this many polls


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, ~/.kube/config)"
    )
    parser.add_argument(
        "--agent-namespace",
        default=DEFAULT_NAMESPACE,
        help="namespace of the agent pods, reached through the API server's pods/proxy "
        f"(default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--agent-port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the agents' metrics port (default {DEFAULT_PORT}, the chart's)",
    )
    parser.add_argument(
        "--agent",
        action="append",
        metavar="NODE=URL",
        help="ask the agent of NODE at URL instead of through the API server (repeat per node; "
        f"default ${AGENTS_ENV}, NODE=URL,...: `stockade sandbox up` prints it for its agents)",
    )
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


Run = Callable[[argparse.Namespace, Callable[[str], None]], int]


def _errors(run: Run) -> Run:
    """A bad argument (ValueError) or an API server refusal as a RuntimeError naming it, which
    `stockade.cli.main` and `kubectl_main` print as one error line."""

    def wrapped(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
        try:
            return run(args, progress)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from exc
        except kubernetes.client.exceptions.ApiException as exc:
            raise RuntimeError(f"API server: {exc.status} {exc.reason}") from exc

    return wrapped


def add_parsers(subparsers: Any) -> None:
    ex = subparsers.add_parser(
        "explain",
        help="why a connection is allowed or denied: the reference evaluator and the datapath",
        description="Judge a connection's first packet with the reference evaluator on the live "
        "cluster, and run it through the programs loaded on the source's and the destination's "
        "nodes (no traffic sent). Exits 2 when they disagree.",
    )
    ex.add_argument("--from", dest="src", required=True, metavar="NS/POD|IP")
    ex.add_argument("--to", dest="dst", required=True, metavar="NS/POD|IP")
    ex.add_argument("--port", type=int, default=None, help="destination port (ICMP: the type)")
    ex.add_argument("--code", type=int, default=0, help="ICMP code (default 0)")
    ex.add_argument(
        "--protocol",
        default="TCP",
        type=str.upper,
        choices=("TCP", "UDP", "SCTP", "ICMP", "ICMPV6"),
    )
    ex.add_argument("--ipv6", action="store_true", help="use the pods' IPv6 addresses")
    ex.add_argument(
        "--reference-only", action="store_true", help="do not ask the agents (no datapath part)"
    )
    _connection(ex)
    ex.set_defaults(run=_errors(run_explain))

    ob = subparsers.add_parser(
        "observe",
        help="stream dropped and audited flows from every node, aggregated per pod pair and rule",
    )
    ob.add_argument("-n", "--namespace")
    ob.add_argument("--pod", help="only flows from or to this pod (with -n, of that namespace)")
    ob.add_argument("--policy", help="only flows decided by a policy of this name")
    ob.add_argument("--verdict", choices=("drop", "audit", "all"), default="all")
    ob.add_argument("-f", "--follow", action="store_true", help="keep printing what changes")
    ob.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    _connection(ob)
    ob.set_defaults(run=_errors(run_observe))

    us = subparsers.add_parser(
        "usage", help="per-rule hit counts over every node, and the rules that matched nothing"
    )
    us.add_argument("-n", "--namespace")
    _connection(us)
    us.set_defaults(run=_errors(run_usage))

    st = subparsers.add_parser(
        "status", help="each node's agent: what it applied, its mode and its errors"
    )
    _connection(st)
    st.set_defaults(run=_errors(run_status))


def _api(args: argparse.Namespace) -> Any:
    return kubernetes.client.ApiClient(load_client_configuration(args.kubeconfig))


def _agents(args: argparse.Namespace, api: Any) -> Agents:
    urls = parse_agent_urls(args.agent, os.environ.get(AGENTS_ENV))
    if urls:
        return DirectAgents(urls)
    return ProxyAgents(api, args.agent_namespace, args.agent_port)


def _print(text: str) -> None:
    print(text, flush=True)


def run_explain(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    protocol = Protocol.ICMPV6 if args.protocol == "ICMPV6" else Protocol(args.protocol)
    if protocol in explain.ICMP:
        port = args.port if args.port is not None else 8  # echo request
    elif args.port is None:
        raise ValueError(f"--port: required for {protocol.value}")
    else:
        port = args.port
    api = _api(args)
    with api:
        current = live.read(api)
        family = 6 if args.ipv6 or protocol is Protocol.ICMPV6 else 4
        src = explain.resolve(current, args.src, family)
        dst = explain.resolve(current, args.dst, family)
        flow = explain.flow_of(src, dst, protocol, port, args.code)
        agents = None if args.reference_only else _agents(args, api)
        result = explain.explain(current, agents, src, dst, flow)
    _print(json.dumps(result.body(), indent=2) if args.output == "json" else explain.render(result))
    return 0 if result.agree else explain.EXIT_DISAGREE


def run_observe(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    api = _api(args)
    with api:
        agents = _agents(args, api)
        names = live.read(api).pod_name
        flt = observe.Filter(args.namespace, args.pod, args.policy, args.verdict)
        watcher = observe.Observer(agents, names, flt)
        lost, polls = -1, 0
        while True:
            polls += 1
            for line in observe.render_flows(watcher.poll(), args.output):
                _print(line)
            for error in watcher.errors:
                print(f"stockade: {error}", file=sys.stderr)
            if watcher.events_lost != lost:
                lost = watcher.events_lost
                if lost:
                    print(f"stockade: {lost} event(s) lost on the nodes", file=sys.stderr)
            if not args.follow:
                return 1 if watcher.errors else 0
            time.sleep(args.interval)
            if polls % NAMES_EVERY == 0:  # pods come and go: name them afresh now and then
                watcher.names = live.read(api).pod_name


def run_usage(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    api = _api(args)
    with api:
        report = observe.usage(live.read(api, args.namespace), _agents(args, api), args.namespace)
    if args.output == "json":
        _print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print("\n".join(observe.render_usage(report)))
    return 1 if report["errors"] else 0


def run_status(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    api = _api(args)
    with api:
        report = status.status(api, _agents(args, api))
    if args.output == "json":
        _print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print("\n".join(status.render(report)))
    return 0 if report["healthy"] else EXIT_UNHEALTHY


def build_kubectl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl stockade",
        description="stockade's view of a cluster: explain, observe, usage, status.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(subparsers)
    return parser


def kubectl_main(argv: list[str] | None = None) -> int:
    """`kubectl stockade ...` (the `kubectl-stockade` entry point)."""
    args = build_kubectl_parser().parse_args(argv)
    try:
        code: int = args.run(args, lambda message: None)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"kubectl stockade: error: {exc}", file=sys.stderr)
        return 1
    return code
