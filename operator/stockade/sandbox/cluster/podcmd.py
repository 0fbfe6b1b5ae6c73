"""`stockade sandbox exec` and `stockade sandbox probe`: run a command, or one connection probe,
inside a sandbox pod's network namespace, as `kubectl exec` into the pod would.

    stockade sandbox exec -n NS POD -- COMMAND...
        runs COMMAND with `ip netns exec` in the pod's namespace; its exit status is passed
        through (128+N when a signal N ended it).
    stockade sandbox probe -n NS POD TARGET PORT [--protocol TCP|UDP|SCTP] [--timeout S]
        prints `connected`, `refused` or `timed out` and exits with PROBE_EXIT below.

TARGET is an IP address, `NS/POD` (that pod's IP, from the API server), or a Service name
(`svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) that is resolved by asking the cluster DNS
(10.96.0.10) from inside the pod, as a process of the pod would. The probe is the pod helper's
(`stockade/sandbox/workloads/podagent.py`): TCP connect and echo, UDP echo, SCTP INIT / INIT-ACK.
`stockade.sandbox.session` adds these subcommands next to `up`, `status` and `down`.
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes.client

from stockade.runtime import load_client_configuration
from stockade.sandbox.cluster.dns import CLUSTER_IP
from stockade.sandbox.cluster.dnswire import Rcode, RType
from stockade.sandbox.cluster.pods import PodError, lookup, pod_ip, pod_netns
from stockade.sandbox.topology import Topology
from stockade.sandbox.workloads.traffic import Agent, Outcome

ZONE_SUFFIX = ("svc", "cluster", "local")
PROBE_EXIT = {
    Outcome.CONNECTED: 0,
    Outcome.REFUSED: 3,
    Outcome.TIMEOUT: 4,
    Outcome.ERROR: 5,
}  # 1: could not probe (no such pod, no DNS answer, ...); 2: usage
PRINTED = {Outcome.TIMEOUT: "timed out"}
PROTOCOLS = ("TCP", "UDP", "SCTP")

# Where the sandbox in a state directory keeps its kubeconfig and topology (from session.py).
Locate = Callable[[Path], tuple[Path, Path]]


def service_name(target: str) -> str | None:
    """`svc.ns[.svc[.cluster.local]]` as a fully qualified name, or None if it is not one."""
    labels = target.rstrip(".").lower().split(".")
    if len(labels) < 2 or not all(labels):
        return None
    service, namespace, rest = labels[0], labels[1], tuple(labels[2:])
    if rest != ZONE_SUFFIX[: len(rest)]:
        return None
    return ".".join((service, namespace, *ZONE_SUFFIX))


def resolve(api: Any, netns_name: str, target: str, dns_server: str = CLUSTER_IP) -> str:
    """The address `target` names (see the module docstring); PodError if it names none."""
    try:
        return str(ipaddress.ip_address(target))
    except ValueError:
        pass
    if target.count("/") == 1:
        namespace, name = target.split("/")
        if namespace and name:
            return pod_ip(api, namespace, name)
    fqdn = service_name(target)
    if fqdn is None:
        raise PodError(
            f"TARGET {target!r} must be an IP address, NS/POD, or a Service name "
            "(svc.ns, svc.ns.svc or svc.ns.svc.cluster.local)"
        )
    try:
        rcode, addresses = lookup(netns_name, fqdn, RType.A, dns_server)
        if rcode == Rcode.NOERROR and not addresses:
            rcode, addresses = lookup(netns_name, fqdn, RType.AAAA, dns_server)
    except (TimeoutError, OSError) as exc:
        raise PodError(
            f"TARGET {target!r}: the cluster DNS at {dns_server} did not answer from the pod "
            f"({exc}); is kube-dns running (kubectl -n kube-system get pods -l k8s-app=kube-dns)?"
            " Give the Service's ClusterIP instead."
        ) from None
    if rcode != Rcode.NOERROR or not addresses:
        what = Rcode(rcode).name if rcode in Rcode._value2member_map_ else str(rcode)
        raise PodError(f"TARGET {target!r}: {fqdn} does not resolve ({what}, no address)")
    return addresses[0]


def exec_in_pod(netns_name: str, command: list[str]) -> int:
    """Run `command` in the namespace; its exit status (128+N if signal N ended it)."""
    if not command:
        raise PodError("COMMAND is missing: stockade sandbox exec -n NS POD -- COMMAND...")
    try:
        status = subprocess.run(["ip", "netns", "exec", netns_name, *command], check=False)
    except FileNotFoundError as exc:
        raise PodError(f"cannot run `ip netns exec`: {exc}") from None
    return status.returncode if status.returncode >= 0 else 128 - status.returncode


def probe_from(
    netns_name: str, label: str, dst: str, port: int, protocol: str, timeout: float
) -> tuple[Outcome, str]:
    """One probe from inside the namespace with the pod helper: (outcome, detail)."""
    agent = Agent(netns_name, label)
    try:
        agent.wait_ready()
        reply = agent.request(
            "probe", proto=protocol.lower(), dst=dst, port=port, timeout=timeout, src=None
        ).result(timeout=timeout + 10.0)
    finally:
        agent.close()
    if not reply.get("ok"):
        return Outcome.ERROR, str(reply.get("error"))
    return Outcome(reply["outcome"]), str(reply["detail"])


# -- command line ----------------------------------------------------------------------------


def _api(kubeconfig: Path) -> Any:
    if not kubeconfig.exists():
        raise PodError(f"no sandbox is running: {kubeconfig} does not exist (stockade sandbox up)")
    return kubernetes.client.ApiClient(load_client_configuration(str(kubeconfig)))


def _topology(path: Path) -> Topology | None:
    return Topology.load(path) if path.exists() else None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"PORT must be a number, got {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"PORT must be within 1..65535, got {port}")
    return port


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout must be seconds, got {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"--timeout must be within (0, 60] seconds, got {value}")
    return value


def run_exec(args: argparse.Namespace, locate: Locate) -> int:
    kubeconfig, topology = locate(args.state_dir)
    with _api(kubeconfig) as api:
        ns = pod_netns(api, _topology(topology), args.namespace, args.pod)
    return exec_in_pod(ns, list(args.command))


def run_probe(args: argparse.Namespace, locate: Locate) -> int:
    kubeconfig, topology = locate(args.state_dir)
    with _api(kubeconfig) as api:
        ns = pod_netns(api, _topology(topology), args.namespace, args.pod)
        dst = resolve(api, ns, args.target)
    label = f"{args.namespace}/{args.pod}"
    outcome, detail = probe_from(ns, label, dst, args.port, args.protocol, args.timeout)
    word = PRINTED.get(outcome, outcome.value)
    print(word if outcome is not Outcome.ERROR else f"error: {detail}")
    return PROBE_EXIT[outcome]


def add_parsers(commands: Any, locate: Locate) -> None:
    """Add `exec` and `probe` to the `stockade sandbox` subcommands."""
    cmd_exec = commands.add_parser(
        "exec",
        help="run a command in a pod's network namespace",
        description="Run COMMAND inside the pod's network namespace (ip netns exec); the exit "
        "status is COMMAND's.",
    )
    cmd_exec.add_argument("-n", "--namespace", default="default", help="the pod's namespace")
    cmd_exec.add_argument("pod", metavar="POD")
    cmd_exec.add_argument("command", metavar="COMMAND", nargs="+", help="after --")
    cmd_exec.set_defaults(run=lambda args, progress: run_exec(args, locate))
    cmd_probe = commands.add_parser(
        "probe",
        help="probe TARGET:PORT from a pod: connected, refused or timed out",
        description="Open one connection from the pod to TARGET:PORT and print what happened.",
        epilog="TARGET: an IP address, NS/POD, or svc.ns[.svc[.cluster.local]] (resolved by the "
        "cluster DNS from inside the pod). Exit status: 0 connected, 3 refused, 4 timed out, "
        "5 probe error, 1 could not probe (pod or name not found, DNS not answering), 2 usage.",
    )
    cmd_probe.add_argument("-n", "--namespace", default="default", help="the pod's namespace")
    cmd_probe.add_argument("pod", metavar="POD")
    cmd_probe.add_argument("target", metavar="TARGET")
    cmd_probe.add_argument("port", metavar="PORT", type=_port)
    cmd_probe.add_argument(
        "--protocol", type=str.upper, choices=PROTOCOLS, default="TCP", help="default TCP"
    )
    cmd_probe.add_argument(
        "--timeout", type=_timeout, default=2.0, help="seconds to wait (default 2)"
    )
    cmd_probe.set_defaults(run=lambda args, progress: run_probe(args, locate))
