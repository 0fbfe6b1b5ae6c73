"""Policies enforced by the whole stack with real traffic: the API server, the operator, one agent
per node (two nodes) and TCP connections between pods in network namespaces.

Every kind of policy stockade enforces is applied and deleted; updates, pod and namespace label
changes move pods into and out of peer sets; a new pod in a selected namespace is isolated; a
deleted pod's links and map entries go from its node. One stack serves the whole module
(`tests.e2e.stack_fixtures`); `Stack.reset()` brings it back to the model after each test.
Reachability is polled until it matches the expectation or a deadline passes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.attachments import LINKS_DIR, pin_folder
from stockade.compiler import abi, ir
from stockade.datapath import layout, libbpf
from stockade.datapath.maps import Pending, PinnedMaps
from stockade.datapath.netns import NetnsExecutor
from stockade.sandbox.node.registration import delete_pod
from tests.bpf.agent_harness import tcx_programs
from tests.e2e.stack_fixtures import Pair, Stack, running_stack
from tests.fixtures.controlplane import wait_for

A, B = "x/a", "x/b"  # namespace x: a on node-1, b on node-2
YA, YB = "y/a", "y/b"  # namespace y: the same
FROM_Y_TO_X = {(YA, A), (YA, B), (YB, A), (YB, B)}


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("enforcement")) as running:
        yield running


@pytest.fixture
def stack(module_stack: Stack) -> Iterator[Stack]:
    yield module_stack
    module_stack.reset()


def netpol(name: str, spec: dict[str, Any], namespace: str = "x") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def ingress_to_a(*peers: dict[str, Any]) -> dict[str, Any]:
    """A standard NetworkPolicy spec: x/a accepts only from `peers`."""
    return {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": list(peers)}] if peers else [],
    }


# -- one policy of each kind: applied, then deleted -------------------------------------------


@dataclass(frozen=True)
class KindCase:
    policy: dict[str, Any]
    denied: frozenset[Pair]


KINDS = {
    "a standard NetworkPolicy admits only the peers it lists": KindCase(
        netpol("only-b", ingress_to_a({"podSelector": {"matchLabels": {"pod": "b"}}})),
        frozenset({(YA, A), (YB, A)}),
    ),
    "a stockade NetworkPolicy Deny rule wins over its Allow rule": KindCase(
        {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny-y", "namespace": "x"},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "action": "Deny",
                        "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    },
                    {"action": "Allow", "from": [{"namespaceSelector": {}}]},
                ],
            },
        },
        frozenset({(YA, A), (YB, A)}),
    ),
    "a stockade ClusterNetworkPolicy denies ingress from one namespace to another": KindCase(
        {
            "apiVersion": "stockade.io/v1alpha1",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "x-refuses-y"},
            "spec": {
                "tier": "Admin",
                "priority": 10,
                "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                "ingress": [
                    {
                        "name": "from-y",
                        "action": "Deny",
                        "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}],
                    }
                ],
            },
        },
        frozenset(FROM_Y_TO_X),
    ),
    "an upstream ClusterNetworkPolicy denies egress from one namespace to another": KindCase(
        {
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "y-never-reaches-x"},
            "spec": {
                "tier": "Admin",
                "priority": 10,
                "subject": {"namespaces": {"matchLabels": {"ns": "y"}}},
                "egress": [
                    {
                        "name": "to-x",
                        "action": "Deny",
                        "to": [{"namespaces": {"matchLabels": {"ns": "x"}}}],
                    }
                ],
            },
        },
        frozenset(FROM_Y_TO_X),
    ),
}


@pytest.mark.parametrize("case", list(KINDS.values()), ids=list(KINDS))
def test_a_policy_denies_once_applied_and_allows_again_once_deleted(
    stack: Stack, case: KindCase
) -> None:
    stack.apply(case.policy)
    stack.wait_reachability(denied=case.denied)
    stack.delete(case.policy)
    stack.wait_reachability(denied=())


# -- changes after the policy: each step's action, then the reachability it must lead to ------

Step = tuple[Callable[[Stack], None], frozenset[Pair]]
ALL_TO_A = frozenset({(B, A), (YA, A), (YB, A)})
CLIENT_POD = {"podSelector": {"matchLabels": {"role": "client"}}, "namespaceSelector": {}}
BLUE_NAMESPACE = {"namespaceSelector": {"matchLabels": {"team": "blue"}}}


def _apply(policy: dict[str, Any]) -> Callable[[Stack], None]:
    return lambda s: s.apply(policy)


def _replace(policy: dict[str, Any]) -> Callable[[Stack], None]:
    return lambda s: s.replace(policy)


def _pod_labels(key: str, labels: dict[str, str]) -> Callable[[Stack], None]:
    """Add or overwrite `labels` on pod `key`, keeping its others."""
    return lambda s: s.set_pod_labels(key, {**s.labels[key], **labels})


def _drop_pod_label(pod: str, key: str) -> Callable[[Stack], None]:
    return lambda s: s.set_pod_labels(pod, {k: v for k, v in s.labels[pod].items() if k != key})


def _namespace_labels(namespace: str, labels: dict[str, str]) -> Callable[[Stack], None]:
    return lambda s: s.sandbox.set_namespace_labels(namespace, labels)


SCENARIOS: dict[str, list[Step]] = {
    "an updated policy admits its new peers and no longer its old ones": [
        (
            _apply(netpol("a-in", ingress_to_a({"podSelector": {"matchLabels": {"pod": "b"}}}))),
            frozenset({(YA, A), (YB, A)}),
        ),
        (
            _replace(
                netpol("a-in", ingress_to_a({"namespaceSelector": {"matchLabels": {"ns": "y"}}}))
            ),
            frozenset({(B, A)}),
        ),
    ],
    "a pod label change moves the pod into and out of a peer set": [
        (_apply(netpol("a-in", ingress_to_a(CLIENT_POD))), ALL_TO_A),
        (_pod_labels(YB, {"role": "client"}), frozenset({(B, A), (YA, A)})),
        (_pod_labels(B, {"role": "client"}), frozenset({(YA, A)})),
        (_drop_pod_label(YB, "role"), frozenset({(YA, A), (YB, A)})),
    ],
    "a namespace label change moves its pods into and out of a peer set": [
        (_apply(netpol("a-in", ingress_to_a(BLUE_NAMESPACE))), ALL_TO_A),
        (_namespace_labels("y", {"ns": "y", "team": "blue"}), frozenset({(B, A)})),
        (_namespace_labels("y", {"ns": "y"}), ALL_TO_A),
    ],
    "a label change on the selected pod moves it out of the policy's subject": [
        (_apply(netpol("a-in", ingress_to_a())), ALL_TO_A),
        (_pod_labels(A, {"pod": "a-renamed"}), frozenset()),
        (_pod_labels(A, {"pod": "a"}), ALL_TO_A),
    ],
}


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_each_change_is_enforced_in_turn(stack: Stack, steps: list[Step]) -> None:
    for index, (action, denied) in enumerate(steps):
        action(stack)
        try:
            stack.wait_reachability(denied=denied)
        except AssertionError as exc:
            raise AssertionError(f"step {index}: {exc}") from None


# -- pods that come and go --------------------------------------------------------------------


def test_a_new_pod_in_a_selected_namespace_is_isolated(stack: Stack) -> None:
    deny_all = netpol("deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]})
    stack.apply(deny_all)
    into_x = {(s, d) for s, d in stack.pairs() if d.startswith("x/")}
    stack.wait_reachability(denied=into_x)

    stack.add_pod("x/new", "node-2", {"pod": "new"})
    into_x = {(s, d) for s, d in stack.pairs() if d.startswith("x/")}
    assert {(A, "x/new"), (YB, "x/new")} <= into_x
    stack.wait_reachability(denied=into_x)


def test_deleting_a_pod_removes_its_links_and_map_entries_on_its_node(stack: Stack) -> None:
    stack.apply(
        netpol("c-in", {"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"]})
    )
    pod = stack.add_pod("x/c", "node-1", {"pod": "c"})
    stack.wait_reachability(denied={(s, d) for s, d in stack.pairs() if d == "x/c"})
    root = stack.pin_root("node-1")
    links = root / LINKS_DIR / pin_folder(pod.host_ifname)
    key = ir.EndpointEntry(ip_address(pod.ip_v4), 0).key()

    endpoints, policy = node_tables(root)
    assert key in endpoints, "the pod's address is not in node-1's endpoints map"
    endpoint_id = abi.ENDPOINT_VALUE.unpack(endpoints[key])[0]
    assert endpoint_id in policy, f"no policy entries for endpoint {endpoint_id}"
    assert len(os.listdir(links)) == 2
    with NetnsExecutor.named(stack.sandbox.topology.node("node-1").netns) as ex:
        before = tcx_programs(ex, pod.host_ifname)
    assert before["ingress"] and before["egress"]

    namespace, _, name = pod.key.partition("/")
    delete_pod(stack.api, namespace, name)  # the Pod object goes; its interface stays

    def state_gone() -> bool:
        endpoints, policy = node_tables(root)
        return key not in endpoints and endpoint_id not in policy

    wait_for("node-1 forgets the deleted pod", state_gone)
    # No CNI DEL ran, so its veth is still there: an interface of no known pod, which the
    # agent's backstop (it serves stockade-cni here) holds pending and closed, programs attached.
    with NetnsExecutor.named(stack.sandbox.topology.node("node-1").netns) as ex:
        ifindex = ex.run(socket.if_nametoindex, pod.host_ifname)

        def held_closed() -> bool:
            with PinnedMaps.open(root) as maps:
                state = Pending(maps).read().get(ifindex)
            return state is abi.PendingState.CLOSED

        wait_for("the deleted pod's interface pending, closed", held_closed)
        after = tcx_programs(ex, pod.host_ifname)
    assert after["ingress"] and after["egress"]
    # Its neighbours still enforce what they did.
    stack.wait_reachability(denied=(), pairs=[p for p in stack.pairs() if "x/c" not in p])


def node_tables(pin_root: Path) -> tuple[dict[bytes, bytes], set[int]]:
    """A node's endpoints map (address key -> value) and the endpoint ids in its policy map."""
    with PinnedMaps.open(pin_root) as maps:
        physical = {}
        for name in layout.PHYSICAL_MAPS:
            fd = maps.fd(name)
            info = libbpf.map_info(fd)
            physical[name] = dict(libbpf.map_dump(fd, info.key_size, info.value_size))
    tables = layout.join(physical)
    endpoints = dict(tables["endpoints"])
    policy_endpoints = {
        int.from_bytes(abi.POLICY_KEY.get(k, "endpoint_dir"), "big") >> 1 for k in tables["policy"]
    }
    return endpoints, policy_endpoints
