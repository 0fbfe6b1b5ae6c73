"""Fill the Store from one LIST of everything before a replica first publishes.

kopf delivers each resource's initial listing as events, in no particular order across
resources, so a new leader that published straight away could publish from a partial picture:
pods without the policies that select them, which would open traffic for a moment. The
Reconciler therefore calls `prime()` before its first pass as leader; kopf's events keep the
Store current from then on (an event never removes what it did not see deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from stockade.control.objects import namespace_from_api, node_from_api, object_key, pod_from_api
from stockade.control.policies import parse_record
from stockade.control.services import (
    endpoint_slice_from_api,
    service_cidr_from_api,
    service_from_api,
)
from stockade.control.store import Store
from stockade.model.kinds import enforced

log = logging.getLogger(__name__)


def _dicts(api: ApiClient, items: Iterable[Any]) -> list[Mapping[str, Any]]:
    return [api.sanitize_for_serialization(i) for i in items]  # type: ignore[no-untyped-call]


def prime(
    store: Store, api: ApiClient, *, upstream_cnp: bool = True, services: bool = False
) -> None:
    """LIST pods, namespaces, nodes and every policy kind whose API exists into `store`, and,
    with `services`, the Services, EndpointSlices and ServiceCIDRs (without them a first pass
    would publish a Service address space that is not the cluster's, then the real one)."""
    core = CoreV1Api(api)
    for obj in _dicts(api, core.list_namespace().items):
        namespace = namespace_from_api(obj)
        store.put_namespace(namespace.name, namespace)
    for obj in _dicts(api, core.list_node().items):
        node = node_from_api(obj)
        store.put_node(node.name, node)
    for obj in _dicts(api, core.list_pod_for_all_namespaces().items):
        store.put_pod(object_key(obj), pod_from_api(obj))
    policies: list[Mapping[str, Any]] = []
    custom = CustomObjectsApi(api)
    for resource in enforced(upstream_cnp=upstream_cnp):
        try:
            listing: Any = custom.list_cluster_custom_object(
                resource.group, resource.version, resource.plural
            )
        except ApiException as exc:
            if exc.status == 404:  # the CRD is not installed: nothing of that kind exists
                continue
            raise
        # Items of a built-in kind's list carry no apiVersion/kind; the parser needs them.
        policies += [
            {**obj, "apiVersion": resource.api_version, "kind": resource.name}
            for obj in listing.get("items", [])
        ]
    for obj in policies:
        record = parse_record(obj)
        if record is not None:
            store.put_policy(record.key, record)
    if services:
        _prime_services(store, api)
    log.info("primed the store with %d policies", len(policies))


def _prime_services(store: Store, api: ApiClient) -> None:
    core = CoreV1Api(api)
    for obj in _dicts(api, core.list_service_for_all_namespaces().items):
        store.put_service(object_key(obj), service_from_api(obj))
    custom = CustomObjectsApi(api)
    slices: Any = custom.list_cluster_custom_object("discovery.k8s.io", "v1", "endpointslices")
    for obj in slices.get("items", []):
        store.put_endpoint_slice(object_key(obj), endpoint_slice_from_api(obj))
    try:
        cidrs: Any = custom.list_cluster_custom_object("networking.k8s.io", "v1", "servicecidrs")
    except ApiException as exc:
        if exc.status != 404:  # not served: the operator's --service-cidrs stand in
            raise
        return
    for obj in cidrs.get("items", []):
        store.put_service_cidr(object_key(obj), service_cidr_from_api(obj))
