"""Attach stockade's programs to an interface, replace them atomically, detach them.

The agent calls `attach()` for each hook of a pod's host-side veth (inside the node's network
namespace, see `stockade.datapath.netns`), and `detach()` when the pod goes away.

- tcx (kernel >= 6.6): a BPF link created with the raw BPF_LINK_CREATE syscall (Debian's libbpf
  1.1 has no tcx helpers), placed at the head of the interface's tcx chain so it runs before
  the CNI's programs, and pinned so that it outlives the agent. A later attach with the same pin
  swaps the program with BPF_LINK_UPDATE: one pointer exchange, no window without a program.
- legacy (fallback): a clsact qdisc and a direct-action cls_bpf filter with stockade's own
  priority and handle; a replace of that filter swaps the program atomically too.

stockade only ever deletes its own link or its own (priority, handle) filter: never another
filter, never the clsact qdisc, which others may share. Programs return -1 on allow
(TCX_NEXT / TC_ACT_UNSPEC) so that whatever comes after them still runs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stockade.datapath import libbpf

BPF_F_BEFORE = 1 << 3
BPF_F_REPLACE = 1 << 2
ETH_P_ALL = 0x0003
LEGACY_PRIO = 1  # before filters added without an explicit priority (they get 49152)
LEGACY_HANDLE = 0x5CADE


class AttachPoint(Enum):
    """A tc hook of an interface; on a pod's host-side veth, INGRESS sees what the pod sends."""

    INGRESS = (46, 0xFFFFFFF2)  # BPF_TCX_INGRESS, clsact ingress parent
    EGRESS = (47, 0xFFFFFFF3)  # BPF_TCX_EGRESS, clsact egress parent

    def __init__(self, tcx_attach_type: int, parent: int) -> None:
        self.tcx_attach_type = tcx_attach_type
        self.parent = parent


class Mode(Enum):
    TCX = "tcx"
    LEGACY = "legacy"


@dataclass(frozen=True)
class Attachment:
    ifindex: int
    point: AttachPoint
    mode: Mode
    pin: Path | None = None  # tcx: the pinned link
    prio: int = LEGACY_PRIO  # legacy: the filter's priority and handle
    handle: int = LEGACY_HANDLE


# --- tcx ---------------------------------------------------------------------------------------


def _link_create(prog_fd: int, ifindex: int, point: AttachPoint) -> int:
    attr = bytearray(64)
    # link_create: prog_fd, target_ifindex, attach_type, flags; tcx: relative_fd, revision
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, point.tcx_attach_type, BPF_F_BEFORE)
    return libbpf.sys_bpf(libbpf.BPF_LINK_CREATE, attr)


def _link_update(link_fd: int, prog_fd: int) -> None:
    attr = bytearray(16)
    struct.pack_into("=IIII", attr, 0, link_fd, prog_fd, 0, 0)
    libbpf.sys_bpf(libbpf.BPF_LINK_UPDATE, attr)


def _link_detach(link_fd: int) -> None:
    attr = bytearray(8)
    struct.pack_into("=I", attr, 0, link_fd)
    libbpf.sys_bpf(libbpf.BPF_LINK_DETACH, attr)


def tcx_query(ifindex: int, point: AttachPoint, max_progs: int = 64) -> list[int]:
    """Program ids on the interface's tcx hook, in the order they run."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = bytearray(72)
    struct.pack_into("=II", attr, 0, ifindex, point.tcx_attach_type)
    struct.pack_into("=QI", attr, 16, ctypes.addressof(ids), max_progs)
    libbpf.sys_bpf(libbpf.BPF_PROG_QUERY, attr)
    (count,) = struct.unpack_from("=I", attr, 24)
    return list(ids[:count])


def attach_tcx(ifindex: int, point: AttachPoint, prog_fd: int, pin: Path) -> Attachment:
    """Create (or, when `pin` holds a live link for this hook, atomically update) the link."""
    if pin.exists():
        fd = libbpf.obj_get(pin)
        try:
            info = libbpf.link_info(fd)
            if info.ifindex == ifindex and info.attach_type == point.tcx_attach_type:
                _link_update(fd, prog_fd)
                return Attachment(ifindex, point, Mode.TCX, pin)
        finally:
            os.close(fd)
        pin.unlink()  # a link of an interface that is gone (or another hook): not ours to keep
    pin.parent.mkdir(parents=True, exist_ok=True)
    fd = _link_create(prog_fd, ifindex, point)
    try:
        libbpf.obj_pin(fd, pin)
    finally:
        os.close(fd)
    return Attachment(ifindex, point, Mode.TCX, pin)


def detach_tcx(pin: Path) -> bool:
    """Detach and unpin the link at `pin`; False when there was none."""
    if not pin.exists():
        return False
    fd = libbpf.obj_get(pin)
    try:
        _link_detach(fd)
    except libbpf.BpfError as exc:
        if exc.errno not in (errno.ENOLINK, errno.EINVAL):
            raise
    finally:
        os.close(fd)
    pin.unlink()
    return True


# --- netfilter (Service flows after DNAT, bpf/service.h) ----------------------------------------

NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
BPF_PROG_LOAD = 5
BPF_LINK_TYPE_NETFILTER = 10


class NetfilterHook(Enum):
    """Where the Service programs run in the node's namespace: (hooknum, priority)."""

    # after kube-proxy's DNAT (NF_IP_PRI_NAT_DST, -100), before its SNAT (NF_IP_PRI_NAT_SRC, 100)
    POST_ROUTING = (4, 95)
    # backends in the node's own namespace (host network, IPVS), after LOCAL_IN's SNAT (100)
    LOCAL_IN = (1, 101)
    # after kube-proxy's SNAT: where a masqueraded flow's tuple is known (bpf/service.c.j2)
    POST_ROUTING_NAT = (4, 101)

    def __init__(self, hooknum: int, priority: int) -> None:
        self.hooknum = hooknum
        self.priority = priority


NETFILTER_POINTS = tuple(
    (pf, hook) for pf in (NFPROTO_IPV4, NFPROTO_IPV6) for hook in NetfilterHook
)


def _nf_link_create(prog_fd: int, pf: int, hook: NetfilterHook) -> int:
    """A netfilter link in the calling thread's network namespace."""
    attr = bytearray(64)
    # link_create: prog_fd, target_fd (0), attach_type, flags; netfilter: pf, hooknum,
    # priority, flags
    struct.pack_into("=IIII", attr, 0, prog_fd, 0, libbpf.BPF_NETFILTER, 0)
    struct.pack_into("=IIiI", attr, 16, pf, hook.hooknum, hook.priority, 0)
    return libbpf.sys_bpf(libbpf.BPF_LINK_CREATE, attr)


def netfilter_pin(pin_dir: Path, pf: int, hook: NetfilterHook) -> Path:
    family = "ip" if pf == NFPROTO_IPV4 else "ip6"
    return pin_dir / f"nf-{family}-{hook.name.lower().replace('_', '-')}"


def attach_netfilter(
    programs: Mapping[NetfilterHook, int], pin_dir: Path, ipv6: bool = True
) -> list[Path]:
    """Link each hook's program (`programs`: hook -> program fd) at that hook of both families
    in the calling thread's namespace (IPv6 only with `ipv6`), pinned under `pin_dir`.
    Netfilter links cannot swap their program: a pinned one is replaced by a new link created
    first, so no packet goes unjudged (a packet the old and the new program both see is judged
    once: the first consumes its deferral)."""
    pin_dir.mkdir(parents=True, exist_ok=True)
    pins = []
    for pf, hook in NETFILTER_POINTS:
        if (pf == NFPROTO_IPV6 and not ipv6) or hook not in programs:
            continue
        pin = netfilter_pin(pin_dir, pf, hook)
        fd = _nf_link_create(programs[hook], pf, hook)
        try:
            staged = pin.with_name(pin.name + "-new")  # bpffs refuses names with a dot
            if staged.exists():
                staged.unlink()
            libbpf.obj_pin(fd, staged)
        finally:
            os.close(fd)
        if pin.exists():
            detach_netfilter(pin)
        staged.rename(pin)
        pins.append(pin)
    return pins


def detach_netfilter(pin: Path) -> bool:
    """Detach and unpin one netfilter link; False when there was none."""
    return detach_tcx(pin)


# r0 = NF_ACCEPT; exit: the smallest netfilter program, for the probe
_ACCEPT_INSNS = bytes.fromhex("b7000000010000009500000000000000")


def netfilter_supported() -> bool:
    """Whether this kernel loads BPF_PROG_TYPE_NETFILTER programs and links them (Linux >= 6.4),
    in the calling thread's namespace: a two-instruction program is loaded and linked at
    LOCAL_IN for a moment. Older kernels refuse the program type or the link (EINVAL)."""
    insns = ctypes.create_string_buffer(_ACCEPT_INSNS, len(_ACCEPT_INSNS))
    license = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(128)
    # prog_load: prog_type, insn_cnt, insns, license; expected_attach_type at 68
    struct.pack_into(
        "=IIQQ",
        attr,
        0,
        libbpf.BPF_PROG_TYPE_NETFILTER,
        len(_ACCEPT_INSNS) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license),
    )
    struct.pack_into("=I", attr, 68, libbpf.BPF_NETFILTER)
    try:
        prog_fd = libbpf.sys_bpf(BPF_PROG_LOAD, attr)
    except libbpf.BpfError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    try:
        os.close(_nf_link_create(prog_fd, NFPROTO_IPV4, NetfilterHook.LOCAL_IN))
    except libbpf.BpfError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        # A restarted agent finds its predecessor's pinned link at this hook and priority, and
        # the kernel keeps one link per priority: the kernel has netfilter links.
        if exc.errno == errno.EBUSY:
            return True
        raise
    finally:
        os.close(prog_fd)
    return True


# --- legacy clsact + cls_bpf ---------------------------------------------------------------------


def _ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def attach_legacy(
    ifindex: int,
    point: AttachPoint,
    prog_fd: int,
    name: str,
    prio: int = LEGACY_PRIO,
    handle: int = LEGACY_HANDLE,
) -> Attachment:
    """Add or atomically replace stockade's own direct-action filter."""
    with IPRoute() as ipr:
        _ensure_clsact(ipr, ifindex)
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            handle,
            fd=prog_fd,
            name=name,
            parent=point.parent,
            prio=prio,
            protocol=ETH_P_ALL,
            direct_action=True,
        )
    return Attachment(ifindex, point, Mode.LEGACY, None, prio, handle)


def detach_legacy(
    ifindex: int, point: AttachPoint, prio: int = LEGACY_PRIO, handle: int = LEGACY_HANDLE
) -> bool:
    """Delete stockade's own filter only; False when it was not there."""
    with IPRoute() as ipr:
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                ifindex,
                handle,
                parent=point.parent,
                prio=prio,
                protocol=ETH_P_ALL,
            )
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL):
                return False
            raise
    return True


@dataclass(frozen=True)
class Filter:
    prio: int
    handle: int
    kind: str
    name: str  # cls_bpf: the program name the filter was created with


def legacy_filters(ifindex: int, point: AttachPoint) -> list[Filter]:
    """Every classifier on the hook (stockade's and others'), for inspection."""
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_filters(index=ifindex, parent=point.parent):
            options = msg.get_attr("TCA_OPTIONS")
            if not options or not msg["handle"]:
                continue  # the per-priority chain head, not a filter
            name = options.get_attr("TCA_BPF_NAME") if msg.get_attr("TCA_KIND") == "bpf" else ""
            out.append(
                Filter(msg["info"] >> 16, msg["handle"], msg.get_attr("TCA_KIND"), name or "")
            )
    return out


# --- either ------------------------------------------------------------------------------------


def attach(
    ifindex: int,
    point: AttachPoint,
    prog_fd: int,
    pin: Path,
    name: str,
    mode: Mode | None = None,
) -> Attachment:
    """tcx when the kernel has it (or `mode` says so), else the legacy filter."""
    if mode is Mode.LEGACY:
        return attach_legacy(ifindex, point, prog_fd, name)
    try:
        return attach_tcx(ifindex, point, prog_fd, pin)
    except libbpf.BpfError as exc:
        if mode is Mode.TCX or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    return attach_legacy(ifindex, point, prog_fd, name)


def detach(attachment: Attachment) -> bool:
    if attachment.mode is Mode.TCX:
        assert attachment.pin is not None
        return detach_tcx(attachment.pin)
    return detach_legacy(attachment.ifindex, attachment.point, attachment.prio, attachment.handle)
