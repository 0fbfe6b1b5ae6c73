"""The operator's lowering: every node's hand-off parts from one Store snapshot.

No I/O: a function of the snapshot that keeps the compiler's caches between passes, so that a
pass does work in proportion to what changed, not to the cluster. It keeps each node's ids
(stable class and rule numbers), the verdict cache (a pass judges only what is new), the members
of every pod set the policies name (`stockade.compiler.membership`: only the pods that changed
move), each node's last inputs and lowering, and its last encoding (unchanged tables are not
encoded, hence not hashed, again). From what changed (pods, policies, the pod sets whose members
moved) it finds the nodes a change can reach (`_changed_nodes`); the others keep their last
lowering without being looked at, and a change it cannot place (a namespace or node changed, a
pod with named ports or on the host network) has every node compared with its last inputs. The
lowering engine (`stockade.control.worker.Engine`, in the worker process or the reconcile
thread) calls `desired()` on every pass that lowers, with its mirror's snapshot; the reconciler
(`stockade.control.reconciler`) hands the nodes that changed to the publisher.
tests/unit/test_lower_incremental.py checks every step of generated change sequences against a
cold lowering.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from stockade import handoff
from stockade.compiler import ir
from stockade.compiler.fallback import service_verdicts
from stockade.compiler.lower import Ids, Lowered, Lowering, Verdicts
from stockade.compiler.membership import Membership
from stockade.compiler.selection import Selection
from stockade.compiler.shape import Shape
from stockade.control.plan import NodeParts
from stockade.control.store import Snapshot
from stockade.model.cluster import ClusterState, Node
from stockade.model.fastopen import fast_open_namespaces
from stockade.model.policy import PodPeer, PodSet, Policy

# Verdicts and pod sets that name replaced policies are dropped once the policies added or
# removed since the last time are 1/RETAIN_SHARE of the policies
RETAIN_SHARE = 16


class Lowerer:
    """Lowers and encodes every node; attributes are public for metrics and tests."""

    def __init__(
        self,
        shape: Shape | None = None,
        inline_entries: int = handoff.INLINE_ENTRIES,
        services: bool = False,
    ) -> None:
        # services: every node gets the snapshot's Service address space and a Shape with
        # services, so that its agent judges Service flows on their backends (bpf/service.h)
        self._services = services
        self._shape = (
            dataclasses.replace(shape or Shape(), services=True) if services else (shape or Shape())
        )
        self._inline = inline_entries
        self.ids: dict[str, Ids] = {}
        self.verdicts = Verdicts()  # kept across passes: a pass judges only what is new
        self._encoded: dict[
            str, tuple[tuple[ir.NodeTables, frozenset[str]], dict[str, handoff.Shards]]
        ] = {}
        self._lowered: dict[str, tuple[object, Lowered]] = {}  # node -> its last inputs, result
        self.membership = Membership()  # pod sets' members, followed from pass to pass
        self.selection = Selection()  # each pod's policies and each node's endpoints, likewise
        # the last pass's policies and nodes, and each node's pod peers (as its lowering read
        # them): what tells which nodes a change can reach
        self._last: tuple[tuple[Policy, ...], dict[str, Node]] | None = None
        self._peer_sets: dict[str, tuple[object, frozenset[PodSet]]] = {}
        self._unretained = 0  # policies added or removed since the last retain
        self.nodes_lowered = 0  # nodes whose lowering was looked at again in the last pass
        self.node_seconds: dict[str, float] = {}
        # node -> the tables and Service backends its fallback verdicts were computed from
        self._fallback: dict[str, tuple[object, object, tuple[ir.ServiceVerdictEntry, ...]]] = {}

    def desired(
        self, snap: Snapshot, on_node: Callable[[str, NodeParts], None] | None = None
    ) -> dict[str, NodeParts]:
        """Every node's encoded parts (part -> shard -> Shard): nodes that exist or have pods.
        `on_node(node, parts)` is told of each node as soon as its parts are final."""
        policies = [r.policy for _, r in sorted(snap.policies.items()) if r.policy is not None]
        lowering = Lowering(
            snap.state,
            policies,
            self.verdicts,
            self._lowered,
            self.membership,
            self.selection,
            snap.pods_changed,
        )
        nodes = set(snap.state.nodes) | self.membership.nodes()
        changed = self._changed_nodes(snap.state, policies)
        policies_changed = self._last is None or [id(p) for p in self._last[0]] != [
            id(p) for p in policies
        ]
        if policies_changed and self._last is not None:
            before, after = {id(p) for p in self._last[0]}, {id(p) for p in policies}
            self._unretained += len(before ^ after)
        self._last = (tuple(policies), dict(snap.state.nodes))
        self.nodes_lowered = 0
        # Where a new pod may open before its tables arrive (every node gets the same list)
        opened = fast_open_namespaces(snap.state, policies)
        out: dict[str, NodeParts] = {}
        for node in sorted(nodes):
            began = time.monotonic()
            unchanged = changed is not None and node not in changed
            self.nodes_lowered += not unchanged
            lowered = lowering.node(node, self.ids.get(node), unchanged)
            self.ids[node] = lowered.ids
            self._note_peers(node)
            tables = lowered.tables
            if self._services:
                tables = dataclasses.replace(
                    tables,
                    services=snap.service_space,
                    service_verdicts=self._verdicts(node, tables, snap.service_backends),
                )
            last = self._encoded.get(node)
            if last is not None and last[0] == (tables, opened):
                out[node] = last[1]  # unchanged: skip encoding it again
            else:
                reuse = (last[0][0], last[1]) if last is not None else None
                parts = handoff.encode(tables, self._shape, self._inline, opened, reuse)
                self._encoded[node] = ((tables, opened), parts)
                out[node] = parts
            self.node_seconds[node] = time.monotonic() - began
            if on_node is not None:
                on_node(node, out[node])
        for node in set(self.ids) - nodes:
            del self.ids[node]
            self._encoded.pop(node, None)
            self._lowered.pop(node, None)
            self._fallback.pop(node, None)
            self._peer_sets.pop(node, None)
        # What names a policy that is gone is dropped once the policies that came since the
        # last time are a share of them: a scan of every policy's pod sets per policy change
        # would make one change at 50,000 pods cost in proportion to the policies. Until then
        # the verdicts and the pod sets of the policies replaced stay (exact all the same:
        # verdicts hold the policies their keys name, and pod sets stay followed).
        if changed is None or self._unretained * RETAIN_SHARE >= len(policies):
            self.verdicts.retain(policies)
            self.membership.retain(_pod_sets(policies))
            self._unretained = 0
        return out

    def _changed_nodes(self, state: ClusterState, policies: list[Policy]) -> set[str] | None:
        """The nodes whose lowering may differ from their last one, or None for every node.

        Called after `self.membership` followed `state`. A node's lowering reads its pods, the
        policies whose subject holds them (a pod's membership depends on the pod and its
        namespace's labels only), the members of those policies' pod and node peers, the pods
        with named ports, and node addresses. So with the same namespaces and nodes and no pod
        with named ports or on the host network among the changed ones, a node changes only
        when one of its pods changed, a policy added, removed or changed selects one of its
        pods, or a pod peer it reads has other members."""
        m = self.membership
        if m.reset or self._last is None or dict(state.nodes) != self._last[1]:
            return None
        if any(
            p is not None and (p.host_network or p.named_ports) for pair in m.moved for p in pair
        ):
            return None
        last = self._last[0]
        old, new = {id(p) for p in last}, {id(p) for p in policies}
        if [id(p) for p in policies if id(p) in old] != [id(p) for p in last if id(p) in new]:
            return None  # the order of the policies kept changed
        out = {p.node for pair in m.moved for p in pair if p is not None and p.node}
        for policy in (
            *(p for p in policies if id(p) not in old),
            *(p for p in last if id(p) not in new),
        ):
            out.update(pod.node for pod in m.pods_in(state, policy.subject) if pod.node)
        if m.changed:
            out.update(
                n for n, (_, sets) in self._peer_sets.items() if not sets.isdisjoint(m.changed)
            )
        return out

    def _note_peers(self, node: str) -> None:
        """Remember the pod peers the node's lowering read (again when it was lowered anew)."""
        entry = self._lowered.get(node)
        if entry is None:
            self._peer_sets.pop(node, None)
        elif (found := self._peer_sets.get(node)) is None or found[0] is not entry:
            inputs: Any = entry[0]
            peers = frozenset(p.pods for p in inputs[1] if isinstance(p, PodPeer))
            self._peer_sets[node] = (entry, peers)

    def _verdicts(
        self, node: str, tables: ir.NodeTables, backends: tuple[ir.ServiceBackends, ...]
    ) -> tuple[ir.ServiceVerdictEntry, ...]:
        """The node's Service fallback verdicts, computed again only when its tables or the
        Service backends changed."""
        last = self._fallback.get(node)
        if last is not None and last[0] == tables and last[1] == backends:
            return last[2]
        verdicts = service_verdicts(tables, backends)
        self._fallback[node] = (tables, backends, verdicts)
        return verdicts


def _pod_sets(policies: list[Policy]) -> set[PodSet]:
    """Every pod set the policies name: subjects and pod peers."""
    out = {p.subject for p in policies}
    for policy in policies:
        for rule in (*policy.ingress, *policy.egress):
            out.update(peer.pods for peer in rule.peers if isinstance(peer, PodPeer))
    return out
