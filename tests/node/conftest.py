"""Fixtures of the node tier: the CNI plugin binaries (required, not skipped), a node's CNI state
below the test's own directory, and pod namespaces that are removed after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade.sandbox import netns
from stockade.sandbox.node.cni import CniError, plugin_dir
from stockade.sandbox.topology import Topology

REQUIRED = ("ptp", "bridge", "host-local", "loopback")
POD_SYSCTLS = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}


@pytest.fixture(scope="session")
def cni_bin() -> Path:
    """The plugin directory ($STOCKADE_CNI_BIN); the tier fails loudly without it."""
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
