"""The operator's lowering: every node's hand-off parts from one Store snapshot.

No I/O: a function of the snapshot that keeps the compiler's caches between passes, so that a
pass does only what is new. It keeps each node's ids (stable class and rule numbers), the
verdict cache (a pass judges only what is new), each node's last inputs and lowering (an
unchanged node is not lowered again) and its last encoding (unchanged tables are not encoded,
hence not hashed, again). The reconciler (`stockade.control.reconciler`) calls `desired()` on
every pass that lowers and hands the result to the publisher.
"""

from __future__ import annotations

import dataclasses
import time

from stockade import handoff
from stockade.compiler import ir
from stockade.compiler.fallback import service_verdicts
from stockade.compiler.lower import Ids, Lowered, Lowering, Verdicts
from stockade.compiler.shape import Shape
from stockade.control.plan import NodeParts
from stockade.control.store import Snapshot
from stockade.model.fastopen import fast_open_namespaces


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
        self.node_seconds: dict[str, float] = {}
        # node -> the tables and Service backends its fallback verdicts were computed from
        self._fallback: dict[str, tuple[object, object, tuple[ir.ServiceVerdictEntry, ...]]] = {}

    def desired(self, snap: Snapshot) -> dict[str, NodeParts]:
        """Every node's encoded parts (part -> shard -> Shard): nodes that exist or have pods."""
        policies = [r.policy for _, r in sorted(snap.policies.items()) if r.policy is not None]
        nodes = set(snap.state.nodes) | {p.node for p in snap.state.pods if p.node}
        lowering = Lowering(snap.state, policies, self.verdicts, self._lowered)
        # Where a new pod may open before its tables arrive (every node gets the same list)
        opened = fast_open_namespaces(snap.state, policies)
        out: dict[str, NodeParts] = {}
        for node in sorted(nodes):
            began = time.monotonic()
            lowered = lowering.node(node, self.ids.get(node))
            self.ids[node] = lowered.ids
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
                parts = handoff.encode(tables, self._shape, self._inline, opened)
                self._encoded[node] = ((tables, opened), parts)
                out[node] = parts
            self.node_seconds[node] = time.monotonic() - began
        for node in set(self.ids) - nodes:
            del self.ids[node]
            self._encoded.pop(node, None)
            self._lowered.pop(node, None)
            self._fallback.pop(node, None)
        self.verdicts.retain(policies)
        return out

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
