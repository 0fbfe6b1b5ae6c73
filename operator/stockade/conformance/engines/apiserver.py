"""A case's actions sent to a Kubernetes API server, shared by the engines that run on one.

The `cluster` engine (a real cluster) and the `e2e` engine (the sandbox's API server) both keep a
`World` of the case and send each action the world accepts to the API server as `kubectl` would:
policy objects created, replaced or deleted, pod and namespace labels patched. They differ only in
how they reach the server and write policy objects, which each says by implementing the abstract
methods of `ApiServerActions`; both call `_send` from their `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException

from stockade.conformance.casefile import (
    Action,
    AddNamespaceLabels,
    AddPodLabels,
    CreatePolicy,
    DeleteAllPolicies,
    DeletePolicy,
    UpdatePolicy,
)
from stockade.conformance.engine import ActionRejectedError
from stockade.conformance.world import World

T = TypeVar("T")


def call_api(request: Callable[[], T]) -> T:
    """Run one API request; a refusal by the server becomes `ActionRejectedError`."""
    try:
        return request()
    except ApiException as err:
        raise ActionRejectedError(f"the API server refused: {err.status} {err.body}") from err


class ApiServerActions(ABC):
    """Base of the engines that mirror a case's actions into an API server."""

    def _send(self, world: World, action: Action) -> None:
        """Apply `action` to `world`, then send it to the API server. The world rejects what the
        API server would reject, with the model's words, before anything is sent."""
        before = dict(world.objects)
        world.apply(action)
        if isinstance(action, CreatePolicy):
            self._create(action.obj)
        elif isinstance(action, UpdatePolicy):
            self._replace(action.obj)
        elif isinstance(action, DeletePolicy | DeleteAllPolicies):
            for key in sorted(before.keys() - world.objects.keys()):
                self._delete(before[key])
        elif isinstance(action, AddPodLabels):
            ns, _, name = action.pod.partition("/")
            body = {"metadata": {"labels": dict(action.labels)}}
            self._call(lambda: self._core().patch_namespaced_pod(name, ns, body))
        elif isinstance(action, AddNamespaceLabels):
            body = {"metadata": {"labels": dict(action.labels)}}
            self._call(lambda: self._core().patch_namespace(action.namespace, body))

    @staticmethod
    def _call(request: Callable[[], Any]) -> Any:
        """Run one request to the API server; a refusal becomes `ActionRejectedError`."""
        return call_api(request)

    @abstractmethod
    def _core(self) -> Any:
        """A `kubernetes.client.CoreV1Api` on the engine's API server."""

    @abstractmethod
    def _create(self, obj: Mapping[str, Any]) -> None:
        """Create the policy object `obj`."""

    @abstractmethod
    def _replace(self, obj: Mapping[str, Any]) -> None:
        """Replace the policy object of `obj`'s kind, namespace and name by `obj`."""

    @abstractmethod
    def _delete(self, obj: Mapping[str, Any]) -> None:
        """Delete the policy object `obj`."""
