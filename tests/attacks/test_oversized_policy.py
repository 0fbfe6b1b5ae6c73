"""Attack: one namespace's policy freezes a node (and every status write).

A standard NetworkPolicy has no size bounds. One with a few hundred /32 ipBlocks by a few hundred
ports used to lower in cubic time into one policy shard of several MB, past the API server's
object size limit: the write failed on every pass, the node's agent waited for a complete set
forever, and since a pass that failed wrote no status, no policy anywhere was reported again.

Here, on the sandbox API server with the operator running in-process (as tests/apiserver/
test_operator.py runs it), a tenant writes both: `wide`, 300 ipBlocks x 300 ports (under the size
limit: it now lowers linearly and is programmed like any other policy), and `huge`, past
`POLICY_SIZE_LIMIT` (refused with the reason TooLarge, an Event naming the limit, and not
enforced, like any policy stockade does not accept). A second, normal policy in the same
namespace still converges: every node's tables are exactly the lowering of what is accepted,
every shard stays far under the object size limit, and the normal policy gets Programmed.
"""

from __future__ import annotations

from typing import Any

import kubernetes.client

from stockade.model.admission import POLICY_SIZE_LIMIT
from stockade.sandbox.controlplane.server import ControlPlane
from tests.apiserver.test_operator import (
    ALLOW_WEB_FROM_CLIENT,
    Cluster,
    OperatorThread,
    apply_snp,
    cluster,
    condition,
    converged,
    lease_name,
    operators,
    report,
    snp,
    start,
    tables_of,
)
from tests.fixtures.controlplane import wait_for

__all__ = ["cluster", "operators"]  # the fixtures this module uses from test_operator

SHARD_BYTES = 1 << 20  # the API server refuses an object of about 1.5 MiB


def ip_blocks(namespace: str, name: str, blocks: int, ports: int) -> dict[str, Any]:
    """A standard NetworkPolicy on the web pods: one rule of `blocks` /32 ipBlocks by `ports`
    single ports (spaced, so that none merge into a range)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"role": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": f"10.{i // 250}.{i % 250}.{1 + i % 7}/32"}}
                        for i in range(blocks)
                    ],
                    "ports": [{"port": 1000 + 2 * j} for j in range(ports)],
                }
            ],
        },
    }


def create_netpol(api: Any, obj: dict[str, Any]) -> None:
    kubernetes.client.NetworkingV1Api(api).create_namespaced_network_policy(
        obj["metadata"]["namespace"], kubernetes.client.V1NetworkPolicy.model_validate(obj)
    )


def events(api: Any, namespace: str, name: str) -> list[Any]:
    listed = kubernetes.client.CoreV1Api(api).list_namespaced_event(namespace)
    return [e for e in listed.items if e.involved_object.name == name]


def test_oversized_policy(
    control_plane: ControlPlane, operators: list[OperatorThread], cluster: Cluster, api_client: Any
) -> None:
    start(control_plane, operators, lease_name(), "one")
    ns = cluster.namespace
    create_netpol(api_client, ip_blocks(ns, "wide", 300, 300))
    create_netpol(api_client, ip_blocks(ns, "huge", POLICY_SIZE_LIMIT - 500, 501))
    apply_snp(api_client, snp(ns, "allow-web", **ALLOW_WEB_FROM_CLIENT))

    # The hostile policy is refused, with a reason and a message naming the limit.
    def refused() -> Any:
        found = [e for e in events(api_client, ns, "huge") if e.reason == "TooLarge"]
        return found[0] if found else None

    event = wait_for("a TooLarge Event on the oversized policy", refused, timeout=60)
    assert event.type == "Warning"
    assert f"policy size limit of {POLICY_SIZE_LIMIT}" in event.message
    assert f"{POLICY_SIZE_LIMIT + 1} peers" in event.message

    # Every node converges to exactly the lowering of the accepted policies (`wide` included,
    # `huge` not), in shards far under the object size limit.
    wait_for("tables published", lambda: converged(api_client, cluster.nodes), timeout=60)
    for node in cluster.nodes:
        for item in tables_of(api_client, node.name):
            size = sum(len(e) + 1 for e in item["spec"]["entries"])
            assert size < SHARD_BYTES, item["metadata"]["name"]

    # The normal policy gets Programmed once both agents apply their tables; so does `wide`.
    for node in cluster.nodes:
        report(api_client, node.name)

    def programmed() -> dict[str, Any] | None:
        found = condition(api_client, ns, "allow-web", "Programmed")
        return found if found is not None and found["status"] == "True" else None

    assert wait_for("allow-web Programmed", programmed)["message"] == "2/2 endpoints"
    wait_for(
        "a Programmed Event on the wide policy",
        lambda: any(e.reason == "Programmed" for e in events(api_client, ns, "wide")),
    )
    assert not any(e.reason == "Programmed" for e in events(api_client, ns, "huge"))
