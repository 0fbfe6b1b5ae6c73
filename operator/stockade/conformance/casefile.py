"""Conformance case files (shared/conformance/FORMAT.md) loaded into typed values.

The runner (`stockade.conformance.runner`) and every engine read cases through these types and
never touch the raw YAML. Both layouts are accepted: full-matrix `denied` probes with per-case
`server_ports`, and `checks` probes with a fixed model whose pods list what they `serve`.
A malformed file raises `CaseFileError` naming the field.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from stockade.model.policy import Protocol

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CaseFileError(ValueError):
    """A case file that does not follow the format; the message names the field."""


class Expect(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


@dataclass(frozen=True)
class Serve:
    port: int
    protocol: Protocol
    name: str | None = None  # the container port name, when declared


@dataclass(frozen=True)
class PodModel:
    namespace: str
    name: str
    labels: Mapping[str, str]
    host_network: bool = False
    node: str | None = None  # None: the engine places the pod
    serves: tuple[Serve, ...] | None = None  # None: what the case's server_ports say

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeModel:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Topology:
    namespaces: Mapping[str, Mapping[str, str]]  # name -> labels
    pods: tuple[PodModel, ...]
    nodes: tuple[NodeModel, ...] = ()  # empty: the engine chooses its nodes


@dataclass(frozen=True)
class Check:
    """One connection to judge. `port` is None for ICMP (an echo request)."""

    src: str
    dst: str
    protocol: Protocol
    port: int | None
    expect: Expect

    def __str__(self) -> str:
        what = self.protocol.value if self.port is None else f"{self.protocol.value}/{self.port}"
        return f"{self.src} -> {self.dst} {what}"


@dataclass(frozen=True)
class CreatePolicy:
    obj: Mapping[str, Any]


@dataclass(frozen=True)
class UpdatePolicy:
    obj: Mapping[str, Any]


@dataclass(frozen=True)
class DeletePolicy:
    api_version: str
    kind: str
    namespace: str  # "" for cluster-scoped kinds
    name: str


@dataclass(frozen=True)
class AddPodLabels:
    pod: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class AddNamespaceLabels:
    namespace: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class DeleteAllPolicies:
    namespaces: tuple[str, ...]


Action = (
    CreatePolicy
    | UpdatePolicy
    | DeletePolicy
    | AddPodLabels
    | AddNamespaceLabels
    | DeleteAllPolicies
)


@dataclass(frozen=True)
class Step:
    number: int
    actions: tuple[Action, ...]
    checks: tuple[Check, ...]
    description: str = ""


@dataclass(frozen=True)
class Case:
    id: str
    name: str
    steps: tuple[Step, ...]
    profile: str = "standard"
    tags: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    server_ports: tuple[int, ...] = ()
    server_protocols: tuple[Protocol, ...] = ()

    def serves(self, pod: PodModel) -> tuple[Serve, ...]:
        """What `pod` serves in this case: the model's list, else every server port and protocol
        named `serve-<port>-<proto>`."""
        if pod.serves is not None:
            return pod.serves
        return tuple(
            Serve(port, proto, f"serve-{port}-{proto.value.lower()}")
            for port, proto in itertools.product(self.server_ports, self.server_protocols)
        )


@dataclass(frozen=True)
class CaseFile:
    path: str
    topology: Topology
    cases: tuple[Case, ...]


def load_case_file(path: str | Path) -> CaseFile:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.load(handle, Loader=_LOADER)  # a safe loader, in C when available
    except (OSError, yaml.YAMLError) as exc:
        raise CaseFileError(f"{path}: cannot read: {exc}") from exc
    return parse_case_file(raw, str(path))


def parse_case_file(raw: object, path: str = "<case file>") -> CaseFile:
    top = _map(raw, "")
    topology = _topology(_map(top.get("model"), "model"))
    cases = tuple(
        _case(item, f"cases[{i}]", topology)
        for i, item in enumerate(_list(top.get("cases"), "cases"))
    )
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise CaseFileError(f"cases: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return CaseFile(path, topology, cases)


def _topology(model: Mapping[str, Any]) -> Topology:
    namespaces = {
        name: _labels(_map(body, f"model.namespaces.{name}").get("labels"), name)
        for name, body in _map(model.get("namespaces"), "model.namespaces").items()
    }
    pods: list[PodModel] = []
    for key, body in _map(model.get("pods"), "model.pods").items():
        where = f"model.pods.{key}"
        ns, sep, name = str(key).partition("/")
        if not sep or ns not in namespaces or not name:
            raise CaseFileError(f"{where}: pods are keyed <namespace>/<name> of a model namespace")
        spec = _map(body, where)
        serves = None
        if "serves" in spec:
            serves = tuple(
                _serve(s, f"{where}.serves[{i}]")
                for i, s in enumerate(_list(spec["serves"], where))
            )
        node = spec.get("node")
        pods.append(
            PodModel(
                ns,
                name,
                _labels(spec.get("labels"), f"{where}.labels"),
                bool(spec.get("host_network", False)),
                str(node) if node is not None else None,
                serves,
            )
        )
    nodes = tuple(
        NodeModel(str(name), _labels(_map(body, f"model.nodes.{name}").get("labels"), name))
        for name, body in _map(model.get("nodes", {}), "model.nodes").items()
    )
    for pod in pods:
        if pod.host_network and pod.node is None:
            raise CaseFileError(f"model.pods.{pod.key}: a host-network pod needs a node")
        if pod.node is not None and nodes and pod.node not in {n.name for n in nodes}:
            raise CaseFileError(f"model.pods.{pod.key}.node: unknown node {pod.node!r}")
    return Topology(namespaces, tuple(pods), nodes)


def _case(raw: object, where: str, topology: Topology) -> Case:
    body = _map(raw, where)
    case_id = _str(body.get("id"), f"{where}.id")
    steps = tuple(
        _step(s, f"{where}.steps[{i}]", topology, i + 1)
        for i, s in enumerate(_list(body.get("steps"), f"{where}.steps"))
    )
    return Case(
        id=case_id,
        name=str(body.get("name", case_id)),
        steps=steps,
        profile=str(body.get("profile", "standard")),
        tags=tuple(str(t) for t in body.get("tags") or ()),
        features=tuple(str(f) for f in body.get("features") or ()),
        server_ports=tuple(
            _port(p, f"{where}.server_ports[{i}]")
            for i, p in enumerate(body.get("server_ports") or ())
        ),
        server_protocols=tuple(
            _protocol(p, f"{where}.server_protocols[{i}]")
            for i, p in enumerate(body.get("server_protocols") or ())
        ),
    )


def _step(raw: object, where: str, topology: Topology, default_number: int) -> Step:
    body = _map(raw, where)
    actions = tuple(
        _action(a, f"{where}.actions[{i}]")
        for i, a in enumerate(_list(body.get("actions", []), f"{where}.actions"))
    )
    checks: list[Check] = []
    for i, probe in enumerate(_list(body.get("probes", []), f"{where}.probes")):
        checks.extend(_probe(probe, f"{where}.probes[{i}]", topology))
    number = body.get("step", default_number)
    return Step(
        number if isinstance(number, int) else default_number,
        actions,
        tuple(checks),
        str(body.get("description", "")),
    )


def _probe(raw: object, where: str, topology: Topology) -> list[Check]:
    body = _map(raw, where)
    pod_keys = [p.key for p in topology.pods]
    if "checks" in body:
        return [
            _check(c, f"{where}.checks[{i}]", pod_keys)
            for i, c in enumerate(_list(body["checks"], where))
        ]
    protocol = _protocol(body.get("protocol"), f"{where}.protocol")
    port = None if not protocol.has_ports else _port(body.get("port"), f"{where}.port")
    denied: set[tuple[str, str]] = set()
    for i, pair in enumerate(_list(body.get("denied"), f"{where}.denied")):
        items = _list(pair, f"{where}.denied[{i}]")
        if len(items) != 2 or any(p not in pod_keys for p in items):
            raise CaseFileError(f"{where}.denied[{i}]: must be [from, to] of model pods")
        denied.add((str(items[0]), str(items[1])))
    # "probe every ordered pair (from, to) of distinct model pods"
    return [
        Check(a, b, protocol, port, Expect.DENIED if (a, b) in denied else Expect.ALLOWED)
        for a in pod_keys
        for b in pod_keys
        if a != b
    ]


def _check(raw: object, where: str, pod_keys: list[str]) -> Check:
    body = _map(raw, where)
    src, dst = _str(body.get("from"), f"{where}.from"), _str(body.get("to"), f"{where}.to")
    for key, value in (("from", src), ("to", dst)):
        if value not in pod_keys:
            raise CaseFileError(f"{where}.{key}: {value!r} is not a model pod")
    protocol = _protocol(body.get("protocol"), f"{where}.protocol")
    port = None if not protocol.has_ports else _port(body.get("port"), f"{where}.port")
    expect = _str(body.get("expect"), f"{where}.expect")
    if expect not in {e.value for e in Expect}:
        raise CaseFileError(f"{where}.expect: must be allowed or denied, got {expect!r}")
    return Check(src, dst, protocol, port, Expect(expect))


def _action(raw: object, where: str) -> Action:
    body = _map(raw, where)
    if len(body) != 1:
        raise CaseFileError(f"{where}: an action has exactly one key, got {sorted(body)}")
    ((verb, arg),) = body.items()
    sub = f"{where}.{verb}"
    if verb == "create_policy":
        return CreatePolicy(_map(arg, sub))
    if verb == "update_policy":
        return UpdatePolicy(_map(arg, sub))
    if verb == "delete_policy":
        ref = _map(arg, sub)
        return DeletePolicy(
            _str(ref.get("apiVersion"), f"{sub}.apiVersion"),
            _str(ref.get("kind"), f"{sub}.kind"),
            str(ref.get("namespace") or ""),
            _str(ref.get("name"), f"{sub}.name"),
        )
    if verb == "add_pod_labels":
        ref = _map(arg, sub)
        return AddPodLabels(_str(ref.get("pod"), f"{sub}.pod"), _labels(ref.get("labels"), sub))
    if verb == "add_namespace_labels":
        ref = _map(arg, sub)
        return AddNamespaceLabels(
            _str(ref.get("namespace"), f"{sub}.namespace"), _labels(ref.get("labels"), sub)
        )
    if verb == "delete_all_policies":
        return DeleteAllPolicies(tuple(_str(n, sub) for n in _list(arg, sub)))
    raise CaseFileError(f"{where}: unknown action {verb!r}")


def _serve(raw: object, where: str) -> Serve:
    body = _map(raw, where)
    name = body.get("name")
    return Serve(
        _port(body.get("port"), f"{where}.port"),
        _protocol(body.get("protocol"), f"{where}.protocol"),
        str(name) if name is not None else None,
    )


def _map(raw: object, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise CaseFileError(f"{where or 'file'}: must be a mapping")
    return raw


def _list(raw: object, where: str) -> list[Any]:
    if not isinstance(raw, list):
        raise CaseFileError(f"{where}: must be a list")
    return raw


def _str(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise CaseFileError(f"{where}: must be a non-empty string")
    return raw


def _port(raw: object, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise CaseFileError(f"{where}: must be a port number 1-65535, got {raw!r}")
    return raw


def _protocol(raw: object, where: str) -> Protocol:
    try:
        return Protocol(str(raw).upper().replace("ICMPV6", "ICMPv6"))
    except ValueError:
        raise CaseFileError(f"{where}: unknown protocol {raw!r}") from None


def _labels(raw: object, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    body = _map(raw, where)
    return {str(k): str(v) for k, v in body.items()}
