"""Where the node judges Service traffic (bpf/service.h), and the netfilter links that do it.

- `resolve_mode(setting, supported)`: the agent's `--service-mode` (`auto`, `netfilter`,
  `fallback`) against what the kernel can do (`attach.netfilter_supported()`, probed once in
  the node's namespace). `netfilter`: a new flow to Service space is judged on its backend by
  the netfilter program after DNAT. `fallback`: the Shape's services switch is turned off and
  the veth judges a flow to a Service address on that address (kernels before 6.4, or forced).
- `NetfilterLinks`: the SERVICE program linked at POST_ROUTING (priority 95) and LOCAL_IN, and
  SERVICE_NAT at POST_ROUTING after SNAT (101), of both families in the node's namespace,
  pinned under `<pin root>/netfilter/`; a link that runs another program is replaced (new link
  first), the links go when the Shape has no SERVICE program.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from stockade.compiler.render import Hook
from stockade.compiler.shape import Shape
from stockade.datapath import attach, libbpf
from stockade.datapath.netns import NetnsExecutor

log = logging.getLogger(__name__)

SETTINGS = ("auto", "netfilter", "fallback")
NETFILTER, FALLBACK = "netfilter", "fallback"
NETFILTER_DIR = "netfilter"
T = TypeVar("T")


class ServiceModeError(RuntimeError):
    """`--service-mode netfilter` on a kernel without BPF netfilter links."""


def resolve_mode(setting: str, supported: bool) -> str:
    if setting not in SETTINGS:
        raise ValueError(f"--service-mode: expected one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == FALLBACK:
        return FALLBACK
    if supported:
        return NETFILTER
    if setting == NETFILTER:
        raise ServiceModeError(
            "--service-mode netfilter: this kernel cannot link BPF netfilter programs "
            "(Linux 6.4 or later needed)"
        )
    return FALLBACK


def effective_shape(shape: Shape, mode: str) -> Shape:
    """The Shape the node runs: the published one; in fallback mode its services switch
    becomes the Service fallback (the veth judges by the operator's verdicts)."""
    if mode == FALLBACK and shape.services:
        return dataclasses.replace(shape, services=False, service_fallback=True)
    return shape


# which program each netfilter hook runs
HOOK_PROGRAMS = {
    attach.NetfilterHook.POST_ROUTING: Hook.SERVICE,
    attach.NetfilterHook.LOCAL_IN: Hook.SERVICE,
    attach.NetfilterHook.POST_ROUTING_NAT: Hook.SERVICE_NAT,
}


class NetfilterLinks:
    """The SERVICE and SERVICE_NAT programs' links in the node's namespace."""

    def __init__(self, pin_root: Path, executor: NetnsExecutor | None = None) -> None:
        self.root = pin_root / NETFILTER_DIR
        self._executor = executor
        self.prog_id = 0  # the SERVICE program the links run, 0 when none
        self.attaches = 0

    def _run(self, fn: Callable[[], T]) -> T:
        return self._executor.run(fn) if self._executor is not None else fn()

    def _linked(self) -> dict[str, int]:
        """Pin name -> the program id its link runs."""
        linked = {}
        if self.root.is_dir():
            for pin in self.root.iterdir():
                fd = libbpf.obj_get(pin)
                try:
                    linked[pin.name] = libbpf.link_info(fd).prog_id
                finally:
                    os.close(fd)
        return linked

    def ensure(self, programs: Mapping[Hook, tuple[int, int]], ipv6: bool) -> bool:
        """Each hook of HOOK_PROGRAMS runs its program (`programs`: hook -> (fd, id)) in both
        families (IPv4 only without `ipv6`) and no other link is left; True when links were
        created."""
        wanted = {
            attach.netfilter_pin(self.root, pf, point).name: programs[HOOK_PROGRAMS[point]][1]
            for pf, point in attach.NETFILTER_POINTS
            if ipv6 or pf == attach.NFPROTO_IPV4
        }
        linked = self._linked()
        self.prog_id = programs[Hook.SERVICE][1]
        if linked == wanted:
            return False
        fds = {point: programs[hook][0] for point, hook in HOOK_PROGRAMS.items()}
        self._run(lambda: attach.attach_netfilter(fds, self.root, ipv6))
        for name in linked.keys() - wanted.keys():  # points no longer wanted (IPv6 gone)
            attach.detach_netfilter(self.root / name)
        self.attaches += 1
        log.info(
            "Service flows judged by programs %s at the netfilter hooks",
            ", ".join(str(programs[h][1]) for h in (Hook.SERVICE, Hook.SERVICE_NAT)),
        )
        return True

    def remove(self) -> int:
        """Detach every link; how many there were."""
        if not self.root.is_dir():
            return 0
        count = 0
        for pin in list(self.root.iterdir()):
            count += attach.detach_netfilter(pin)
        self.prog_id = 0
        return count
