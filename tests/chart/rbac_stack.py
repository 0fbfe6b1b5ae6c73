"""The real operator and node agents running as the chart's ServiceAccounts, for
tests/chart/test_rbac_e2e.py (its token helpers serve tests/chart/test_agent_scope.py too).

The chart is rendered with `helm template` (tests/chart/chart.py); only its RBAC objects and
CRDs are applied to the sandbox API server, with the agent's ValidatingAdmissionPolicy and its
binding. Each component gets a kubeconfig carrying a token minted for its ServiceAccount
(TokenRequest), so every request it makes is authorized by the chart's roles and nothing else;
each node's agent gets a token bound to an agent Pod on its node, as kubelet mints it, so that the
token carries the node name the admission policy checks. `RbacStack` starts and restarts the
processes (one log file per start, which is where the tests read a component's own account of a
refused request), changes one role's rules, and reads what the scenario produced: the Lease, the
published tables, policy status, Events, agent reports, attached programs and probe outcomes.
"""

from __future__ import annotations

import base64
import copy
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml
from kubernetes.client.exceptions import ApiException

from stockade import handoff
from stockade.datapath.netns import NetnsExecutor
from stockade.sandbox.controlplane.server import SA_ISSUER, ControlPlane
from stockade.sandbox.node.registration import register_pod
from stockade.sandbox.processes import Child
from stockade.sandbox.topology import NodeNet, PodNet, Topology
from stockade.sandbox.workloads.traffic import Outcome, PodProcesses, Probe
from tests.bpf.agent_harness import CACHE_DIR, private_pin_root, remove_pin_root, tcx_programs
from tests.chart.access import Access, Scope
from tests.chart.chart import NAMESPACED, render
from tests.chart.rbac import allowed
from tests.fixtures.controlplane import wait_for

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
ADMISSION_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
GROUP, VERSION = "stockade.io", "v1alpha1"
UPSTREAM_GROUP, UPSTREAM_VERSION = "policy.networking.k8s.io", "v1alpha2"
MERGE_PATCH = "application/merge-patch+json"
NOT_FOUND = 404
PORT = 8080
TOKEN_SECONDS = 3600


def k8s(api_class: str, client: Any) -> Any:
    """An API class of the kubernetes client, used with raw dict bodies (untyped)."""
    return getattr(kubernetes.client, api_class)(client)


def chart_objects(
    release: str, namespace: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(RBAC and admission policy objects, CRDs) of the chart rendered with its default
    values, less the `inspect` roles: those are for people who run `stockade explain` and co.,
    no component of this scenario uses them (their pods/proxy route needs an API server that
    reaches the pods, which the sandbox's cannot), and tests/chart/test_chart_render.py checks
    what they grant."""
    objects = render(
        {"inspect": {"role": False}},
        release=release,
        namespace=namespace,
        extra=["--include-crds"],
    )
    rbac = [o for o in objects if o["kind"] in RBAC_KINDS + ADMISSION_KINDS]
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    return rbac, crds


def register_agent_pod(admin: Any, namespace: str, name: str, node: NodeNet, sa: str) -> str:
    """Register a host-network agent Pod of ServiceAccount `sa` on Node `node.name` (which must
    be registered) and return its uid, to bind an agent's token to it as kubelet does."""
    pod = PodNet(f"{namespace}/{name}", node.name, node.netns, node.ip_v4, node.ip_v6, "", "")
    labels = {"app.kubernetes.io/component": "agent"}
    register_pod(admin, namespace, name, pod, labels, [], host_network=True, service_account=sa)
    uid: str = k8s("CoreV1Api", admin).read_namespaced_pod(name, namespace).metadata.uid
    return uid


def mint_token(admin: Any, namespace: str, sa: str, pod: tuple[str, str] | None = None) -> str:
    """A TokenRequest token of ServiceAccount `namespace`/`sa`; with `pod` (name, uid) bound to
    that Pod, as kubelet mints a pod's projected token (the API server then adds the Pod's node
    to the token's user extra)."""
    spec: dict[str, Any] = {"audiences": [SA_ISSUER], "expirationSeconds": TOKEN_SECONDS}
    if pod is not None:
        spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": pod[0], "uid": pod[1]}
    request = k8s("CoreV1Api", admin).create_namespaced_service_account_token(
        sa, namespace, {"spec": spec}
    )
    token: str = request.status.token
    return token


def mint_kubeconfig(
    plane: ControlPlane, namespace: str, sa: str, path: Path, pod: tuple[str, str] | None = None
) -> Path:
    """A kubeconfig whose user is ServiceAccount `namespace`/`sa` (a TokenRequest token, bound
    to Pod `pod` (name, uid) when given)."""
    with plane.api_client() as admin:
        token = mint_token(admin, namespace, sa, pod)
    ca = base64.b64encode(plane.pki.ca_cert.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "sandbox",
                "cluster": {"server": plane.server, "certificate-authority-data": ca},
            }
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "sandbox", "user": sa}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def sample_access(role: Mapping[str, Any], rule: Mapping[str, Any], namespace: str) -> Access:
    """One access that `rule` of `role` grants (to see when RBAC has taken a change in)."""
    group = rule["apiGroups"][0]
    base, _, sub = rule["resources"][0].partition("/")
    if role["kind"] == "Role":
        scope = Scope.RELEASE_NAMESPACE
    else:
        scope = Scope.ALL_NAMESPACES if NAMESPACED[(group, base)] else Scope.CLUSTER
    names = rule.get("resourceNames") or [""]
    return Access(rule["verbs"][0], group, base, sub, scope, names[0])


@dataclass
class Process:
    """A component's current process and the log of that start."""

    child: Child
    log: Path
    identity: str

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def exited(self) -> bool:
        return not self.child.running()


@dataclass
class RbacStack:
    """The scenario's world: API objects, a 2-node topology, the operator and two agents."""

    plane: ControlPlane
    admin: Any  # cluster-admin ApiClient
    workdir: Path
    release: str
    release_namespace: str
    workload_namespace: str
    roles: list[dict[str, Any]]  # the rendered Roles and ClusterRoles
    topology: Topology
    procs: PodProcesses
    node_names: dict[str, str]  # topology node -> Node name in the API
    # "operator", and "agent/<topology node>" (a token bound to an agent Pod on that node)
    kubeconfigs: dict[str, Path] = field(default_factory=dict)
    lease_name: str = "stockade-operator"
    operator: Process | None = None
    agents: dict[str, Process] = field(default_factory=dict)  # topology node -> its agent
    pins: dict[str, Path] = field(default_factory=dict)  # topology node -> pin root
    executors: dict[str, NetnsExecutor] = field(default_factory=dict)
    starts: int = 0

    # -- processes ----------------------------------------------------------------------------

    def _log(self, name: str) -> tuple[str, Path]:
        self.starts += 1
        identity = f"{name}-{self.starts}"
        return identity, self.workdir / f"{identity}.log"

    def start_operator(self) -> Process:
        self.stop_operator()
        identity, log = self._log("operator")
        argv = [
            sys.executable,
            "-u",
            "-m",
            "stockade.control",
            f"--kubeconfig={self.kubeconfigs['operator']}",
            "--leader-election",
            "on",
            f"--lease-namespace={self.release_namespace}",
            f"--lease-name={self.lease_name}",
            f"--identity={identity}",
            "--upstream-cnp",
            "on",
        ]
        self.operator = Process(Child.spawn(identity, argv, log, detach=False), log, identity)
        return self.operator

    def stop_operator(self) -> None:
        """Kill the operator (kopf takes seconds to exit gracefully) and delete its Lease, so
        that the next replica need not wait the Lease out: it creates the Lease afresh."""
        if self.operator is not None:
            popen = self.operator.child.popen
            assert popen is not None
            popen.kill()
            popen.wait()
            self.operator = None
            self.delete_lease()

    def start_agent(self, node: str, *, fresh_pins: bool = False) -> Process:
        """Start `node`'s agent; `fresh_pins` detaches everything the last one attached first,
        so that what this agent attaches is its own doing."""
        self.stop_agent(node)
        if fresh_pins or node not in self.pins:
            if node in self.pins:
                remove_pin_root(self.pins.pop(node))
            self.pins[node] = private_pin_root()
        identity, log = self._log(f"agent-{node}")
        argv = [
            sys.executable,
            "-u",
            "-m",
            "stockade.agent",
            f"--kubeconfig={self.kubeconfigs[f'agent/{node}']}",
            f"--node={self.node_names[node]}",
            f"--netns={self.topology.node(node).netns}",
            f"--pin-root={self.pins[node]}",
            f"--cache-dir={CACHE_DIR}",
        ]
        process = Process(Child.spawn(identity, argv, log, detach=False), log, identity)
        self.agents[node] = process
        return process

    def stop_agent(self, node: str) -> None:
        process = self.agents.pop(node, None)
        if process is not None:
            process.child.stop()

    def close(self) -> None:
        """Stop every process, detach and unpin what the agents attached."""
        for node in list(self.agents):
            self.stop_agent(node)
        self.stop_operator()
        for root in self.pins.values():
            remove_pin_root(root)
        self.pins.clear()
        for executor in self.executors.values():
            executor.close()
        self.executors.clear()

    # -- roles --------------------------------------------------------------------------------

    def role(self, kind: str, suffix: str) -> dict[str, Any]:
        """The rendered Role or ClusterRole whose name ends in `suffix`."""
        for role in self.roles:
            if role["kind"] == kind and role["metadata"]["name"].endswith(suffix):
                return role
        raise AssertionError(f"the chart renders no {kind} named *{suffix}")

    def put_rules(self, role: Mapping[str, Any], rules: list[dict[str, Any]]) -> None:
        rbac = k8s("RbacAuthorizationV1Api", self.admin)
        name = role["metadata"]["name"]
        body = copy.deepcopy(dict(role))
        body["rules"] = rules
        if role["kind"] == "ClusterRole":
            rbac.replace_cluster_role(name, body)
        else:
            rbac.replace_namespaced_role(name, self.release_namespace, body)

    def may(self, component: str, access: Access) -> bool:
        sa = f"{self.release}-{component}"
        return allowed(self.admin, self.release_namespace, sa, access)

    # -- the workload -------------------------------------------------------------------------

    def pod_ip(self, name: str) -> str:
        return self.topology.pods[f"{self.workload_namespace}/{name}"].ip_v4

    def probe(self) -> dict[str, Outcome]:
        """client -> web and other -> web on TCP 8080 (the policies let only client in)."""
        ns, web = self.workload_namespace, self.pod_ip("web")
        sources = ["client", "other"]
        results = self.procs.probe_many(
            [Probe(f"{ns}/{s}", web, PORT, "tcp", 1.0) for s in sources]
        )
        return {s: r.outcome for s, r in zip(sources, results, strict=True)}

    def programs_on(self, pod: str) -> dict[str, list[int]]:
        """tcx program ids on the host side of `pod`'s veth."""
        net = self.topology.pods[f"{self.workload_namespace}/{pod}"]
        node: NodeNet = self.topology.node(net.node)
        if node.name not in self.executors:
            self.executors[node.name] = NetnsExecutor.named(node.netns)
        return tcx_programs(self.executors[node.name], net.host_ifname)

    # -- what the scenario produced -----------------------------------------------------------

    def lease_holder(self) -> str | None:
        try:
            lease = k8s("CoordinationV1Api", self.admin).read_namespaced_lease(
                self.lease_name, self.release_namespace
            )
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise
        return lease.spec.holder_identity if lease.spec else None

    def delete_lease(self) -> None:
        try:
            k8s("CoordinationV1Api", self.admin).delete_namespaced_lease(
                self.lease_name, self.release_namespace
            )
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise

    def tables(self, node: str, part: str) -> list[dict[str, Any]]:
        selector = f"{handoff.NODE_LABEL}={self.node_names[node]},{handoff.PART_LABEL}={part}"
        listed = k8s("CustomObjectsApi", self.admin).list_cluster_custom_object(
            GROUP, VERSION, "datapathtables", label_selector=selector
        )
        items: list[dict[str, Any]] = listed.get("items", [])
        return items

    def published_rules(self, node: str) -> set[tuple[str, str]]:
        """(kind, name) of every policy with a rule in `node`'s published tables."""
        found = set()
        for obj in self.tables(node, handoff.RULES) + self.tables(node, handoff.PROGRAM):
            spec = obj["spec"]
            for entry in handoff.rule_entries(spec["part"], spec.get("entries") or ()):
                _, info = handoff.decode_rule(entry)
                found.add((info.kind, info.name))
        return found

    def report(self, node: str) -> dict[str, Any]:
        """`status` of `<node>.program.0` (the agent's report), {} when there is none."""
        try:
            obj = k8s("CustomObjectsApi", self.admin).get_cluster_custom_object(
                GROUP,
                VERSION,
                "datapathtables",
                handoff.object_name(self.node_names[node], handoff.PROGRAM, 0),
            )
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return {}
            raise
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def published_generation(self, node: str) -> int | None:
        programs = self.tables(node, handoff.PROGRAM)
        return int(programs[0]["spec"]["generation"]) if programs else None

    def applied(self, node: str) -> bool:
        """`node`'s agent reports the generation the operator published."""
        generation = self.published_generation(node)
        return generation is not None and self.report(node).get("appliedGeneration") == generation

    def clear_report(self, node: str) -> None:
        k8s("CustomObjectsApi", self.admin).patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            "datapathtables",
            handoff.object_name(self.node_names[node], handoff.PROGRAM, 0),
            {"status": None},
            _content_type=MERGE_PATCH,
        )

    def conditions(self, group: str, version: str, plural: str, name: str) -> dict[str, str]:
        """type -> status of a policy's conditions ({} when no status was written)."""
        objects = k8s("CustomObjectsApi", self.admin)
        if group == GROUP and plural == "networkpolicies":
            obj = objects.get_namespaced_custom_object(
                group, version, self.workload_namespace, plural, name
            )
        else:
            obj = objects.get_cluster_custom_object(group, version, plural, name)
        status = obj.get("status") or {}
        return {str(c["type"]): str(c["status"]) for c in status.get("conditions") or ()}

    def events(self, namespace: str, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, reporting component) of every Event about object `name`."""
        listed = k8s("CoreV1Api", self.admin).list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}"
        )
        return [(e.type, e.reason, e.reporting_component or "") for e in listed.items]

    def delete_events(self, namespace: str, name: str) -> None:
        core = k8s("CoreV1Api", self.admin)
        for event in core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}"
        ).items:
            core.delete_namespaced_event(event.metadata.name, namespace)


def wait_logged(process: Process, needle: str, what: str, count: int = 1) -> str:
    """Wait until the process has logged `needle` `count` times (a component that retries logs
    a refusal once per attempt: two mean the failure held over a retry) or has exited; return
    its log so far."""

    def seen() -> str | None:
        text = process.text()
        if text.count(needle) >= count or process.exited():
            return text or "(empty log)"
        return None

    return wait_for(what, seen)


def wait_equal(what: str, probe: Callable[[], object], want: object) -> None:
    """Wait until `probe()` equals `want`; the failure shows the last value seen."""
    last: list[object] = []

    def check() -> bool:
        last[:] = [probe()]
        return last[0] == want

    try:
        wait_for(what, check)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last {last[0]!r}, want {want!r}") from None
