"""Which policies select each pod, and each node's endpoints, kept from one pass to the next.

A node's lowering needs, for each of its pods, the policies whose subject holds it (in the
policies' order), and the node's endpoints (scheduled, addressed, not host-network pods). Built
from nothing, the first costs the members of every policy's subject and the second a scan of
every pod: at 5,000 policies over 50,000 pods, most of a pass that follows one change.
`Selection` is carried by the operator from pass to pass (`stockade.control.lowering`) beside the
`Membership` it reads: while the policies are the same objects in the same order and the
membership could place every pod that changed, only the pods that changed are looked at again,
each against the subjects that can hold it (`Membership.holding`). One policy changed in place
(the same position in the policies' order, a new object) costs the members of its old and its
new subject, and no more. Anything else (the first pass, a policy added or removed, several
changed, a namespace changed, many pods at once) builds both again, exactly as a cold lowering
does.

Exact by construction: a pod's policies are those whose subject's members hold it, which is what
the cold path asks (tests/unit/test_lower_incremental.py checks every step of generated change
sequences against a cold lowering).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from stockade.compiler.membership import Membership
from stockade.model.cluster import ClusterState, Pod
from stockade.model.policy import PodSet, Policy

# Above this many pods changed times policies, building from nothing costs less than placing
# each changed pod (the initial intake of a whole cluster arrives as one change).
INCREMENTAL_LIMIT = 2_000_000


def _same(a: Sequence[Policy], b: Sequence[Policy]) -> bool:
    """The same policy objects in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def is_endpoint(pod: Pod) -> bool:
    """A pod the node's programs enforce: scheduled, addressed, not on the host network."""
    return bool(pod.node) and not pod.host_network and bool(pod.ips)


class Selection:
    """pod key -> the policies that select it; node -> its endpoints. `update` first."""

    def __init__(self) -> None:
        self._current: Sequence[Policy] | None = None  # the policies it follows
        self._subjects: dict[PodSet, list[int]] = {}  # subject -> indices of its policies
        self._selecting: dict[str, list[Policy]] = {}
        self._endpoints: dict[str, dict[str, Pod]] = {}
        self._followed = -1  # the membership update it followed last
        self.rebuilt = True  # whether the last update built everything again

    def update(self, state: ClusterState, policies: Sequence[Policy], members: Membership) -> None:
        """Follow `state` and `policies`; `members` has been updated to `state`."""
        previous = self._current
        same = previous is not None and _same(previous, policies)
        replaced = None if same else self._replaced(policies)
        moved = members.moved
        self.rebuilt = (
            (not same and replaced is None)
            or members.reset
            or members.updates != self._followed + 1
            or len(moved) * max(1, len(policies)) > INCREMENTAL_LIMIT
        )
        self._followed = members.updates
        self._current = policies
        if self.rebuilt:
            self._build(state, policies, members)
            return
        if replaced is not None:
            assert previous is not None
            self._replace(state, previous[replaced], policies, replaced, members)
        for before, after in moved:
            if before is not None:
                self._selecting.pop(before.key, None)
                if is_endpoint(before):
                    assert before.node is not None
                    self._endpoints[before.node].pop(before.key, None)
            if after is not None:
                found = sorted(i for s in members.holding(after) for i in self._subjects.get(s, ()))
                if found:
                    self._selecting[after.key] = [policies[i] for i in found]
                if is_endpoint(after):
                    assert after.node is not None
                    self._endpoints.setdefault(after.node, {})[after.key] = after
        for node in [n for n, pods in self._endpoints.items() if not pods]:
            del self._endpoints[node]

    def _replaced(self, policies: Sequence[Policy]) -> int | None:
        """The position of the one policy replaced in place since the last update, if one."""
        if self._current is None or len(policies) != len(self._current):
            return None
        changed = [
            i for i, (a, b) in enumerate(zip(self._current, policies, strict=True)) if a is not b
        ]
        return changed[0] if len(changed) == 1 else None

    def _replace(
        self,
        state: ClusterState,
        old: Policy,
        policies: Sequence[Policy],
        at: int,
        members: Membership,
    ) -> None:
        """`old` at position `at` became `policies[at]`: the members of both subjects change
        their lists (before the pods that changed are placed again, against the new subjects)."""
        new = policies[at]
        indices = self._subjects[old.subject]
        indices.remove(at)
        if not indices:
            del self._subjects[old.subject]
        bisect.insort(self._subjects.setdefault(new.subject, []), at)
        for pod in members.pods_in(state, old.subject):
            chosen = self._selecting.get(pod.key)
            if chosen is None:
                continue
            chosen[:] = [p for p in chosen if p is not old]
            if not chosen:
                del self._selecting[pod.key]
        order = {id(p): i for i, p in enumerate(policies)}
        for pod in members.pods_in(state, new.subject):
            chosen = self._selecting.setdefault(pod.key, [])
            bisect.insort(chosen, new, key=lambda p: order[id(p)])

    def _build(self, state: ClusterState, policies: Sequence[Policy], members: Membership) -> None:
        self._subjects = {}
        self._selecting = {}
        for i, policy in enumerate(policies):
            self._subjects.setdefault(policy.subject, []).append(i)
            for pod in members.pods_in(state, policy.subject):
                self._selecting.setdefault(pod.key, []).append(policy)
        self._endpoints = {}
        for pod in state.pods:
            if is_endpoint(pod):
                assert pod.node is not None
                self._endpoints.setdefault(pod.node, {})[pod.key] = pod

    def selecting(self, pod: Pod) -> list[Policy]:
        """The policies whose subject holds `pod`, in the policies' order."""
        return self._selecting.get(pod.key, [])

    def endpoints(self, node: str) -> list[Pod]:
        return list(self._endpoints.get(node, {}).values())
