"""The upstream ClusterNetworkPolicy CRD installed after the operator started, on a real API server
and a real kopf: installed, used and removed again `CYCLES` times, each time a policy created
right after the install reaches the operator's store, and once the CRD is removed kopf no longer
watches the resource (no watch of it fails).

The API server lists a new CRD's resource a moment after the CRD's last status change, and kopf
reads discovery only on CRD events; without `control.discovery.CatchUp` kopf's last reading came
too early in about one run of four installs in two, and the policy never arrived (or, after a
removal, kopf kept watching a resource that was gone); the catch-up's logic on its own is in
tests/unit/test_control_discovery.py.

The module has a control plane of its own: it removes the upstream CRD, which other modules'
operators and policies use.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from stockade.control.app import Operator
from stockade.control.config import OperatorConfig
from stockade.control.discovery import CustomResource
from stockade.model.policy import PolicyKind
from stockade.sandbox.controlplane.crds import install_crds
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.upstream import CRD_NAMES, install_upstream_crds
from tests.fixtures.controlplane import wait_for

CYCLES = 6
UCNP = CustomResource("policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies")
# A 404 as kopf logs it: the error's status, the Status body's code or reason. Not a bare "404",
# which the API server's port can hold (127.0.0.1:40475).
NOT_FOUND = re.compile(r"\bstatus=404\b|'code': 404\b|NotFound|Not Found")


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(Path(tmp_path_factory.mktemp("discovery-plane")))
    with plane:
        yield plane


@pytest.fixture
def admin(plane: ControlPlane) -> Iterator[Any]:
    with plane.api_client() as client:
        yield client


@pytest.fixture
def operator(plane: ControlPlane, admin: Any) -> Iterator[Operator]:
    install_crds(admin, upstream=False)
    remove_upstream_crds(admin)
    op = Operator(
        OperatorConfig(kubeconfig=str(plane.kubeconfig), leader_election=False, lowering="thread")
    )
    stop = threading.Event()
    thread = threading.Thread(target=op.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for("the operator to be ready", op.ready.is_set)
        yield op
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the operator did not stop"


def remove_upstream_crds(admin: Any) -> None:
    ext: Any = kubernetes.client.ApiextensionsV1Api(admin)
    for name in present_crds(ext) & set(CRD_NAMES):
        ext.delete_custom_resource_definition(name)
    wait_for("the upstream CRDs deleted", lambda: not present_crds(ext) & set(CRD_NAMES))


def present_crds(ext: Any) -> set[str]:
    return {c.metadata.name for c in ext.list_custom_resource_definition().items}


def upstream_policy(name: str) -> dict[str, Any]:
    everyone: dict[str, Any] = {"namespaces": {}}
    return {
        "apiVersion": f"{UCNP.group}/{UCNP.version}",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "Baseline",
            "priority": 10,
            "subject": everyone,
            "ingress": [{"name": "all", "action": "Accept", "from": [everyone]}],
        },
    }


def test_an_upstream_crd_installed_after_start_is_watched_every_time(
    operator: Operator, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    objects: Any = kubernetes.client.CustomObjectsApi(admin)
    caught_up = 0
    for cycle in range(CYCLES):
        name = f"late-{cycle}"
        key = (PolicyKind.CLUSTER_NETWORK_POLICY.value, "", name)
        with caplog.at_level(logging.INFO, logger="stockade.control.discovery"):
            install_upstream_crds(admin)
            objects.create_cluster_custom_object(
                UCNP.group, UCNP.version, UCNP.plural, upstream_policy(name)
            )
            stored = functools.partial(operator.store.policy, key)
            wait_for(f"{name} in the operator's store", stored)
            assert operator.catch_up.served(UCNP)
            remove_upstream_crds(admin)
            wait_for(f"{name} gone from the store", lambda stored=stored: stored() is None)
            wait_for("kopf no longer watching", lambda: not operator.catch_up.served(UCNP))
        caught_up += sum("more readings" in r.getMessage() for r in caplog.records)
        # a watch kopf kept on the removed resource fails with 404 (and retries forever)
        failed = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.ERROR
            and UCNP.group in r.getMessage()
            and NOT_FOUND.search(r.getMessage())
        ]
        assert not failed
        caplog.clear()
    # Informational: how often kopf's own reading came too early in this run.
    print(f"the catch-up stepped in {caught_up} time(s) in {CYCLES} installs")
