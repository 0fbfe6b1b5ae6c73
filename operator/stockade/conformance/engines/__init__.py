"""The engines the conformance runner can drive, by name.

Each entry maps an engine name to a factory that takes the runner's engine options. Factories
import their engine lazily, so that naming the reference engine never loads the kernel- or
cluster-facing code of the others. Engines written later register here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stockade.conformance.engine import Engine


@dataclass(frozen=True)
class EngineOptions:
    ip_family: int = 4
    via: str = "pod"  # e2e: probe pods at their address, a ClusterIP ("service") or a node port


def _reference(options: EngineOptions) -> Engine:
    from stockade.conformance.engines.reference import ReferenceEngine

    return ReferenceEngine(ip_family=options.ip_family)


def _datapath(options: EngineOptions) -> Engine:
    from stockade.conformance.engines.datapath import DatapathEngine

    return DatapathEngine(ip_family=options.ip_family)


def _cluster(options: EngineOptions) -> Engine:
    from stockade.conformance.engines.cluster import from_options

    return from_options(options.ip_family)


def _e2e(options: EngineOptions) -> Engine:
    from stockade.conformance.engines.e2e import from_options

    return from_options(options.ip_family, options.via)


def _explain(options: EngineOptions) -> Engine:
    from stockade.conformance.engines.explain import engine_from_options

    return engine_from_options(options.ip_family)


ENGINES: Mapping[str, Callable[[EngineOptions], Engine]] = {
    "reference": _reference,
    "cluster": _cluster,
    "datapath": _datapath,
    "e2e": _e2e,
    "explain": _explain,
}


def create_engine(name: str, options: EngineOptions | None = None) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](options or EngineOptions())
