"""Which endpoints does a policy select? Answered from the Store's indexes, not by a scan.

The status aggregation (`stockade.control.status`) counts a policy's selected endpoints per node
for its `Programmed` condition. Candidates come from the label postings of the selector's most
selective `In` requirement (or the namespace's pods when it has none); each candidate is then
checked with the model's own predicate (`stockade.model.matching.pod_in`), so the answer is the
evaluator's by construction.
"""

from __future__ import annotations

from collections.abc import Iterable

from stockade.control.store import Snapshot
from stockade.model.matching import pod_in
from stockade.model.policy import PodSet
from stockade.model.selectors import LabelSelector, SelectorOperator


def _smallest_in(selector: LabelSelector) -> tuple[str, tuple[str, ...]] | None:
    ins = [r for r in selector.requirements if r.operator is SelectorOperator.IN]
    if not ins:
        return None
    best = min(ins, key=lambda r: len(r.values))
    return best.key, best.values


def _namespaces(snap: Snapshot, pods: PodSet) -> Iterable[str]:
    if pods.namespace is not None:
        return (pods.namespace,)
    assert pods.namespace_selector is not None
    requirement = _smallest_in(pods.namespace_selector)
    if requirement is None:
        return snap.state.namespaces.keys()
    key, values = requirement
    return {ns for v in values for ns in snap.namespaces_by_label.get((key, v), ())}


def _candidates(snap: Snapshot, pods: PodSet, namespace: str) -> Iterable[str]:
    requirement = _smallest_in(pods.pod_selector)
    if requirement is None:
        return snap.pods_by_namespace.get(namespace, ())
    key, values = requirement
    return {p for v in values for p in snap.pods_by_label.get((namespace, key, v), ())}


def selected_endpoints(snap: Snapshot, pods: PodSet) -> dict[str, set[str]]:
    """node -> keys of the pods in `pods` that are endpoints there (scheduled, addressed, not
    host-network)."""
    out: dict[str, set[str]] = {}
    for namespace in _namespaces(snap, pods):
        for key in _candidates(snap, pods, namespace):
            pod = snap.pods.get(key)
            if pod is None or pod.node is None or not pod.ips:
                continue
            if pod_in(pods, pod, snap.state):
                out.setdefault(pod.node, set()).add(key)
    return out
