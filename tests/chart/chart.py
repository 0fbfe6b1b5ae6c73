"""Helpers for the chart tests: run the pinned helm, render the chart, read its RBAC rules.

Used by tests/chart/test_*.py. Rendering goes through `helm template` with an explicit
Kubernetes version (the sandbox's), so what the tests read is what `helm install` would send.
"""

from __future__ import annotations

import copy
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from stockade.sandbox.toolchain import HELM, KUBERNETES_VERSION, ensure
from tests.chart.access import Access, Scope
from tests.paths import ROOT

CHART = ROOT / "charts" / "stockade"
RELEASE = "stockade"
NAMESPACE = "stockade-system"

# Whether each resource the chart's rules name is namespaced (what decides a rule's scope).
NAMESPACED = {
    ("", "pods"): True,
    ("", "events"): True,
    ("", "namespaces"): False,
    ("", "nodes"): False,
    ("", "services"): True,
    ("networking.k8s.io", "servicecidrs"): False,
    ("discovery.k8s.io", "endpointslices"): True,
    ("stockade.io", "networkpolicies"): True,
    ("stockade.io", "clusternetworkpolicies"): False,
    ("stockade.io", "datapathtables"): False,
    ("networking.k8s.io", "networkpolicies"): True,
    ("policy.networking.k8s.io", "clusternetworkpolicies"): False,
    ("apiextensions.k8s.io", "customresourcedefinitions"): False,
    ("coordination.k8s.io", "leases"): True,
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ensure((HELM,))
    proc = subprocess.run(
        [str(HELM.path("helm")), *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def default_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` deep-merged over `base`, as helm merges a values file over the defaults."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_file(values: Mapping[str, Any], directory: Path) -> Path:
    path = directory / "values.yaml"
    path.write_text(yaml.safe_dump(dict(values)))
    return path


def template(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    check: bool = True,
    extra: Iterable[str] = (),
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="stockade-chart-") as tmp:
        args = ["template", release, str(CHART), "--namespace", namespace]
        args += ["--kube-version", KUBERNETES_VERSION.lstrip("v"), *extra]
        if values is not None:
            args += ["--values", str(values_file(values, Path(tmp)))]
        return helm(*args, check=check)


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The chart's objects (templates only; CRDs with `extra=["--include-crds"]`)."""
    text = template(values, release=release, namespace=namespace, extra=extra).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(objects: Iterable[Mapping[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return dict(obj)
    raise AssertionError(f"no {kind} {name} in the rendered chart")


def kinds(objects: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)


def roles_of(objects: Iterable[Mapping[str, Any]], subject: str) -> list[dict[str, Any]]:
    """The Roles and ClusterRoles bound to ServiceAccount `subject`."""
    bound: set[tuple[str, str]] = set()
    objects = list(objects)
    for obj in objects:
        if obj["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if any(s["kind"] == "ServiceAccount" and s["name"] == subject for s in obj["subjects"]):
            bound.add((obj["roleRef"]["kind"], obj["roleRef"]["name"]))
    return [o for o in objects if (o["kind"], o["metadata"]["name"]) in bound]


def expand(role: Mapping[str, Any]) -> set[Access]:
    """Every (verb, group, resource, subresource, scope, name) one role's rules grant."""
    granted: set[Access] = set()
    for rule in role.get("rules", []):
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                base, _, sub = resource.partition("/")
                namespaced = NAMESPACED[(group, base)]
                if role["kind"] == "Role":
                    scope = Scope.RELEASE_NAMESPACE
                else:
                    scope = Scope.ALL_NAMESPACES if namespaced else Scope.CLUSTER
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        granted.add(Access(verb, group, base, sub, scope, name))
    return granted


def without_feature(accesses: Iterable[Access]) -> set[Access]:
    return {Access(a.verb, a.group, a.resource, a.subresource, a.scope, a.name) for a in accesses}
