"""Attribution read back from the datapath: drop and audit events, per-rule counters.

The agent's metrics and flow log call `EventReader.poll()` and `read_counters()`; rule ids are
mapped to policies with the RuleInfo table the lowering produced (that mapping is not here: the
kernel only knows numbers). The record and counter layouts are `stockade.compiler.abi`'s.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from stockade.compiler import abi
from stockade.datapath import libbpf

EventKind = abi.EventKind
DropReason = abi.DropReason


def _address(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.IPv6Address(raw)
    return addr.ipv4_mapped or addr


@dataclass(frozen=True)
class Event:
    kind: EventKind
    reason: DropReason
    rule_id: int
    endpoint_id: int
    ifindex: int
    direction: int  # ir.Direction of the hook
    protocol: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    port: int  # the policy port (destination port, or ICMP type << 8 | code)
    timestamp_ns: int

    @classmethod
    def parse(cls, raw: bytes) -> Event:
        if len(raw) < abi.EVENT.size:
            raise ValueError(f"event record of {len(raw)} bytes, expected {abi.EVENT.size}")
        ts, rule, ep, ifindex, kind, direction, proto, reason, sp, dp, port, _, sa, da = (
            abi.EVENT.unpack_from(raw)
        )
        return cls(
            kind=EventKind(kind),
            reason=DropReason(reason),
            rule_id=rule,
            endpoint_id=ep,
            ifindex=ifindex,
            direction=direction,
            protocol=proto,
            src=_address(sa),
            dst=_address(da),
            sport=int.from_bytes(sp, "big"),
            dport=int.from_bytes(dp, "big"),
            port=port,
            timestamp_ns=ts,
        )


class EventReader:
    """Reads the `events` ring buffer."""

    def __init__(self, events_map_fd: int) -> None:
        self._rb = libbpf.RingBuffer(events_map_fd)

    def poll(self, timeout_ms: int = 0) -> list[Event]:
        return [Event.parse(raw) for raw in self._rb.poll(timeout_ms)]

    def close(self) -> None:
        self._rb.close()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RuleCounter:
    packets: int
    bytes: int


def read_events_lost(events_lost_map_fd: int) -> int:
    """Events the programs could not emit because the ring buffer was full, summed over CPUs."""
    ncpus = libbpf.num_possible_cpus()
    raw = libbpf.map_lookup(events_lost_map_fd, abi.U32.pack(0), abi.U64.size * ncpus)
    if not raw:
        return 0
    return sum(abi.U64.unpack_from(raw, cpu * abi.U64.size)[0] for cpu in range(ncpus))


def read_counters(counters_map_fd: int, rule_ids: list[int]) -> dict[int, RuleCounter]:
    """Decisions per rule id, summed over CPUs."""
    ncpus = libbpf.num_possible_cpus()
    out: dict[int, RuleCounter] = {}
    for rule_id in rule_ids:
        raw = libbpf.map_lookup(
            counters_map_fd, abi.U32.pack(rule_id), abi.RULE_COUNTER.size * ncpus
        )
        packets = nbytes = 0
        if raw:
            for cpu in range(ncpus):
                p, b = abi.RULE_COUNTER.unpack_from(raw, cpu * abi.RULE_COUNTER.size)
                packets += p
                nbytes += b
        out[rule_id] = RuleCounter(packets, nbytes)
    return out
