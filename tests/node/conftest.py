"""Fixtures of the node tier: the CNI plugin binaries (required, not skipped), pod namespaces that
are removed after the test, and two registered nodes with a kubelet stand-in each (`kubelets`),
stopped and swept after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.sandbox import netns
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.node.cni import CniError, plugin_dir
from stockade.sandbox.node.registration import register_node
from stockade.sandbox.node.supervise import sweep
from stockade.sandbox.topology import Topology
from tests.fixtures.netns import MakeTopology
from tests.node.kubelet_harness import Node, quiet

REQUIRED = ("ptp", "bridge", "host-local", "loopback")
POD_SYSCTLS = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}


@pytest.fixture(scope="session")
def cni_bin() -> Path:
    """The plugin directory ($STOCKADE_CNI_BIN, else the toolchain's); the tier fails loudly
    without it."""
    try:
        found = plugin_dir()
    except CniError as exc:
        pytest.fail(str(exc))
    missing = [p for p in REQUIRED if not (found / p).is_file()]
    if missing:
        pytest.fail(f"CNI plugins {missing} are missing from {found}")
    return found


@pytest.fixture
def pod_netns() -> Iterator[Callable[[Topology, str], str]]:
    """`pod_netns(topo, tag)` creates `stk-<run>-pod-<tag>`; every one is removed afterwards."""
    made: list[str] = []

    def make(topo: Topology, tag: str) -> str:
        name = f"stk-{topo.run_id}-pod-{tag}"
        made.append(name)
        netns.create(name, POD_SYSCTLS)
        return name

    yield make
    for name in made:
        netns.remove(name)


@pytest.fixture
def kubelets(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    cni_bin: Path,
    control_plane: ControlPlane,
    api_client: Any,
    topology: MakeTopology,
) -> Iterator[Node]:
    """Two nodes (routed, or the topology given by indirect parametrization), registered, each
    with a running kubelet; all stopped and swept after."""
    topo = topology(nodes=2, mode=getattr(request, "param", "routed"))
    topo_file = tmp_path / "topology.json"
    topo.save(topo_file)
    for node in topo.nodes:
        register_node(api_client, node)
    made = Node(topo, tmp_path, topo_file, control_plane.kubeconfig, cni_bin, {})
    try:
        for node in topo.nodes:
            made.start(node.name)
        yield made
    finally:
        for child in made.kubelets.values():
            child.stop(grace=30.0)  # SIGTERM: the kubelet unwires its pods
        sweep(tmp_path, topo, cni_bin, quiet)
