"""Which pods each pod set holds, kept from one cluster state to the next.

A `ClusterIndex` is built per state, so a lowering that asks for a pod set's members pays for
the whole cluster on every pass. `Membership` is carried by the operator from pass to pass
(`stockade.control.lowering`): `update(state)` finds the pods that changed since the state it
saw last (Pod values are immutable, so an unchanged pod is the same object) and moves only those
in or out of the pod sets it knows, so that a pass costs a scan for identity plus work in
proportion to the pods changed times the pod sets they can be in. A pod set it has not seen is
answered by the state's index and kept from then on. A change to any namespace (its labels decide
namespace selectors) clears what it knows.

Exact by construction: membership is `ClusterState.holds`, asked for every pod that changed in
every pod set of its namespace and every pod set chosen by namespace selector
(tests/unit/test_membership.py checks it against `ClusterIndex.pods_in` on random sequences).
"""

from __future__ import annotations

from collections.abc import Mapping

from stockade.model.cluster import ClusterState, Namespace, Pod
from stockade.model.policy import PodSet


class Membership:
    """Pod set -> its members (pod key -> Pod), updated in place from state to state."""

    def __init__(self) -> None:
        self._pods: dict[str, Pod] = {}  # every pod of the last state, by key
        self._namespaces: Mapping[str, Namespace] = {}
        self._state: ClusterState | None = None
        self._sets: dict[PodSet, dict[str, Pod]] = {}
        self._by_namespace: dict[str, set[PodSet]] = {}  # fixed namespace -> its pod sets
        self._selected: set[PodSet] = set()  # pod sets chosen by a namespace selector
        self.changed: set[PodSet] = set()  # pod sets whose members the last update changed
        # what the last update saw: the pods that changed (before, after; None: absent), and
        # whether it could not place them (the first state, or a namespace changed)
        self.moved: list[tuple[Pod | None, Pod | None]] = []
        self.reset = True
        self.updates = 0  # how many updates it has followed: what follows it checks it kept up

    def __len__(self) -> int:
        return len(self._sets)

    def update(self, state: ClusterState) -> None:
        """Follow `state`: the pods that differ from the last state's move in or out."""
        self.changed, self.moved = set(), []
        self.updates += 1
        if state is self._state:
            self.reset = False
            return
        pods = {pod.key: pod for pod in state.pods}
        self.reset = self._state is None or dict(state.namespaces) != dict(self._namespaces)
        if self.reset:
            self._forget()
        else:
            old = self._pods
            self.moved = [(old.get(k), p) for k, p in pods.items() if old.get(k) is not p]
            self.moved += [(p, None) for k, p in old.items() if k not in pods]
            for before, after in self.moved:
                self._move(state, before, after)
        self._pods, self._namespaces, self._state = pods, state.namespaces, state

    def _forget(self) -> None:
        self.changed = set(self._sets)
        self._sets.clear()
        self._by_namespace.clear()
        self._selected.clear()

    def _move(self, state: ClusterState, before: Pod | None, after: Pod | None) -> None:
        pod = after if after is not None else before
        assert pod is not None
        candidates = self._by_namespace.get(pod.namespace, set()) | self._selected
        for pods in candidates:
            members = self._sets[pods]
            was = before is not None and members.pop(before.key, None) is not None
            now = after is not None and state.holds(pods, after)
            if now:
                assert after is not None
                members[after.key] = after
            if was or now:
                self.changed.add(pods)

    def pods_in(self, state: ClusterState, pods: PodSet) -> list[Pod]:
        """The members of `pods` in `state`, which must be the state of the last `update`."""
        assert state is self._state, "Membership.update(state) first"
        members = self._sets.get(pods)
        if members is None:
            members = {pod.key: pod for pod in state.index.pods_in(pods)}
            self._sets[pods] = members
            if pods.namespace is not None:
                self._by_namespace.setdefault(pods.namespace, set()).add(pods)
            else:
                self._selected.add(pods)
        return list(members.values())

    def holding(self, pod: Pod) -> list[PodSet]:
        """The pod sets it knows that hold `pod`, a pod of the last state: only those of the
        pod's namespace and those chosen by namespace selector can."""
        candidates = self._by_namespace.get(pod.namespace, set()) | self._selected
        return [s for s in candidates if self._sets[s].get(pod.key) is pod]

    def retain(self, keep: set[PodSet]) -> None:
        """Forget the pod sets not in `keep` (no policy names them any more)."""
        for pods in set(self._sets) - keep:
            del self._sets[pods]
            self._selected.discard(pods)
            if pods.namespace is not None:
                self._by_namespace.get(pods.namespace, set()).discard(pods)
