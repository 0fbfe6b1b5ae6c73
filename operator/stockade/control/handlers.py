"""The kopf handlers: every watched event goes into the Store, which asks for a reconcile.

Handlers are thin and never fail on an object: convert (`objects`, `policies`), store, done. They
are coroutines although they never await: kopf runs a plain function in its thread pool, a hop
that costs more than the handler itself and, at 10,000 pods, let the event backlog grow while
the reconciler lowered. The Store's lock is held only for dictionary updates. Only
`@kopf.on.event` is used, so kopf writes nothing onto the watched objects (no finalizers, no
progress annotations). The upstream policy.networking.k8s.io ClusterNetworkPolicy is watched
when its CRD exists: kopf watches CustomResourceDefinitions and starts the watch when discovery
lists the resource, and `control.discovery.CatchUp` makes sure it does (discovery lags the CRD).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from stockade import handoff
from stockade.control.discovery import CatchUp, CustomResource
from stockade.control.objects import namespace_from_api, node_from_api, object_key, pod_from_api
from stockade.control.policies import parse_record
from stockade.control.services import (
    endpoint_slice_from_api,
    service_cidr_from_api,
    service_from_api,
)
from stockade.control.store import Store
from stockade.model.crd import DATAPATH_TABLE
from stockade.model.crd_schema import GROUP, VERSION
from stockade.model.kinds import enforced

log = logging.getLogger(__name__)

DELETED = "DELETED"


def _object(event: Mapping[str, Any]) -> tuple[bool, Mapping[str, Any]]:
    obj = event.get("object")
    return event.get("type") == DELETED, obj if isinstance(obj, Mapping) else {}


def build_registry(
    store: Store,
    on_table: Callable[[Mapping[str, Any], bool], None],
    *,
    upstream_cnp: bool = True,
    services: bool = False,
    catch_up: CatchUp | None = None,
) -> kopf.OperatorRegistry:
    """A kopf registry whose handlers feed `store`; `on_table(obj, deleted)` is told of every
    DatapathTable event, so that the reconciler writes back what was deleted or changed by
    someone else (it compares with what it published: no round trip). `catch_up` is told of
    every CustomResourceDefinition event."""
    registry = kopf.OperatorRegistry()

    if catch_up is not None:

        @kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions", registry=registry)
        async def crd_event(event: Mapping[str, Any], **_: Any) -> None:
            await catch_up.on_event(event)

    async def policy_event(event: Mapping[str, Any], **_: Any) -> None:
        deleted, obj = _object(event)
        record = parse_record(obj, store.policy)
        if record is None:
            return
        store.put_policy(record.key, None if deleted else record)

    for resource in enforced(upstream_cnp=upstream_cnp):
        kopf.on.event(
            group=resource.group,
            version=resource.version,
            plural=resource.plural,
            registry=registry,
            id=f"{resource.plural}.{resource.group}",
        )(policy_event)

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def pod_event(event: Mapping[str, Any], **_: Any) -> None:
        deleted, obj = _object(event)
        store.took_pod_event()
        store.put_pod(object_key(obj), None if deleted else pod_from_api(obj))

    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def namespace_event(event: Mapping[str, Any], **_: Any) -> None:
        deleted, obj = _object(event)
        namespace = namespace_from_api(obj)
        store.put_namespace(namespace.name, None if deleted else namespace)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(event: Mapping[str, Any], **_: Any) -> None:
        deleted, obj = _object(event)
        node = node_from_api(obj)
        store.put_node(node.name, None if deleted else node)

    if services:  # the Service address space (control.services)

        @kopf.on.event("", "v1", "services", registry=registry)
        async def service_event(event: Mapping[str, Any], **_: Any) -> None:
            deleted, obj = _object(event)
            store.put_service(object_key(obj), None if deleted else service_from_api(obj))

        @kopf.on.event("discovery.k8s.io", "v1", "endpointslices", registry=registry)
        async def endpoint_slice_event(event: Mapping[str, Any], **_: Any) -> None:
            deleted, obj = _object(event)
            info = None if deleted else endpoint_slice_from_api(obj)
            store.put_endpoint_slice(object_key(obj), info)

        @kopf.on.event("networking.k8s.io", "v1", "servicecidrs", registry=registry)
        async def service_cidr_event(event: Mapping[str, Any], **_: Any) -> None:
            deleted, obj = _object(event)
            store.put_service_cidr(object_key(obj), None if deleted else service_cidr_from_api(obj))

    @kopf.on.event(GROUP, VERSION, DATAPATH_TABLE.plural, registry=registry)
    async def table_event(event: Mapping[str, Any], **_: Any) -> None:
        deleted, obj = _object(event)
        on_table(obj, deleted)
        program = handoff.program_report(obj)
        if program is not None:
            node, report = program
            store.put_report(node, None if deleted else report)

    return registry


def custom_resources(*, upstream_cnp: bool = True) -> tuple[CustomResource, ...]:
    """The custom resources the registry watches: the enforced kinds served by CRDs and the
    DatapathTables."""
    return (
        *(
            CustomResource(r.group, r.version, r.plural)
            for r in enforced(upstream_cnp=upstream_cnp)
            if r.custom
        ),
        CustomResource(GROUP, VERSION, DATAPATH_TABLE.plural),
    )
