"""A policy's lowering cost and table size grow linearly in its size (DESIGN.md §7, #15 item 8).

A standard NetworkPolicy has no size bounds: one rule with n /32 ipBlocks and m ports used to
lower into one peer class per block, each with every port cut and judged by the evaluator
reading every peer and port, so n x m policy entries in n x m x (n + m) steps, and one shard
larger than the API server takes. What is provable and checked here, for one rule of n ipBlocks
and m ports (ports spaced so that none merge into a range):

- the node's entries (classes and policy) are at most 2 (n + m) + 16: one class per block (the
  blocks are one peer group: the same rule holds them all) and one policy entry per port;
- the evaluator's predicates (peer and port matching) run at most 8 (n + m) + 64 times: each
  class tests each peer once, and each port piece is decided reading only the port specs that
  cover it;
- every published shard of that node stays under 1 MiB (the API server refuses about 1.5 MiB).

Adjacent ports with the same verdict merge into one range before they become prefixes.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from stockade import handoff
from stockade.compiler import ir, lower
from stockade.compiler.lower import Lowering
from stockade.model import matching
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.parse import parse_policy

STATE = ClusterState(
    [Namespace("a", {"kubernetes.io/metadata.name": "a"})],
    [
        Pod("a", "p", {}, (ipaddress.ip_address("10.244.0.2"),), "n0", {}),
        Pod("a", "q", {}, (ipaddress.ip_address("10.244.0.3"),), "n0", {}),
    ],
    [Node("n0", (ipaddress.ip_address("172.18.0.10"),))],
)


def wide(n: int, m: int, step: int = 2) -> dict[str, Any]:
    """One ingress rule: n /32 ipBlocks from n ports (every `step`-th port from 1000)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": "a", "name": "wide", "uid": "u", "generation": 1},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": f"10.{i // 250}.{i % 250}.{1 + i % 7}/32"}}
                        for i in range(n)
                    ],
                    "ports": [{"port": 1000 + step * j} for j in range(m)],
                }
            ],
        },
    }


def _lower(n: int, m: int, step: int = 2) -> ir.NodeTables:
    return Lowering(STATE, [parse_policy(wide(n, m, step))]).node("n0").tables


@pytest.mark.parametrize(("n", "m"), [(10, 10), (40, 40), (300, 300), (1000, 50), (50, 1000)])
def test_entries_of_n_ip_blocks_by_m_ports_are_linear(n: int, m: int) -> None:
    tables = _lower(n, m)
    endpoints = 2  # both pods are selected; each has its own entries
    assert len(tables.classes) + len(tables.policy) / endpoints <= 2 * (n + m) + 16


@pytest.mark.parametrize(("n", "m"), [(10, 10), (100, 100), (300, 300)])
def test_the_evaluator_runs_linear_in_n_plus_m(
    n: int, m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def counted(real: Any) -> Any:
        def call(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(*args)

        return call

    monkeypatch.setattr(matching, "peer_matches", counted(matching.peer_matches))
    monkeypatch.setattr(matching, "port_matches", counted(matching.port_matches))
    monkeypatch.setattr(lower, "peer_matches", counted(lower.peer_matches))
    _lower(n, m)
    assert calls <= 8 * (n + m) + 64


def test_adjacent_ports_merge_into_ranges() -> None:
    tables = _lower(1, 256, step=1)  # ports 1000..1255: a handful of prefixes, not 256
    assert len([e for e in tables.policy if e.protocol == ir.PROTO_TCP]) <= 2 * 16 * 2


def test_no_shard_of_a_node_under_a_wide_policy_nears_the_object_size_limit() -> None:
    parts = handoff.encode(_lower(300, 300), inline_max=0)
    largest = max(
        sum(len(e) + 1 for e in shard.entries)
        for shards in parts.values()
        for shard in shards.values()
    )
    assert largest < 1 << 20
