"""Which endpoints does a policy select? Answered from the state's label indexes, not by a scan.

The status aggregation (`stockade.control.status`) counts a policy's selected endpoints per node
for its `Programmed` condition. `ClusterState.index` finds the pods of the selector, checked
with the model's own predicate, so the answer is the evaluator's by construction.
"""

from __future__ import annotations

from stockade.control.store import Snapshot
from stockade.model.policy import PodSet


def selected_endpoints(snap: Snapshot, pods: PodSet) -> dict[str, set[str]]:
    """node -> keys of the pods in `pods` that are endpoints there (scheduled, addressed, not
    host-network)."""
    out: dict[str, set[str]] = {}
    for pod in snap.state.index.pods_in(pods):
        if pod.node is not None and pod.ips:
            out.setdefault(pod.node, set()).add(pod.key)
    return out
