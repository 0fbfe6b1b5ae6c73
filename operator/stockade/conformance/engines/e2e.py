"""The `e2e` engine: conformance cases on the whole stack, with real traffic.

`stockade conformance run FILE --engine e2e` runs every case on a sandbox (`stockade sandbox up`:
kube-apiserver and etcd, network-namespace nodes, the operator and one agent per node). The
engine starts a sandbox of its own for the run (tied to this process, removed at the end), or
uses the one running in `$STOCKADE_E2E_SANDBOX` (a state directory) and leaves it running.

The model's pods are real: each one a network namespace on its node (placed round-robin over at
least two nodes, or where the model pins it) with a Pod object whose container ports are named
as the case file says (`serve-<port>-<proto>`, or the model's `serves[].name`), and an echo
server on each port. Host-network pods are their node: they serve on the node's address. Pod
specs are immutable, so every pod declares the union of the ports of the cases run so far; a case
that needs more replaces the Pod objects (same pod, same address). Policies go through the API
server as `kubectl` would send them (create, replace with the object's resourceVersion, delete),
and the operator and agents do the rest.

Probes are real connections from the source pod's namespace (TCP connect and echo, UDP echo,
ICMP echo; SCTP as crafted INIT / INIT-ACK packets over raw sockets, since this kernel has no
SCTP module: the pods' helper answers INIT itself). As upstream does, a check is probed until the
observation matches the expectation or the deadline (10 s) passes; a denied check must time out,
a refusal is a failure.

With `via="service"` (`--via service`) every TCP and UDP probe goes to a ClusterIP Service of its
destination pod instead of the pod's address, with the same expectations: one selector-less
Service per pod (`stk-<pod>`, every port the pod serves, port = targetPort) and an EndpointSlice
naming the pod, so that no label is added that a policy could select. kube-proxy DNATs the
ClusterIP to the pod, and stockade judges the flow on it (docs/services.md): a sandbox the engine
starts runs its operator with the Service space on. ICMP and SCTP probes (no Service translates
ICMP; SCTP is crafted here, as the kernel has no SCTP module) still go to the pod's address.

With `via="nodeport"` (`--via nodeport`) the per-pod Service is of type NodePort, and every TCP
and UDP probe goes to its node port on a node other than the source's (the other node of a
two-node sandbox): the client's node forwards the packet to that node, whose kube-proxy DNATs
it to the pod (docs/services.md says how such a flow is judged).

A sandbox the engine starts runs kube-proxy in the mode `$STOCKADE_E2E_PROXY_MODE` names
(nftables by default), and its agents in the Service mode `$STOCKADE_SERVICE_MODE` names (auto by
default): `bench/conformance_services.py` runs the suites through Services in each.

Fresh namespaces between cases would be slow: the controller manager deletes a Namespace in the
background while the next case wants the same name at once, so the engine resets instead.
`teardown` deletes every policy the case created and restores the labels of every namespace and pod
the case relabelled to the model's; the next `setup` then probes every pod pair until all connect
again (the reset has reached the datapath) before the case starts.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes.client

from stockade.conformance.casefile import (
    Action,
    AddNamespaceLabels,
    AddPodLabels,
    Case,
    Check,
    Expect,
    PodModel,
    Topology,
)
from stockade.conformance.engine import ActionRejectedError, Addresses, Observed, Outcome
from stockade.conformance.engines.apiserver import ApiServerActions, call_api
from stockade.conformance.world import World, default_placement
from stockade.model.policy import IPAddress, Protocol
from stockade.sandbox import session
from stockade.sandbox.node.proxy import DEFAULT_MODE, PROXY_MODES, ProxyMode
from stockade.sandbox.stack import published_generations, wait_applied
from stockade.sandbox.topology import PodNet
from stockade.sandbox.workloads.running import Port, RunningSandbox, UnknownPolicyKindError
from stockade.sandbox.workloads.traffic import Outcome as Seen
from stockade.sandbox.workloads.traffic import PodProcesses, Probe, ProbeResult

SANDBOX_ENV = "STOCKADE_E2E_SANDBOX"
VIA_POD, VIA_SERVICE, VIA_NODEPORT = "pod", "service", "nodeport"
VIAS = (VIA_POD, VIA_SERVICE, VIA_NODEPORT)
PROXY_MODE_ENV = "STOCKADE_E2E_PROXY_MODE"
SERVICE_PREFIX = "stk-"
DEADLINE_S = 10.0
PROBE_TIMEOUT_S = 1.0
SETTLE_TIMEOUT_S = 3.0
RETRY_PAUSE_S = 0.1
_SEEN = {
    Seen.CONNECTED: Outcome.CONNECTED,
    Seen.TIMEOUT: Outcome.TIMEOUT,
    Seen.REFUSED: Outcome.REFUSED,
    Seen.ERROR: Outcome.ERROR,
}


def _stderr(message: str) -> None:
    print(f"e2e: {message}", file=sys.stderr, flush=True)


@dataclass
class ProbeStats:
    """How many probe rounds checks needed: the figures `close()` prints."""

    checks: int = 0
    first_try: int = 0
    unmatched: int = 0
    probes: int = 0
    max_attempts: int = 0
    max_match_s: float = 0.0
    steps: int = 0
    rounds: int = 0
    baseline_rounds: int = 0

    def line(self) -> str:
        share = 100.0 * self.first_try / self.checks if self.checks else 100.0
        return (
            f"{self.checks} checks in {self.steps} steps: {share:.1f}% as expected on the first "
            f"probe, at most {self.max_attempts} attempts and {self.max_match_s:.1f}s to match, "
            f"{self.unmatched} never matched; {self.probes} probes in {self.rounds} rounds; "
            f"{self.baseline_rounds} rounds to confirm the resets"
        )


@dataclass
class _Pod:
    key: str
    who: str  # PodProcesses target: the pod key, or the node name for a host-network pod
    net: PodNet
    host_network: bool
    ports: list[Port] = field(default_factory=list)
    served: set[tuple[int, str]] = field(default_factory=set)


class E2EEngine(ApiServerActions):
    name = "e2e"

    def __init__(
        self,
        ip_family: int = 4,
        *,
        sandbox_dir: Path | None = None,
        deadline_s: float = DEADLINE_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        progress: Callable[[str], None] = _stderr,
        via: str = VIA_POD,
    ) -> None:
        if ip_family not in (4, 6):
            raise ValueError(f"ip_family must be 4 or 6, got {ip_family}")
        if via not in VIAS:
            raise ValueError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
        self.via = via
        self.services: dict[str, str] = {}  # pod key -> its Service's ClusterIP (via service)
        # pod key -> (port, protocol) -> its Service's node port (via nodeport)
        self.node_ports: dict[str, dict[tuple[int, str], int]] = {}
        self.family = ip_family
        self.sandbox_dir = sandbox_dir
        self.deadline_s = deadline_s
        self.probe_timeout_s = probe_timeout_s
        self.progress = progress
        self.stats = ProbeStats()
        self.sandbox: RunningSandbox | None = None
        self.own_state_dir: Path | None = None
        self.workload: PodProcesses | None = None
        self.model: Topology | None = None
        self.pods: dict[str, _Pod] = {}
        self.placement: dict[str, str] = {}
        self.node_names: dict[str, str] = {}  # model node -> sandbox node
        self.world: World | None = None
        self.addresses: Addresses | None = None
        self._relabelled_pods: set[str] = set()
        self._relabelled_namespaces: set[str] = set()
        self._closed = False
        self._published_before: dict[str, int | None] | None = None

    # -- the Engine protocol -------------------------------------------------------------------

    def unsupported(self, case: Case) -> str | None:
        return None

    def setup(self, topology: Topology, case: Case) -> Addresses:
        sandbox = self._ensure_sandbox(topology)
        if self.model != topology:
            self._build_model(sandbox, topology, case)
        self._ensure_ports(sandbox, case)
        world = World(topology, case)
        world.placement = dict(self.placement)
        self.world = world
        self.addresses = self._addresses()
        self._confirm_reset()
        return self.addresses

    def apply(self, action: Action) -> None:
        world = self._world()
        if self._published_before is None:
            self._published_before = self._published()
        self._send(world, action)
        if isinstance(action, AddPodLabels):  # sent: teardown restores the model's labels
            self._relabelled_pods.add(action.pod)
        elif isinstance(action, AddNamespaceLabels):
            self._relabelled_namespaces.add(action.namespace)

    def probe(self, checks: Sequence[Check]) -> list[Observed]:
        self._settle()
        self.stats.steps += 1
        observed = self._probe_until(checks)
        for seen, attempts, elapsed in observed.values():
            self.stats.checks += 1
            self.stats.first_try += attempts == 1 and seen.as_expected
            self.stats.unmatched += not seen.as_expected
            if seen.as_expected:
                self.stats.max_attempts = max(self.stats.max_attempts, attempts)
                self.stats.max_match_s = max(self.stats.max_match_s, elapsed)
        return [observed[i][0] for i in range(len(checks))]

    def teardown(self) -> None:
        """Reset to the model: no policies, the model's labels (see the module docstring)."""
        world, self.world, self.addresses = self.world, None, None
        self._published_before = None
        if world is None or self.sandbox is None:
            return
        changes = world.objects or self._relabelled_namespaces or self._relabelled_pods
        before = self._published() if changes else None
        for obj in world.objects.values():
            self._delete(obj)
        model = world.topology
        for namespace in sorted(self._relabelled_namespaces):
            self.sandbox.set_namespace_labels(namespace, model.namespaces[namespace])
        for pod in model.pods:
            if pod.key in self._relabelled_pods:
                self._set_pod_labels(pod.key, pod.labels)
        self._relabelled_namespaces.clear()
        if before is not None:
            # A shortcut, as `_settle`: the next `_confirm_reset` judges the reset, but its
            # first round, sent before the agents applied it, would wait out a probe timeout
            # on every pair the case denied. This wait is never longer than that timeout.
            nodes = [n.name for n in self.sandbox.nodes]
            wait_applied(self.sandbox.api, nodes, before, self.probe_timeout_s)
        self._relabelled_pods.clear()

    def close(self) -> None:
        """Stop the probes' helpers; remove the sandbox this engine started, or the pods it
        added to a sandbox it found running. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        if self.stats.checks:
            self.progress(self.stats.line())
        if self.workload is not None:
            self.workload.close()
        sandbox, self.sandbox = self.sandbox, None
        if self.own_state_dir is not None:
            self.progress("removing the engine's sandbox")
            session.down(self.own_state_dir, lambda _: None)
            with contextlib.suppress(OSError):
                self.own_state_dir.rmdir()
        elif sandbox is not None:
            self._remove_services(sandbox)
            for pod in self.pods.values():
                with contextlib.suppress(Exception):
                    sandbox.remove_pod(pod.key)
        if sandbox is not None:
            sandbox.close()

    # -- the sandbox and the model -------------------------------------------------------------

    def _ensure_sandbox(self, topology: Topology) -> RunningSandbox:
        if self.sandbox is not None:
            return self.sandbox
        if self._closed:
            raise RuntimeError("e2e engine: used after close()")
        atexit.register(self.close)
        if self.sandbox_dir is not None:
            self.progress(f"using the sandbox in {self.sandbox_dir}")
            self.sandbox = RunningSandbox.open(self.sandbox_dir)
        else:
            nodes = max(2, len(topology.nodes))
            self.own_state_dir = Path(tempfile.mkdtemp(prefix="stockade-e2e-", dir="/run"))
            self.progress(f"starting a {nodes}-node sandbox in {self.own_state_dir}")
            started = time.monotonic()
            if self.via != VIA_POD:  # the operator (a child) hands out the Service space
                os.environ["STOCKADE_SERVICE_SPACE"] = "on"
            proxy_mode = os.environ.get(PROXY_MODE_ENV) or DEFAULT_MODE
            if proxy_mode not in PROXY_MODES:
                raise ValueError(f"${PROXY_MODE_ENV}: {proxy_mode!r} is not one of {PROXY_MODES}")
            session.up(
                self.own_state_dir,
                nodes,
                "routed",
                self._quiet,
                detach=False,
                proxy_mode=cast(ProxyMode, proxy_mode),
            )
            self.sandbox = RunningSandbox.open(self.own_state_dir)
            self.progress(
                f"sandbox run {self.sandbox.topology.run_id} with operator and agents up in "
                f"{time.monotonic() - started:.1f}s"
            )
        self.workload = PodProcesses(self.sandbox.topology, crafted_sctp=True)
        return self.sandbox

    def _quiet(self, message: str) -> None:
        if os.environ.get("STOCKADE_E2E_VERBOSE"):
            self.progress(message)

    def _build_model(self, sandbox: RunningSandbox, topology: Topology, case: Case) -> None:
        """Namespaces, nodes' labels and pods of the model (replacing another model's pods)."""
        for pod in self.pods.values():
            sandbox.remove_pod(pod.key)
        self.pods.clear()
        real = [n.name for n in sandbox.nodes]
        model_nodes = [n.name for n in topology.nodes] or real[: max(2, len(real))]
        if len(model_nodes) > len(real):
            raise RuntimeError(f"the model needs {len(model_nodes)} nodes, the sandbox has {real}")
        self.node_names = dict(zip(model_nodes, real, strict=False))
        for model_node in topology.nodes:
            sandbox.label_node(self.node_names[model_node.name], model_node.labels)
        sandbox.delete_all_policies(list(topology.namespaces))  # left by an earlier run
        for namespace, labels in topology.namespaces.items():
            sandbox.ensure_namespace(namespace, labels)
        self.placement = default_placement(topology, model_nodes)
        self.progress(f"creating {len(topology.pods)} pods on {', '.join(real)}")
        for model in topology.pods:
            node = self.node_names[self.placement[model.key]]
            ports = _ports(case, model)
            net = sandbox.add_pod(
                model.key, node, model.labels, ports, host_network=model.host_network
            )
            who = node if model.host_network else model.key
            self.pods[model.key] = _Pod(model.key, who, net, model.host_network, ports)
        self.model = topology

    def _ensure_ports(self, sandbox: RunningSandbox, case: Case) -> None:
        """Declare (replacing Pod objects) and serve every port the case needs, keeping those
        that earlier cases needed."""
        assert self.model is not None and self.workload is not None
        for model in self.model.pods:
            pod = self.pods[model.key]
            new = [p for p in _ports(case, model) if p not in pod.ports]
            if new:
                pod.ports += new
                sandbox.reregister_pod(model.key, pod.net, model.labels, pod.ports)
            serve = {(port, proto.lower()) for _, port, proto in pod.ports} - pod.served
            if serve:
                self.workload.serve(pod.who, sorted(serve))
                pod.served |= serve
            wants_service = self.via != VIA_POD and not pod.host_network
            if wants_service and (new or model.key not in self.services):
                self.services[model.key] = self._publish_service(pod)

    def _addresses(self) -> Addresses:
        pods: dict[str, tuple[IPAddress, ...]] = {
            key: (ipaddress.ip_address(p.net.ip_v4), ipaddress.ip_address(p.net.ip_v6))
            for key, p in self.pods.items()
        }
        assert self.sandbox is not None
        nodes: dict[str, tuple[IPAddress, ...]] = {}
        for model_node, real in self.node_names.items():
            node = self.sandbox.topology.node(real)
            nodes[model_node] = (ipaddress.ip_address(node.ip_v4), ipaddress.ip_address(node.ip_v6))
        return Addresses(pods, nodes, self.family)

    # -- probing -------------------------------------------------------------------------------

    def _probe_until(self, checks: Sequence[Check]) -> dict[int, tuple[Observed, int, float]]:
        """Probe every check until each is as expected or the deadline passes: index ->
        (last observation, attempts, seconds until it matched)."""
        started = time.monotonic()
        deadline = started + self.deadline_s
        result: dict[int, tuple[Observed, int, float]] = {}
        pending = list(range(len(checks)))
        attempts = 0
        while pending:
            attempts += 1
            self.stats.rounds += 1
            self.stats.probes += len(pending)
            seen = self._probe_once([checks[i] for i in pending])
            for index, outcome in zip(pending, seen, strict=True):
                result[index] = (outcome, attempts, time.monotonic() - started)
            pending = [i for i in pending if not result[i][0].as_expected]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(RETRY_PAUSE_S)
        return result

    def _probe_once(self, checks: Sequence[Check]) -> list[Observed]:
        assert self.workload is not None and self.addresses is not None
        out: list[Observed | None] = [None] * len(checks)
        probes: list[tuple[int, Probe]] = []
        pings: list[tuple[int, tuple[str, str]]] = []
        for index, check in enumerate(checks):
            src = self.pods[check.src].who
            dst = str(self.addresses.pod_ip(check.dst))
            port = check.port or 0
            if check.protocol in (Protocol.TCP, Protocol.UDP) and check.dst in self.services:
                dst = self.services[check.dst]
                if self.via == VIA_NODEPORT:
                    dst = self._other_node_address(check.src)
                    port = self.node_ports[check.dst].get((port, check.protocol.value), 0)
            if check.protocol.has_ports:
                proto = check.protocol.value.lower()
                timeout = self.probe_timeout_s
                probes.append((index, Probe(src, dst, port, proto, timeout)))
            else:
                pings.append((index, (src, dst)))
        results: list[tuple[int, ProbeResult]] = []
        if probes:
            found = self.workload.probe_many([p for _, p in probes])
            results += [(i, r) for (i, _), r in zip(probes, found, strict=True)]
        if pings:
            found = self.workload.ping_many([p for _, p in pings], self.probe_timeout_s)
            results += [(i, r) for (i, _), r in zip(pings, found, strict=True)]
        for index, seen in results:
            out[index] = Observed(checks[index], _SEEN[seen.outcome], seen.detail)
        return [o for o in out if o is not None]

    def _confirm_reset(self) -> None:
        """Probe every pair of non-host-network pods on a TCP or UDP port the destination
        serves until all connect: the previous case's policies are gone from the datapath."""
        checks = []
        for src in self.pods.values():
            for dst in self.pods.values():
                if src is dst or src.host_network or dst.host_network:
                    continue
                ports = sorted(p for p in dst.served if p[1] in ("tcp", "udp"))
                if not ports:
                    continue
                port, proto = ports[0]
                checks.append(
                    Check(src.key, dst.key, Protocol(proto.upper()), port, Expect.ALLOWED)
                )
        result = self._probe_until(checks)
        self.stats.baseline_rounds += max((a for _, a, _ in result.values()), default=0)
        wrong = [seen.describe() for seen, _, _ in result.values() if not seen.as_expected]
        if wrong:
            raise RuntimeError(
                f"the reset to the model did not reach the datapath within {self.deadline_s:.0f}s: "
                + "; ".join(wrong[:5])
            )

    def _published(self) -> dict[str, int | None]:
        sandbox = self._sandbox()
        return published_generations(sandbox.api, [n.name for n in sandbox.nodes])

    def _settle(self) -> None:
        """Wait (at most a few seconds) until the operator has published something new since
        this step's first action and every agent has applied it. Only a shortcut: the probes'
        retries are what judge, but fewer stale observations mean fewer vacuous matches."""
        before, self._published_before = self._published_before, None
        if before is not None:  # else no action in this step
            sandbox = self._sandbox()
            wait_applied(sandbox.api, [n.name for n in sandbox.nodes], before, SETTLE_TIMEOUT_S)

    def _other_node_address(self, src: str) -> str:
        """The address of a node other than the one pod `src` runs on (via nodeport)."""
        sandbox = self._sandbox()
        here = self.node_names[self.placement[src]]
        other = next(n for n in sandbox.nodes if n.name != here)
        node = sandbox.topology.node(other.name)
        return node.ip_v4 if self.family == 4 else node.ip_v6

    # -- Services (via service, via nodeport) ----------------------------------------------------

    def _publish_service(self, pod: _Pod) -> str:
        """(Re)create the pod's selector-less Service and its EndpointSlice; its ClusterIP."""
        sandbox = self._sandbox()
        namespace, _, name = pod.key.partition("/")
        service = f"{SERVICE_PREFIX}{name}"
        family = "IPv4" if self.family == 4 else "IPv6"
        address = pod.net.ip_v4 if self.family == 4 else pod.net.ip_v6
        ports = [
            {"name": f"p{port}-{proto.lower()}", "port": port, "protocol": proto.upper()}
            for _, port, proto in pod.ports
            if proto.upper() in ("TCP", "UDP")
        ]
        core = self._core()
        discovery: Any = kubernetes.client.DiscoveryV1Api(sandbox.api)  # takes plain dicts
        with contextlib.suppress(kubernetes.client.ApiException):
            core.delete_namespaced_service(service, namespace)
        with contextlib.suppress(kubernetes.client.ApiException):
            discovery.delete_namespaced_endpoint_slice(service, namespace)
        created = core.create_namespaced_service(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": service, "namespace": namespace},
                "spec": {
                    "type": "NodePort" if self.via == VIA_NODEPORT else "ClusterIP",
                    "ports": [{**p, "targetPort": p["port"]} for p in ports],
                    "ipFamilies": [family],
                    "ipFamilyPolicy": "SingleStack",
                },
            },
        )
        self.node_ports[pod.key] = {
            (p.port, p.protocol): p.node_port for p in created.spec.ports if p.node_port
        }
        slice_body: dict[str, Any] = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": service,
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "stockade-conformance",
                },
            },
            "addressType": family,
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": ports,
        }
        discovery.create_namespaced_endpoint_slice(namespace, slice_body)
        return str(created.spec.cluster_ip)

    def _remove_services(self, sandbox: RunningSandbox) -> None:
        core = kubernetes.client.CoreV1Api(sandbox.api)
        discovery: Any = kubernetes.client.DiscoveryV1Api(sandbox.api)  # takes plain dicts
        for key in self.services:
            namespace, _, name = key.partition("/")
            with contextlib.suppress(Exception):
                core.delete_namespaced_service(f"{SERVICE_PREFIX}{name}", namespace)
            with contextlib.suppress(Exception):
                discovery.delete_namespaced_endpoint_slice(f"{SERVICE_PREFIX}{name}", namespace)
        self.services.clear()
        self.node_ports.clear()

    # -- the API server --------------------------------------------------------------------------

    def _world(self) -> World:
        if self.world is None:
            raise RuntimeError("e2e engine: setup() was not called")
        return self.world

    def _core(self) -> Any:
        assert self.sandbox is not None
        return kubernetes.client.CoreV1Api(self.sandbox.api)

    def _set_pod_labels(self, key: str, labels: Mapping[str, str]) -> None:
        ns, _, name = key.partition("/")
        current = self._core().read_namespaced_pod(name, ns).metadata.labels or {}
        patch: dict[str, str | None] = {k: None for k in current if k not in labels}
        patch.update(labels)
        self._core().patch_namespaced_pod(name, ns, {"metadata": {"labels": patch}})

    @staticmethod
    def _call(request: Callable[[], Any]) -> Any:
        try:
            return call_api(request)
        except UnknownPolicyKindError as err:
            raise ActionRejectedError(str(err)) from err

    def _create(self, obj: Mapping[str, Any]) -> None:
        self._call(lambda: self._sandbox().create_policy(obj))

    def _replace(self, obj: Mapping[str, Any]) -> None:
        self._call(lambda: self._sandbox().replace_policy(obj))

    def _delete(self, obj: Mapping[str, Any]) -> None:
        self._call(lambda: self._sandbox().delete_policy(obj))

    def _sandbox(self) -> RunningSandbox:
        if self.sandbox is None:
            raise RuntimeError("e2e engine: setup() was not called")
        return self.sandbox


def _ports(case: Case, pod: PodModel) -> list[Port]:
    return [(s.name, s.port, s.protocol.value) for s in case.serves(pod)]


def from_options(ip_family: int, via: str = VIA_POD) -> E2EEngine:
    """The engine as the CLI builds it: a sandbox of its own, or `$STOCKADE_E2E_SANDBOX`'s."""
    existing = os.environ.get(SANDBOX_ENV)
    return E2EEngine(ip_family, sandbox_dir=Path(existing) if existing else None, via=via)
