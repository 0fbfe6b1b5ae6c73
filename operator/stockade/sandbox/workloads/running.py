"""A handle on a running sandbox for programs that put workloads in it: `stockade demo` and the e2e
conformance engine.

`RunningSandbox.open(state_dir)` reads what `stockade sandbox up` recorded. `add_pod` builds the
pod's network namespace on its node (or, for a host-network pod, uses the node's own namespace
and addresses), registers the Pod as the sandbox kubelet would and records the pod in the
sandbox's topology file, so that `stockade sandbox down` removes it; `remove_pod` undoes that.
Namespaces are created once and kept (deleting one takes the controller manager a while, and a
case may reuse the name at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from stockade.model.kinds import POLICY_RESOURCES, PolicyResource, resource_for
from stockade.runtime import replace_custom_object
from stockade.sandbox import session
from stockade.sandbox.node.registration import delete_pod, register_pod
from stockade.sandbox.stack import api_client
from stockade.sandbox.topology import NodeNet, PodNet, Topology

HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
MERGE_PATCH = "application/merge-patch+json"
# Set by the API server on every Namespace; never removed when labels are reset.
NAME_LABEL = "kubernetes.io/metadata.name"
Port = tuple[str | None, int, str]  # (container port name, number, protocol)


class UnknownPolicyKindError(ValueError):
    """An object whose apiVersion/kind is not a policy kind stockade enforces."""


@dataclass(frozen=True)
class PolicyRef:
    resource: PolicyResource
    namespace: str  # "" for cluster-scoped kinds
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> PolicyRef:
        found = resource_for(obj.get("apiVersion"), obj.get("kind"))
        if found is None:
            raise UnknownPolicyKindError(
                f"apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')} is not a policy kind"
            )
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "") if found.namespaced else ""
        return cls(found, namespace, str(meta.get("name") or ""))


class SandboxNotRunningError(RuntimeError):
    """No healthy sandbox in the state directory."""


@dataclass
class RunningSandbox:
    state_dir: Path
    kubeconfig: Path
    topology: Topology
    api: Any

    @classmethod
    def open(cls, state_dir: Path) -> RunningSandbox:
        state = session.SandboxState.load(state_dir)
        topology_file = state_dir / session.TOPOLOGY_FILE
        if state is None or state.stack is None or not topology_file.exists():
            raise SandboxNotRunningError(
                f"no sandbox with stockade running in {state_dir} (`stockade sandbox up`)"
            )
        kubeconfig = session.kubeconfig_path(state_dir)
        return cls(state_dir, kubeconfig, Topology.load(topology_file), api_client(kubeconfig))

    def close(self) -> None:
        self.api.close()

    @property
    def nodes(self) -> list[NodeNet]:
        return list(self.topology.nodes)

    def core(self) -> Any:
        return kubernetes.client.CoreV1Api(self.api)

    # -- namespaces ----------------------------------------------------------------------------

    def ensure_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        """Create Namespace `name` with exactly `labels`, or reset an existing one's labels."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        try:
            self.core().create_namespace({**body, "metadata": {"name": name, "labels": labels}})
        except ApiException as exc:
            if exc.status != HTTP_CONFLICT:
                raise
            self.set_namespace_labels(name, labels)

    def set_namespace_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Replace the Namespace's labels with `labels` (its name label always stays)."""
        current = self.core().read_namespace(name).metadata.labels or {}
        patch: dict[str, str | None] = {k: None for k in current if k not in labels}
        patch.pop(NAME_LABEL, None)
        patch.update(labels)
        self.core().patch_namespace(name, {"metadata": {"labels": patch}})

    def label_node(self, name: str, labels: Mapping[str, str]) -> None:
        if labels:
            self.core().patch_node(name, {"metadata": {"labels": dict(labels)}})

    # -- pods ----------------------------------------------------------------------------------

    def add_pod(
        self,
        key: str,
        node: str,
        labels: Mapping[str, str],
        ports: Sequence[Port],
        *,
        host_network: bool = False,
    ) -> PodNet:
        """Create pod `key` ("ns/name") on `node` and register it; a leftover Pod object of that
        name is replaced. A host-network pod gets no namespace: it is its node."""
        namespace, _, name = key.partition("/")
        delete_pod(self.api, namespace, name)
        if host_network:
            net = self._host_network_pod(key, self.topology.node(node))
        else:
            if key in self.topology.pods:
                self.remove_pod(key)
            net = self.topology.add_pod(key, node)
            self.save()
        register_pod(self.api, namespace, name, net, dict(labels), list(ports), host_network)
        return net

    def reregister_pod(
        self, key: str, net: PodNet, labels: Mapping[str, str], ports: Sequence[Port]
    ) -> None:
        """Replace the Pod object (its spec is immutable) keeping its network: new ports."""
        namespace, _, name = key.partition("/")
        host_network = net.netns == self.topology.node(net.node).netns
        delete_pod(self.api, namespace, name)
        register_pod(self.api, namespace, name, net, dict(labels), list(ports), host_network)

    def remove_pod(self, key: str) -> None:
        """Delete the Pod object and the pod's namespace (if it has one)."""
        namespace, _, name = key.partition("/")
        with contextlib.suppress(ApiException):
            delete_pod(self.api, namespace, name)
        if key in self.topology.pods:
            self.topology.remove_pod(key)
            self.save()

    # -- policies (as kubectl would send them) ---------------------------------------------------

    def create_policy(self, obj: Mapping[str, Any]) -> None:
        ref, api = PolicyRef.of(obj), self.custom()
        kind = ref.resource
        if ref.namespace:
            api.create_namespaced_custom_object(
                kind.group, kind.version, ref.namespace, kind.plural, obj
            )
        else:
            api.create_cluster_custom_object(kind.group, kind.version, kind.plural, obj)

    def replace_policy(self, obj: Mapping[str, Any]) -> None:
        """Replace the whole object on the resourceVersion the server has now (again after a
        conflict with the operator's status write)."""
        ref = PolicyRef.of(obj)
        kind = ref.resource
        replace_custom_object(
            self.custom(), kind.group, kind.version, kind.plural, ref.namespace, ref.name, obj
        )

    def delete_policy(self, obj: Mapping[str, Any]) -> bool:
        """Delete the policy; False when it did not exist."""
        ref, api = PolicyRef.of(obj), self.custom()
        kind = ref.resource
        try:
            if ref.namespace:
                api.delete_namespaced_custom_object(
                    kind.group, kind.version, ref.namespace, kind.plural, ref.name
                )
            else:
                api.delete_cluster_custom_object(kind.group, kind.version, kind.plural, ref.name)
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise
            return False
        return True

    def delete_all_policies(self, namespaces: Sequence[str]) -> int:
        """Delete every policy of every kind in `namespaces` and every cluster-scoped one."""
        api, deleted = self.custom(), 0
        for resource in POLICY_RESOURCES:
            group, version, plural = resource.group, resource.version, resource.plural
            try:
                if resource.namespaced:
                    items = [
                        item
                        for ns in namespaces
                        for item in api.list_namespaced_custom_object(group, version, ns, plural)[
                            "items"
                        ]
                    ]
                else:
                    items = api.list_cluster_custom_object(group, version, plural)["items"]
            except ApiException as exc:
                if exc.status == HTTP_NOT_FOUND:  # that CRD is not installed
                    continue
                raise
            for item in items:
                deleted += self.delete_policy(
                    {**item, "apiVersion": resource.api_version, "kind": resource.name}
                )
        return deleted

    def custom(self) -> Any:
        return kubernetes.client.CustomObjectsApi(self.api)

    def save(self) -> None:
        self.topology.save(self.state_dir / session.TOPOLOGY_FILE)

    @staticmethod
    def _host_network_pod(key: str, node: NodeNet) -> PodNet:
        return PodNet(
            key=key,
            node=node.name,
            netns=node.netns,
            ip_v4=node.ip_v4,
            ip_v6=node.ip_v6,
            host_ifname="",
            pod_ifname="",
        )
