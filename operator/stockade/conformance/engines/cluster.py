"""The `cluster` engine: conformance cases on a real Kubernetes cluster with stockade installed.

Used by CI on a kind cluster (`stockade conformance run FILE --engine cluster`, after `helm
install`). For each case it creates the model's namespaces and pods from a real server image
(agnhost, as the upstream NetworkPolicy e2e suite does: one container per served port and
protocol, container ports named as the case says, by default `serve-<port>-<proto>`), applies
the case's actions through the API server, and probes by running `agnhost connect` in the
source pod with `kubectl exec`. Whatever stockade does happens in the cluster: this engine only
sets the stage and watches.

Each case gets fresh namespaces: `teardown` deletes what the case created and `setup` waits
until namespaces of the same names are gone. Enforcement is asynchronous, so a step's probes
are repeated (`attempts` rounds, only the checks not yet as expected) before the last
observation is reported, as the upstream suite does.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from stockade.conformance.casefile import Action, Case, Check, Serve, Topology
from stockade.conformance.engine import ActionRejectedError, Addresses, Observed, Outcome
from stockade.conformance.engines.apiserver import ApiServerActions
from stockade.conformance.world import World, default_placement
from stockade.model.policy import IPAddress
from stockade.runtime import replace_custom_object

AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"
ENGINE_LABEL = "stockade.io/conformance"  # on every namespace the engine creates
DEFAULT_MODEL_NODES = ("node-1", "node-2")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


def container_name(serve: Serve) -> str:
    return f"cont-{serve.port}-{serve.protocol.value.lower()}"


def _container(serve: Serve, image: str) -> dict[str, Any]:
    proto = serve.protocol.value.lower()
    if proto == "sctp":
        args = ["porter"]
        env = [{"name": f"SERVE_SCTP_PORT_{serve.port}", "value": "foo"}]
    else:
        args = ["serve-hostname", f"--{proto}", "--http=false", "--port", str(serve.port)]
        env = []
    port: dict[str, Any] = {"containerPort": serve.port, "protocol": serve.protocol.value}
    if serve.name:
        port["name"] = serve.name
    return {
        "name": container_name(serve),
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/agnhost"],
        "args": args,
        "env": env,
        "ports": [port],
        "securityContext": {"allowPrivilegeEscalation": False},
    }


def namespace_objects(topology: Topology) -> list[dict[str, Any]]:
    """The Namespace objects of the model, with the model's labels (plus the engine's)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {**labels, ENGINE_LABEL: "true"}},
        }
        for name, labels in topology.namespaces.items()
    ]


def pod_objects(
    topology: Topology, case: Case, placement: Mapping[str, str], image: str = AGNHOST
) -> list[dict[str, Any]]:
    """The Pod objects of the model: `placement` maps each pod key to a real node name."""
    pods: list[dict[str, Any]] = []
    for model in topology.pods:
        serves = case.serves(model)
        if not serves:
            raise ActionRejectedError(f"pod {model.key} serves nothing in case {case.id}")
        spec: dict[str, Any] = {
            "nodeName": placement[model.key],
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [_container(s, image) for s in serves],
        }
        if model.host_network:
            spec["hostNetwork"] = True
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": model.name,
                    "namespace": model.namespace,
                    "labels": dict(model.labels),
                },
                "spec": spec,
            }
        )
    return pods


def _plural(kind: str) -> str:
    lower = kind.lower()
    return f"{lower[:-1]}ies" if lower.endswith("y") else f"{lower}s"


class ClusterEngine(ApiServerActions):
    name = "cluster"

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        kubectl: str = "kubectl",
        image: str = AGNHOST,
        nodes: Sequence[str] | None = None,
        ip_family: int = 4,
        ready_timeout_s: float = 300.0,
        probe_timeout_s: int = 1,
        attempts: int = 3,
        workers: int = 16,
        runner: Runner = _run,
    ) -> None:
        self.kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
        self.kubectl = kubectl
        self.image = image
        self.fixed_nodes = tuple(nodes) if nodes else None
        self.family = ip_family
        self.ready_timeout_s = ready_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.attempts = attempts
        self.workers = workers
        self.runner = runner
        self.world: World | None = None
        self.addresses: Addresses | None = None
        self._api: Any = None
        self._containers: dict[str, str] = {}  # pod key -> the container probes run in
        self._node_of: dict[str, str] = {}  # model node name -> real node name

    # -- the Engine protocol -------------------------------------------------------------------

    def unsupported(self, case: Case) -> str | None:
        for step in case.steps:
            if any(not c.protocol.has_ports for c in step.checks):
                return "the cluster engine probes TCP, UDP and SCTP only (no ICMP)"
        return None

    def setup(self, topology: Topology, case: Case) -> Addresses:
        self.create_world(topology, case)
        return self.wait_ready()

    def apply(self, action: Action) -> None:
        self._send(self._world(), action)

    def probe(self, checks: Sequence[Check]) -> list[Observed]:
        observed: dict[int, Observed] = {}
        pending = list(range(len(checks)))
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(1.0)
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                results = list(pool.map(lambda i: self._probe_one(checks[i]), pending))
            for index, seen in zip(pending, results, strict=True):
                observed[index] = seen
            pending = [i for i in pending if not observed[i].as_expected]
            if not pending:
                break
        return [observed[i] for i in range(len(checks))]

    def close(self) -> None:
        pass  # every case removes its namespaces in teardown()

    def teardown(self) -> None:
        world = self.world
        self.world = None
        self.addresses = None
        if world is None:
            return
        for key, obj in list(world.objects.items()):
            if not key.namespace:  # cluster-scoped policies outlive the namespaces
                self._delete(obj)
        for name in world.topology.namespaces:
            try:
                self._core().delete_namespace(name)
            except ApiException as err:
                if err.status != 404:
                    raise

    # -- the steps of setup, callable on their own (tests use them without a kubelet) --------

    def create_world(self, topology: Topology, case: Case) -> World:
        """Create the case's namespaces and pods (waiting for any old ones to be gone)."""
        world = World(topology, case)
        real = self.nodes()
        model_nodes = [n.name for n in topology.nodes] or list(DEFAULT_MODEL_NODES[: len(real)])
        if len(real) < len(model_nodes):
            raise RuntimeError(f"the model needs {len(model_nodes)} nodes, the cluster has {real}")
        node_of = dict(zip(model_nodes, real, strict=False))
        world.placement = default_placement(topology, model_nodes)
        self.world = world
        self._node_of = node_of
        for model in topology.nodes:  # node peers select nodes by these labels
            if model.labels and model.name in node_of:
                body = {"metadata": {"labels": dict(model.labels)}}
                self._call(partial(self._core().patch_node, node_of[model.name], body))
        self._wait_namespaces_gone(list(topology.namespaces))
        core = self._core()
        for namespace in namespace_objects(topology):
            self._call(partial(core.create_namespace, namespace))
        placement = {key: node_of[node] for key, node in world.placement.items()}
        for pod in pod_objects(topology, case, placement, self.image):
            meta = pod["metadata"]
            self._containers[f"{meta['namespace']}/{meta['name']}"] = pod["spec"]["containers"][0][
                "name"
            ]
            self._call(partial(core.create_namespaced_pod, meta["namespace"], pod))
        return world

    def wait_ready(self) -> Addresses:
        """Wait until every model pod runs with its address; return the addresses."""
        world = self._world()
        deadline = time.monotonic() + self.ready_timeout_s
        pods: dict[str, tuple[IPAddress, ...]] = {}
        while True:
            for model in world.topology.pods:
                if model.key in pods:
                    continue
                pod = self._core().read_namespaced_pod(model.name, model.namespace)
                ready = any(
                    c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ()
                )
                ips = tuple(ipaddress.ip_address(p.ip) for p in pod.status.pod_i_ps or ())
                if ready and ips:
                    pods[model.key] = ips
            if len(pods) == len(world.topology.pods):
                break
            if time.monotonic() > deadline:
                missing = sorted({p.key for p in world.topology.pods} - set(pods))
                raise RuntimeError(f"pods not ready after {self.ready_timeout_s:.0f}s: {missing}")
            time.sleep(1.0)
        nodes = {model: self._node_addresses(real) for model, real in self._node_of.items()}
        self.addresses = Addresses(pods, nodes, self.family)
        return self.addresses

    def nodes(self) -> list[str]:
        """The nodes pods go to: the given ones, else every node without a NoSchedule taint."""
        if self.fixed_nodes:
            return list(self.fixed_nodes)
        names = []
        for node in self._core().list_node().items:
            taints = node.spec.taints or ()
            if not any(t.effect in ("NoSchedule", "NoExecute") for t in taints):
                names.append(node.metadata.name)
        return sorted(names)

    def probe_command(self, check: Check) -> list[str]:
        """The kubectl command line that attempts `check` from inside its source pod."""
        addresses = self.addresses
        if addresses is None:
            raise RuntimeError("cluster engine: setup() was not called")
        ns, _, name = check.src.partition("/")
        ip = addresses.pod_ip(check.dst)
        target = f"[{ip}]:{check.port}" if ip.version == 6 else f"{ip}:{check.port}"
        base = [self.kubectl]
        if self.kubeconfig:
            base += ["--kubeconfig", self.kubeconfig]
        return [
            *base,
            "exec",
            "--namespace",
            ns,
            name,
            "--container",
            self._containers[check.src],
            "--",
            "/agnhost",
            "connect",
            target,
            f"--timeout={self.probe_timeout_s}s",
            f"--protocol={check.protocol.value.lower()}",
        ]

    # -- helpers -------------------------------------------------------------------------------

    def _probe_one(self, check: Check) -> Observed:
        proc = self.runner(self.probe_command(check))
        text = f"{proc.stdout}\n{proc.stderr}".strip()
        if proc.returncode == 0:
            return Observed(check, Outcome.CONNECTED)
        if "TIMEOUT" in text:
            return Observed(check, Outcome.TIMEOUT, text[-200:])
        if "REFUSED" in text:
            return Observed(check, Outcome.REFUSED, text[-200:])
        return Observed(check, Outcome.ERROR, text[-200:])

    def _world(self) -> World:
        if self.world is None:
            raise RuntimeError("cluster engine: setup() was not called")
        return self.world

    def _client(self) -> Any:
        if self._api is None:
            load: Any = kubernetes.config.new_client_from_config  # untyped in the library
            self._api = load(config_file=self.kubeconfig)
        return self._api

    def _core(self) -> Any:
        return kubernetes.client.CoreV1Api(self._client())

    def _custom(self) -> Any:
        return kubernetes.client.CustomObjectsApi(self._client())

    def _node_addresses(self, name: str) -> tuple[IPAddress, ...]:
        node = self._core().read_node(name)
        found = [
            ipaddress.ip_address(a.address)
            for a in node.status.addresses or ()
            if a.type == "InternalIP"
        ]
        return tuple(found)

    def _wait_namespaces_gone(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        for name in names:
            while True:
                try:
                    self._core().read_namespace(name)
                except ApiException as err:
                    if err.status == 404:
                        break
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"namespace {name} still exists (Terminating?)")
                time.sleep(1.0)

    def _where(self, obj: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
        group, _, version = str(obj["apiVersion"]).rpartition("/")
        meta = obj.get("metadata") or {}
        return (
            group,
            version,
            _plural(str(obj["kind"])),
            str(meta.get("namespace") or ""),
            str(meta.get("name") or ""),
        )

    def _create(self, obj: Mapping[str, Any]) -> None:
        group, version, plural, ns, _ = self._where(obj)
        api = self._custom()
        if ns:
            self._call(lambda: api.create_namespaced_custom_object(group, version, ns, plural, obj))
        else:
            self._call(lambda: api.create_cluster_custom_object(group, version, plural, obj))

    def _replace(self, obj: Mapping[str, Any]) -> None:
        group, version, plural, ns, name = self._where(obj)
        self._call(
            lambda: replace_custom_object(self._custom(), group, version, plural, ns, name, obj)
        )

    def _delete(self, obj: Mapping[str, Any]) -> None:
        group, version, plural, ns, name = self._where(obj)
        api = self._custom()
        try:
            if ns:
                api.delete_namespaced_custom_object(group, version, ns, plural, name)
            else:
                api.delete_cluster_custom_object(group, version, plural, name)
        except ApiException as err:
            if err.status != 404:
                raise ActionRejectedError(f"delete {plural} {name}: {err.status}") from err


def from_options(ip_family: int) -> ClusterEngine:
    """The engine as the CLI builds it: the cluster of $KUBECONFIG (else ~/.kube/config),
    `kubectl` from PATH, the server image from $STOCKADE_CONFORMANCE_IMAGE (else agnhost)."""
    return ClusterEngine(
        image=os.environ.get("STOCKADE_CONFORMANCE_IMAGE", AGNHOST), ip_family=ip_family
    )
