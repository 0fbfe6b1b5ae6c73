"""Upstream ClusterNetworkPolicy objects rewritten as stockade ClusterNetworkPolicy objects.

stockade's `stockade.io/v1alpha1` ClusterNetworkPolicy keeps the field names and meaning of the
upstream `policy.networking.k8s.io/v1alpha2` kind (see `stockade.model.crd_scnp`), so a user can
move a policy over by changing its apiVersion, and the upstream conformance suite holds stockade's
own kind to the same semantics once its objects are rewritten. `translate_policy` rewrites one
object; `translate_case_file` rewrites every upstream object (and every reference to one) in a
conformance case file (shared/conformance/FORMAT.md), leaving everything else as it was.

Pure: no I/O. Called by the conformance tests and by anyone converting upstream policies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from stockade.model.crd import API_VERSION as STOCKADE_API_VERSION

KIND = "ClusterNetworkPolicy"
UPSTREAM_API_VERSION = "policy.networking.k8s.io/v1alpha2"
# v1beta1 has the same schema as v1alpha2 (network-policy-api v0.3.0), so it translates alike.
UPSTREAM_API_VERSIONS = (UPSTREAM_API_VERSION, "policy.networking.k8s.io/v1beta1")

# Set by the API server; meaningless (or wrong) on a new object of another kind.
_SERVER_METADATA = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    }
)
# It records the upstream object and would make `kubectl apply` diff against the wrong kind.
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_SPEC_FIELDS = ("tier", "priority", "subject", "ingress", "egress")
# Upstream egress peers that stockade does not enforce: refused rather than silently dropped.
_UNSUPPORTED_EGRESS_PEERS = {
    "domainNames": "stockade has no domain-name peers (upstream's experimental domainNames)",
}
_POLICY_ACTIONS = ("create_policy", "update_policy")


class TranslationError(ValueError):
    """An object that has no stockade equivalent; the message names the field."""


def is_upstream_cnp(obj: object) -> bool:
    """Whether `obj` is an upstream ClusterNetworkPolicy object (any served version)."""
    return (
        isinstance(obj, Mapping)
        and obj.get("kind") == KIND
        and obj.get("apiVersion") in UPSTREAM_API_VERSIONS
    )


def translate_policy(obj: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The `stockade.io/v1alpha1` ClusterNetworkPolicy with the same meaning as the upstream
    object `obj` (a new object; `obj` is not changed). Status and server-set metadata are left
    out. Raises TranslationError, naming the field under `where`, for what stockade lacks."""
    if not is_upstream_cnp(obj):
        found = f"{obj.get('apiVersion')}/{obj.get('kind')}" if isinstance(obj, Mapping) else obj
        raise TranslationError(
            f"{_at(where, 'apiVersion')}: not an upstream ClusterNetworkPolicy "
            f"({' or '.join(f'{v}/{KIND}' for v in UPSTREAM_API_VERSIONS)}): {found}"
        )
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        raise TranslationError(f"{_at(where, 'metadata')}: must be a mapping")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise TranslationError(f"{_at(where, 'spec')}: must be a mapping")
    _check_spec(spec, _at(where, "spec"))
    return {
        "apiVersion": STOCKADE_API_VERSION,
        "kind": KIND,
        "metadata": _metadata(metadata),
        "spec": copy.deepcopy(dict(spec)),
    }


def _metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: copy.deepcopy(v) for k, v in metadata.items() if k not in _SERVER_METADATA}
    annotations = out.get("annotations")
    if isinstance(annotations, Mapping) and _LAST_APPLIED in annotations:
        kept = {k: v for k, v in annotations.items() if k != _LAST_APPLIED}
        if kept:
            out["annotations"] = kept
        else:
            del out["annotations"]
    return out


def _check_spec(spec: Mapping[str, Any], where: str) -> None:
    """Refuse upstream fields that stockade does not implement. Everything else is copied as it
    is: the field names are the same by design, and stockade validates the result itself."""
    for key in spec:
        if key not in _SPEC_FIELDS:
            raise TranslationError(f"{_at(where, key)}: not a v1alpha2 ClusterNetworkPolicy field")
    egress = spec.get("egress")
    if not isinstance(egress, list):
        return
    for i, rule in enumerate(egress):
        peers = rule.get("to") if isinstance(rule, Mapping) else None
        for j, peer in enumerate(peers if isinstance(peers, list) else ()):
            for key, why in _UNSUPPORTED_EGRESS_PEERS.items():
                if isinstance(peer, Mapping) and key in peer:
                    raise TranslationError(f"{where}.egress[{i}].to[{j}].{key}: {why}")


def translate_case_file(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a loaded case file in which every upstream ClusterNetworkPolicy in
    `create_policy` / `update_policy` is translated and every `delete_policy` naming one refers to
    the stockade kind. A top-level `translation` entry records what was done."""
    out = copy.deepcopy(dict(raw))
    translated = 0
    for where, action in _actions(out):
        for verb in _POLICY_ACTIONS:
            if is_upstream_cnp(action.get(verb)):
                action[verb] = translate_policy(action[verb], f"{where}.{verb}")
                translated += 1
        ref = action.get("delete_policy")
        if is_upstream_cnp(ref):
            ref["apiVersion"] = STOCKADE_API_VERSION
    out["translation"] = {
        "from": f"{UPSTREAM_API_VERSION} {KIND}",
        "to": f"{STOCKADE_API_VERSION} {KIND}",
        "objects": translated,
    }
    return out


def policy_objects(raw: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every object that a case file creates or updates, with where it is
    (`cases[0].steps[0].actions[0].create_policy`), in file order."""
    for where, action in _actions(raw):
        for verb in _POLICY_ACTIONS:
            obj = action.get(verb)
            if isinstance(obj, Mapping):
                yield f"{where}.{verb}", obj


def _actions(raw: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Each action mapping of a case file, with its path; malformed parts are skipped (the
    case-file loader reports them)."""
    cases = raw.get("cases")
    for c, case in enumerate(cases if isinstance(cases, list) else ()):
        steps = case.get("steps") if isinstance(case, Mapping) else None
        for s, step in enumerate(steps if isinstance(steps, list) else ()):
            actions = step.get("actions") if isinstance(step, Mapping) else None
            for a, action in enumerate(actions if isinstance(actions, list) else ()):
                if isinstance(action, dict):
                    yield f"cases[{c}].steps[{s}].actions[{a}]", action


def _at(where: str, field: str) -> str:
    return f"{where}.{field}" if where else field
