"""BPF_PROG_TEST_RUN helpers: run a loaded tc program on a frame (or the netfilter program on an
IP packet) and read its verdict.

The datapath tests, the `datapath` conformance engine and the benchmarks call these
to ask the real compiled program what it does with a packet built in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from stockade.datapath import libbpf

TC_ACT_UNSPEC = -1  # also TCX_NEXT: the next program (the CNI's) decides
TC_ACT_OK = 0
TC_ACT_SHOT = 2


class TcVerdict(Enum):
    ALLOW = "allow"  # TC_ACT_UNSPEC / TCX_NEXT
    DENY = "deny"  # TC_ACT_SHOT


@dataclass(frozen=True)
class RunResult:
    verdict: TcVerdict
    retval: int
    duration_ns: int  # average per repetition, measured by the kernel


def verdict_of(retval: int) -> TcVerdict:
    if retval == TC_ACT_UNSPEC:
        return TcVerdict.ALLOW
    if retval == TC_ACT_SHOT:
        return TcVerdict.DENY
    raise ValueError(f"tc program returned {retval}; stockade only returns -1 or 2")


# The ifindex a forwarded packet arrived on, in a test run: any interface but none (0).
FORWARDED_IFINDEX = 1


def run(prog_fd: int, frame: bytes, repeat: int = 1, forwarded: bool = False) -> RunResult:
    """Run the program `repeat` times on `frame` (an Ethernet frame). `forwarded`: the frame
    arrived on an interface, else (the default) the node's own stack sent it."""
    ingress = FORWARDED_IFINDEX if forwarded else 0
    result = libbpf.prog_test_run(prog_fd, frame, repeat, ingress)
    return RunResult(verdict_of(result.retval), result.retval, result.duration_ns)


NF_DROP, NF_ACCEPT = 0, 1
NF_INET_LOCAL_IN, NF_INET_POST_ROUTING = 1, 4
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10


def run_netfilter(
    prog_fd: int, frame: bytes, hook: int = NF_INET_POST_ROUTING, repeat: int = 1
) -> RunResult:
    """Run a netfilter program on `frame` (an untagged Ethernet frame: the kernel takes the
    family from its ethertype and hands the program the IP packet) at `hook`; the verdict is
    NF_ACCEPT (ALLOW) or NF_DROP (DENY)."""
    pf = NFPROTO_IPV4 if frame[14] >> 4 == 4 else NFPROTO_IPV6
    result = libbpf.prog_test_run(prog_fd, frame, repeat, ctx=bytes([hook, pf]))
    if result.retval not in (NF_DROP, NF_ACCEPT):
        raise ValueError(f"netfilter program returned {result.retval}")
    verdict = TcVerdict.ALLOW if result.retval == NF_ACCEPT else TcVerdict.DENY
    return RunResult(verdict, result.retval, result.duration_ns)
