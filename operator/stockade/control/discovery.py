"""Keeping kopf's served resources in step with the CustomResourceDefinitions.

kopf watches a custom resource once API discovery lists it, and reads discovery again on each
event of a CustomResourceDefinition. The API server lists a new CRD's resource a moment after
the CRD's last status change (Established), so kopf's last reading can come too early: on the
sandbox's API server it did in one install of two. The upstream ClusterNetworkPolicy CRD
installed after the operator started was then never watched, and its policies never enforced,
until the operator restarted. After a deletion the same race keeps a watch on a resource that
is gone.

`CatchUp` is told of every event of the CRDs behind the resources the operator watches. After
each, it has kopf read the CRD's group from discovery again, with back-off, until kopf serves
the resource exactly when its CRD serves it (Established, with the operator's version served);
after `DELAYS_S` it gives up with a warning that says what to do. It drives kopf's own
re-reading (`kopf._core.reactor.observation`): stockade's only use of kopf's internals, kept
here, and tested against the real API server (tests/apiserver/test_discovery_catch_up.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kopf._cogs.structs import references
from kopf._core.reactor import observation

log = logging.getLogger(__name__)

# Seconds between re-readings of discovery while kopf and a CRD disagree (about 2 min in all).
DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


@dataclass(frozen=True)
class CustomResource:
    """A custom resource the operator watches, as its CRD names it."""

    group: str
    version: str
    plural: str

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


def crd_serves(crd: Mapping[str, Any], version: str) -> bool:
    """Whether the CRD object serves `version`: Established, with that version served."""
    spec = crd.get("spec") or {}
    versions = spec.get("versions") or ()
    if not any(v.get("name") == version and v.get("served") for v in versions):
        return False
    conditions = (crd.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


class CatchUp:
    """Has kopf read discovery again until it serves each watched custom resource exactly when
    the resource's CRD does (`on_event`, for every CRD event)."""

    def __init__(
        self,
        resources: Iterable[CustomResource],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._by_crd = {r.crd_name: r for r in resources}
        self._sleep = sleep
        self.insights = references.Insights()  # what kopf serves (`started`)
        self._kopf: tuple[kopf.OperatorRegistry, kopf.OperatorSettings] | None = None

    def started(
        self, registry: kopf.OperatorRegistry, settings: kopf.OperatorSettings
    ) -> references.Insights:
        """A fresh view of what kopf serves, for the kopf.operator() about to start with
        `registry` and `settings` (pass it as its `insights`)."""
        self.insights = references.Insights()
        self._kopf = (registry, settings)
        return self.insights

    def served(self, resource: CustomResource) -> bool:
        """Whether kopf watches the resource now."""
        return any(
            (r.group, r.version, r.plural) == (resource.group, resource.version, resource.plural)
            for r in self.insights.watched_resources
        )

    async def on_event(self, event: Mapping[str, Any]) -> None:
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            return
        resource = self._by_crd.get(str((obj.get("metadata") or {}).get("name")))
        if resource is None or self._kopf is None:
            return
        registry, settings = self._kopf
        want = event.get("type") != "DELETED" and crd_serves(obj, resource.version)
        if self.served(resource) == want:
            return
        reread = {"type": "MODIFIED", "object": obj}
        for n, delay in enumerate(DELAYS_S, 1):
            await self._sleep(delay)
            if self.served(resource) == want:  # kopf's own reading (or a later event's) did
                return
            await observation.process_discovered_resource_event(
                raw_event=reread,  # type: ignore[arg-type]
                settings=settings,
                registry=registry,
                insights=self.insights,
            )
            if self.served(resource) == want:
                log.info(
                    "kopf %s %s after %d more readings of discovery",
                    "serves" if want else "no longer serves",
                    resource.crd_name,
                    n,
                )
                return
        log.warning(
            "the CRD %s %s, but API discovery still %s after %.0f s: restart the operator once "
            "the API server lists it",
            resource.crd_name,
            "serves " + resource.version if want else "is gone",
            "does not list it" if want else "lists it",
            sum(DELAYS_S),
        )
