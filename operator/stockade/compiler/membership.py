"""Which pods each pod set holds, kept from one cluster state to the next.

A `ClusterIndex` is built per state, so a lowering that asks for a pod set's members pays for
the whole cluster on every pass. `Membership` is carried by the operator from pass to pass
(`stockade.control.lowering`): `update(state)` finds the pods that changed since the state it
saw last (Pod values are immutable, so an unchanged pod is the same object) and moves only those
in or out of the pod sets it knows, so that a pass costs a scan for identity plus work in
proportion to the pods changed times the pod sets they can be in. When the caller knows which
pods changed since that state (the lowering worker's `Mirror` does), it passes them and there is
no scan: one change at 50,000 pods costs the change, not the cluster. A pod set it has not seen is
answered by the state's index and kept from then on. A change to any namespace (its labels decide
namespace selectors) clears what it knows.

Exact by construction: membership is `ClusterState.holds`, asked for every pod that changed in
every pod set of its namespace and every pod set chosen by namespace selector
(tests/unit/test_membership.py checks it against `ClusterIndex.pods_in` on random sequences).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from stockade.model.cluster import ClusterState, Namespace, Pod
from stockade.model.policy import PodSet

# The state a caller's previous update saw and the pods changed since (key -> the pod now,
# None: gone), from whoever built both states (the lowering worker's `Mirror`)
PodsChanged = tuple[ClusterState, Mapping[str, Pod | None]]


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
        self._on_node: Counter[str] = Counter()  # node -> how many pods of the state it holds

    def __len__(self) -> int:
        return len(self._sets)

    def update(self, state: ClusterState, changed: PodsChanged | None = None) -> None:
        """Follow `state`: the pods that differ from the last state's move in or out. With
        `changed` (the last state this followed and the pods changed since), only those pods
        are looked at; without it, every pod is compared with the last state's by identity."""
        self.changed, self.moved = set(), []
        self.updates += 1
        if state is self._state:
            self.reset = False
            return
        self.reset = self._state is None or dict(state.namespaces) != dict(self._namespaces)
        if self.reset:
            self._forget()
            self._pods = {pod.key: pod for pod in state.pods}
            self._on_node = Counter(pod.node for pod in state.pods if pod.node)
        elif changed is not None and changed[0] is self._state:
            pods = self._pods
            present: list[tuple[Pod | None, Pod | None]] = []
            gone: list[tuple[Pod | None, Pod | None]] = []
            for key in sorted(changed[1]):
                before, after = pods.get(key), changed[1][key]
                if before is after:
                    continue
                if after is None:
                    del pods[key]
                    gone.append((before, None))
                else:
                    pods[key] = after
                    present.append((before, after))
            self.moved = present + gone  # in the order a comparison of every pod finds them
        else:
            old = self._pods
            pods = {pod.key: pod for pod in state.pods}
            self.moved = [(old.get(k), p) for k, p in pods.items() if old.get(k) is not p]
            self.moved += [(p, None) for k, p in old.items() if k not in pods]
            self._pods = pods
        for before, after in self.moved:
            self._move(state, before, after)
            if before is not None and before.node:
                self._on_node[before.node] -= 1
                if not self._on_node[before.node]:
                    del self._on_node[before.node]
            if after is not None and after.node:
                self._on_node[after.node] += 1
        self._namespaces, self._state = state.namespaces, state

    def nodes(self) -> set[str]:
        """The nodes that the last state's pods are scheduled on."""
        return set(self._on_node)

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
