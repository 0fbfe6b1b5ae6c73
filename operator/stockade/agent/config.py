"""The agent's settings, validated at once (every error reported, not the first).

Built by `stockade.agent.command` from the command line and by tests; read by `stockade.agent.app`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from stockade.datapath.clang import DEFAULT_CACHE_DIR
from stockade.datapath.maps import DEFAULT_PIN_ROOT
from stockade.runtime import DEFAULT_BIND_ADDRESS, bind_address_error

BPFFS = Path("/sys/fs/bpf")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class AgentConfig:
    node: str
    netns: str | None = None  # a named network namespace (/run/netns/<name>) to attach in
    kubeconfig: str | None = None  # None: in-cluster service account, else ~/.kube/config
    pin_root: Path = DEFAULT_PIN_ROOT
    cache_dir: Path = DEFAULT_CACHE_DIR
    resync_seconds: float = 300.0
    metrics_port: int | None = None
    health_port: int | None = None
    bind_address: str = DEFAULT_BIND_ADDRESS  # of the metrics and probe server
    # What established connections do when policy changes (bpf/conntrack.h): "revalidate" judges
    # each flow's next packet again, "keep" lets established flows run until they expire.
    conntrack_on_policy_change: str = "revalidate"
    # Where Service traffic is judged (stockade.agent.services): "auto" probes the kernel for
    # BPF netfilter links, "netfilter" requires them, "fallback" judges at the veth.
    service_mode: str = "auto"
    min_interval: float = 0.05  # between the starts of two syncs that changed the datapath
    max_backoff: float = 30.0  # retry delay ceiling after failing syncs
    watch_timeout: int = 240  # seconds a single watch request lasts before it is renewed
    # Seconds between two recounts of the conntrack entries each endpoint holds (agent/conntrack.py)
    conntrack_recount_seconds: float = 10.0
    # The socket stockade-cni relays CNI commands to (None: no socket), how long an ADD waits for
    # the pod's tables, and what a pod whose tables missed that budget gets: "closed" (only node
    # and neighbour traffic until they arrive) or "open" (everything until they arrive).
    cni_socket: Path | None = None
    pending_budget: float = 2.0
    pending_add_wait: float = 0.0  # of the budget, what the ADD itself waits (pending.py says why)
    pending_on_timeout: str = "closed"

    def __post_init__(self) -> None:
        errors = []
        if not _DNS_SUBDOMAIN.match(self.node):
            errors.append(f"--node: {self.node!r} is not a node name")
        if self.netns is not None and not Path("/run/netns", self.netns).exists():
            errors.append(f"--netns: /run/netns/{self.netns} does not exist")
        if self.kubeconfig is not None and not os.path.exists(self.kubeconfig):
            errors.append(f"--kubeconfig: {self.kubeconfig} does not exist")
        if not self.pin_root.is_absolute() or BPFFS not in (self.pin_root, *self.pin_root.parents):
            errors.append(f"--pin-root: {self.pin_root} is not below {BPFFS}")
        elif self.pin_root == BPFFS:
            errors.append(f"--pin-root: must be a directory below {BPFFS}, not {BPFFS} itself")
        if not self.cache_dir.is_absolute():
            errors.append(f"--cache-dir: {self.cache_dir} must be an absolute path")
        if self.resync_seconds <= 0:
            errors.append(f"--resync-seconds: {self.resync_seconds} must be positive")
        for flag, port in (
            ("--metrics-port", self.metrics_port),
            ("--health-port", self.health_port),
        ):
            if port is not None and not 0 <= port < 65536:
                errors.append(f"{flag}: {port} is not a port number")
        if (problem := bind_address_error(self.bind_address)) is not None:
            errors.append(problem)
        if self.conntrack_on_policy_change not in ("revalidate", "keep"):
            errors.append(
                "--conntrack-on-policy-change: expected revalidate or keep, got "
                f"{self.conntrack_on_policy_change!r}"
            )
        if self.conntrack_recount_seconds <= 0:
            errors.append(
                f"conntrack_recount_seconds: {self.conntrack_recount_seconds} must be positive"
            )
        if self.service_mode not in ("auto", "netfilter", "fallback"):
            errors.append(
                f"--service-mode: expected auto, netfilter or fallback, got {self.service_mode!r}"
            )
        if self.cni_socket is not None and not self.cni_socket.is_absolute():
            errors.append(f"--cni-socket: {self.cni_socket} must be an absolute path")
        if not 0 <= self.pending_budget <= 60:
            errors.append(f"--pending-budget: {self.pending_budget} must be within 0..60 seconds")
        if not 0 <= self.pending_add_wait <= 60:
            errors.append(f"--pending-add-wait: {self.pending_add_wait} must be within 0..60 s")
        if self.pending_on_timeout not in ("closed", "open"):
            errors.append(
                f"--pending-on-timeout: expected closed or open, got {self.pending_on_timeout!r}"
            )
        if self.min_interval < 0 or self.max_backoff <= 0 or self.watch_timeout <= 0:
            errors.append("min_interval must not be negative; max_backoff, watch_timeout > 0")
        if errors:
            raise ValueError("; ".join(errors))
