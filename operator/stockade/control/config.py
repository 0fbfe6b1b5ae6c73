"""The operator's settings, validated at once (every error reported, not the first)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from stockade.handoff import INLINE_ENTRIES, SHARD_ENTRIES
from stockade.runtime import DEFAULT_BIND_ADDRESS, bind_address_error

LOWERING_MODES = ("process", "thread")  # `stockade.control.worker`


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None = None  # None: in-cluster service account, else ~/.kube/config
    namespace: str | None = None  # watch scope for namespaced objects; None: cluster-wide
    leader_election: bool = True
    identity: str = ""  # lease holder identity; "" means <hostname>-<pid>
    metrics_port: int | None = None
    health_port: int | None = None  # /healthz and /readyz
    bind_address: str = DEFAULT_BIND_ADDRESS  # of the metrics and probe server
    upstream_cnp: bool = True  # watch policy.networking.k8s.io ClusterNetworkPolicy
    lease_namespace: str = "kube-system"
    lease_name: str = "stockade-operator"
    lease_duration: float = 15.0
    renew_period: float = 2.0
    # Reconcile rate limits (`stockade.runtime.runner`): a request after a quiet period runs at
    # once; in a burst, lowering passes start at least `min_interval` apart and a request that has
    # to wait also waits `debounce` after it arrived, so that the rest of the burst joins it.
    debounce: float = 0.02
    min_interval: float = 0.1
    # A node whose tables have at most this many entries gets them inside its program object
    # (one write per change); 0 shards every node (`stockade.handoff.codec`).
    inline_entries: int = INLINE_ENTRIES
    # Hand every node the Service address space (ServiceCIDRs, else `service_cidrs`; Services'
    # cluster, external and load-balancer IPs; node addresses on the NodePort range) and a Shape
    # with services, so that flows to Services are judged on their backends (docs/services.md).
    service_space: bool = True
    service_cidrs: tuple[str, ...] = ()
    node_port_range: tuple[int, int] = (30000, 32767)
    # Where the lowering runs (`stockade.control.worker`): "process", a worker process fed the
    # Store's changes, so that kopf's intake never waits for a lowering; "thread", the same
    # lowering in the reconcile thread (for debugging).
    lowering: str = "process"

    def __post_init__(self) -> None:
        errors = []
        if self.kubeconfig is not None and not os.path.exists(self.kubeconfig):
            errors.append(f"--kubeconfig: {self.kubeconfig} does not exist")
        for flag, port in (
            ("--metrics-port", self.metrics_port),
            ("--health-port", self.health_port),
        ):
            if port is not None and not 0 <= port < 65536:
                errors.append(f"{flag}: {port} is not a port number")
        if (problem := bind_address_error(self.bind_address)) is not None:
            errors.append(problem)
        if self.lease_duration <= 0 or self.renew_period <= 0:
            errors.append("--lease-duration and --renew-period must be positive")
        elif self.renew_period * 2 > self.lease_duration:
            errors.append("--renew-period must be at most half of --lease-duration")
        if self.debounce < 0 or self.min_interval < 0:
            errors.append("debounce and min_interval must not be negative")
        if not 0 <= self.inline_entries <= SHARD_ENTRIES:
            errors.append(f"inline_entries must be between 0 and {SHARD_ENTRIES}")
        for cidr in self.service_cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                errors.append(f"--service-cidrs: {cidr!r} is not a network")
        if self.lowering not in LOWERING_MODES:
            errors.append(
                f"--lowering: {self.lowering!r} is not one of {', '.join(LOWERING_MODES)}"
            )
        low, high = self.node_port_range
        if not 1 <= low <= high <= 65535:
            errors.append(f"--node-port-range: {low}-{high} is not a port range")
        if errors:
            raise ValueError("; ".join(errors))
        if not self.identity:
            object.__setattr__(self, "identity", f"{socket.gethostname()}-{os.getpid()}")
