"""Label indexes over a `ClusterState`: which pods a `PodSet` holds, without a scan of all pods.

A selector's candidates come from the postings of its most selective `In` requirement (or, with
none, every pod of the candidate namespaces); each candidate is then checked with the model's own
predicate (`stockade.model.matching.pod_in`), so the answer is the evaluator's by construction.

Built once per state (`ClusterState.index`); the operator's status aggregation
(`stockade.control.selection`) and the compiler's subject and peer sets
(`stockade.compiler.lower`, `stockade.compiler.classes`) read it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from stockade.model.cluster import ClusterState, Pod
from stockade.model.matching import pod_in
from stockade.model.policy import PodSet
from stockade.model.selectors import LabelSelector, SelectorOperator


def _smallest_in(selector: LabelSelector) -> tuple[str, tuple[str, ...]] | None:
    ins = [r for r in selector.requirements if r.operator is SelectorOperator.IN]
    if not ins:
        return None
    best = min(ins, key=lambda r: len(r.values))
    return best.key, best.values


class ClusterIndex:
    """Pods by namespace and by (namespace, label key, value); namespaces by (key, value)."""

    def __init__(self, state: ClusterState) -> None:
        self._state = state
        by_namespace: dict[str, list[Pod]] = defaultdict(list)
        by_label: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
        for pod in state.pods:
            if pod.host_network:
                continue  # never a member of a pod set
            by_namespace[pod.namespace].append(pod)
            for key, value in pod.labels.items():
                by_label[(pod.namespace, key, value)].append(pod)
        ns_by_label: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name, namespace in state.namespaces.items():
            for label in namespace.labels.items():
                ns_by_label[label].append(name)
        self._by_namespace = dict(by_namespace)
        self._by_label = dict(by_label)
        self._ns_by_label = dict(ns_by_label)

    def _namespaces(self, pods: PodSet) -> Iterable[str]:
        if pods.namespace is not None:
            return (pods.namespace,)
        assert pods.namespace_selector is not None
        found = _smallest_in(pods.namespace_selector)
        if found is None:
            return self._state.namespaces.keys()
        key, values = found
        return sorted({ns for v in values for ns in self._ns_by_label.get((key, v), ())})

    def _candidates(self, pods: PodSet, namespace: str) -> Iterable[Pod]:
        found = _smallest_in(pods.pod_selector)
        if found is None:
            return self._by_namespace.get(namespace, ())
        key, values = found
        return [p for v in values for p in self._by_label.get((namespace, key, v), ())]

    def pods_in(self, pods: PodSet) -> list[Pod]:
        """The pods of `pods` (host-network pods are never members), in no particular order."""
        return [
            pod
            for namespace in self._namespaces(pods)
            for pod in self._candidates(pods, namespace)
            if pod_in(pods, pod, self._state)
        ]
