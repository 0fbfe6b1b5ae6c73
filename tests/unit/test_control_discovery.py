"""`control.discovery.CatchUp` with kopf's re-reading of discovery replaced: after a CRD event
it re-reads until kopf serves the resource exactly when the CRD does, stops as soon as they
agree (also when kopf's own reading made them agree), gives up with a warning that names the
CRD, and leaves other CRDs alone. The real API server's lag is exercised in
tests/apiserver/test_discovery_catch_up.py."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import pytest
from kopf._cogs.structs import references
from kopf._core.reactor import observation

from stockade.control import discovery
from stockade.control.discovery import DELAYS_S, CatchUp, CustomResource, crd_serves
from stockade.control.handlers import custom_resources

UCNP = CustomResource("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies")
SERVED = references.Resource(UCNP.group, UCNP.version, UCNP.plural)


def crd(
    *,
    established: bool = True,
    versions: tuple[tuple[str, bool], ...] = (("v1alpha2", True),),
    name: str = UCNP.crd_name,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"group": UCNP.group, "versions": [{"name": v, "served": s} for v, s in versions]},
        "status": {
            "conditions": [
                {"type": "NamesAccepted", "status": "True"},
                {"type": "Established", "status": "True" if established else "False"},
            ]
        },
    }


class Discovery:
    """kopf's re-reading, faked: discovery lists the resource from the `lists_from`-th reading."""

    def __init__(self, catch_up: CatchUp, lists_from: int | None, gone: bool = False) -> None:
        self.catch_up = catch_up
        self.lists_from = lists_from
        self.gone = gone
        self.readings = 0
        self.slept: list[float] = []

    async def reread(self, *, raw_event: Any, insights: references.Insights, **_: Any) -> None:
        assert insights is self.catch_up.insights
        assert raw_event["object"]["spec"]["group"] == UCNP.group
        self.readings += 1
        if self.lists_from is not None and self.readings >= self.lists_from:
            if self.gone:
                insights.watched_resources.discard(SERVED)
            else:
                insights.watched_resources.add(SERVED)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def run(
    monkeypatch: pytest.MonkeyPatch,
    event: dict[str, Any],
    lists_from: int | None,
    *,
    served: bool = False,
    gone: bool = False,
) -> Discovery:
    catch_up = CatchUp([UCNP])
    fake = Discovery(catch_up, lists_from, gone)
    catch_up._sleep = fake.sleep
    catch_up.started(kopf.OperatorRegistry(), kopf.OperatorSettings())
    if served:
        catch_up.insights.watched_resources.add(SERVED)
    monkeypatch.setattr(observation, "process_discovered_resource_event", fake.reread)
    asyncio.run(catch_up.on_event(event))
    return fake


@pytest.mark.parametrize("lists_from", [1, 2, 5, len(DELAYS_S)])
def test_an_established_crd_is_read_again_until_kopf_serves_it(
    monkeypatch: pytest.MonkeyPatch, lists_from: int
) -> None:
    fake = run(monkeypatch, {"type": "MODIFIED", "object": crd()}, lists_from)
    assert fake.readings == lists_from
    assert fake.catch_up.served(UCNP)
    assert fake.slept == list(DELAYS_S[:lists_from])


def test_a_deleted_crd_is_read_again_until_kopf_no_longer_serves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = run(monkeypatch, {"type": "DELETED", "object": crd()}, 3, served=True, gone=True)
    assert fake.readings == 3
    assert not fake.catch_up.served(UCNP)


@pytest.mark.parametrize(
    "body",
    [crd(established=False), crd(versions=(("v1alpha2", False), ("v1alpha1", True)))],
    ids=["not established", "version not served"],
)
def test_a_crd_that_does_not_serve_the_version_wants_it_unserved(
    monkeypatch: pytest.MonkeyPatch, body: dict[str, Any]
) -> None:
    assert not crd_serves(body, UCNP.version)
    assert run(monkeypatch, {"type": "MODIFIED", "object": body}, None).readings == 0
    fake = run(monkeypatch, {"type": "MODIFIED", "object": body}, 2, served=True, gone=True)
    assert fake.readings == 2 and not fake.catch_up.served(UCNP)


def test_nothing_is_read_when_kopf_already_agrees_or_the_crd_is_not_watched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(monkeypatch, {"type": "MODIFIED", "object": crd()}, 1, served=True).readings == 0
    other = crd(name="widgets.example.com")
    assert run(monkeypatch, {"type": "ADDED", "object": other}, 1).readings == 0
    assert run(monkeypatch, {"type": "ADDED", "object": None}, 1).readings == 0


def test_kopfs_own_reading_ends_the_catch_up_without_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catch_up = CatchUp([UCNP])
    fake = Discovery(catch_up, None)

    async def sleep(seconds: float) -> None:  # kopf's observer reads while the catch-up waits
        fake.slept.append(seconds)
        catch_up.insights.watched_resources.add(SERVED)

    catch_up._sleep = sleep
    catch_up.started(kopf.OperatorRegistry(), kopf.OperatorSettings())
    monkeypatch.setattr(observation, "process_discovered_resource_event", fake.reread)
    asyncio.run(catch_up.on_event({"type": "MODIFIED", "object": crd()}))
    assert fake.readings == 0 and fake.slept == [DELAYS_S[0]]


def test_a_resource_discovery_never_lists_gives_a_warning_naming_the_crd(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=discovery.__name__):
        fake = run(monkeypatch, {"type": "MODIFIED", "object": crd()}, None)
    assert fake.readings == len(DELAYS_S)
    assert not fake.catch_up.served(UCNP)
    (record,) = caplog.records
    assert UCNP.crd_name in record.getMessage()
    assert "restart the operator" in record.getMessage()


def test_the_watched_custom_resources_follow_the_upstream_setting() -> None:
    names = {r.crd_name for r in custom_resources(upstream_cnp=True)}
    assert names == {
        "networkpolicies.stockade.io",
        "clusternetworkpolicies.stockade.io",
        "clusternetworkpolicies.policy.networking.k8s.io",
        "datapathtables.stockade.io",
    }
    assert UCNP.crd_name not in {r.crd_name for r in custom_resources(upstream_cnp=False)}
