"""Which namespaces a new pod may be opened in at once, before its tables arrive: the fast path
of the pending state (see docs/install.md).

A pod in such a namespace is judged, in both directions, exactly as if no policy existed, so
letting everything through at its interface (PENDING_OPEN) changes nothing it would be allowed
or denied. The agent knows only the new pod's namespace name (CNI_ARGS), not its labels, so the
rule is decided per namespace and errs on the closed side:

    a namespace N is fast-open when no namespaced policy (of any mode) lives in N, and no
    cluster-scoped policy (of any mode, any tier) has a subject whose namespace part holds N:
    its namespace selector matches N's labels, whatever its pod selector.

Peers do not matter: a policy judges only the pods its subject holds (the other end of a flow
is judged by its own policies, at its own interface). Audit-mode policies count too, so that
their findings are never lost to the fast path. A namespace the snapshot does not know is not
fast-open.
"""

from __future__ import annotations

from collections.abc import Iterable

from stockade.model.cluster import ClusterState
from stockade.model.policy import Policy


def fast_open_namespaces(state: ClusterState, policies: Iterable[Policy]) -> frozenset[str]:
    """The namespaces of `state` in which no policy of `policies` can select a pod."""
    every = tuple(policies)
    closed = {p.namespace for p in every if not p.kind.cluster_scoped}
    selectors = [p.subject for p in every if p.kind.cluster_scoped]
    out = set()
    for name, namespace in state.namespaces.items():
        if name in closed:
            continue
        if any(
            (s.namespace == name)
            if s.namespace is not None
            else s.namespace_selector is not None and s.namespace_selector.matches(namespace.labels)
            for s in selectors
        ):
            continue
        out.add(name)
    return frozenset(out)
