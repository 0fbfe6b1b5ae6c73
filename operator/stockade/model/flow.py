"""A flow: what the first packet of a connection tells policy (addresses, protocol, port).

Built by the conformance engines and `explain`, consumed by `stockade.model.evaluator`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from stockade.model.policy import IPAddress, Protocol


@dataclass(frozen=True)
class Flow:
    """`dst_port` for TCP/UDP/SCTP; `icmp_type`/`icmp_code` for ICMP (IPv4) and ICMPv6 (IPv6)."""

    src_ip: IPAddress
    dst_ip: IPAddress
    protocol: Protocol
    dst_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    def __post_init__(self) -> None:
        if self.src_ip.version != self.dst_ip.version:
            raise ValueError(f"flow mixes address families: {self.src_ip} -> {self.dst_ip}")
        if self.protocol.has_ports:
            if self.dst_port is None or not 0 <= self.dst_port <= 65535:
                raise ValueError(f"{self.protocol} flow needs a destination port 0-65535")
            if self.icmp_type is not None or self.icmp_code is not None:
                raise ValueError(f"{self.protocol} flow has no ICMP type or code")
            return
        expected = Protocol.ICMP if self.dst_ip.version == 4 else Protocol.ICMPV6
        if self.protocol is not expected:
            raise ValueError(f"IPv{self.dst_ip.version} flows use {expected}, not {self.protocol}")
        if self.dst_port is not None:
            raise ValueError(f"{self.protocol} flow has no port")
        for value in (self.icmp_type, self.icmp_code):
            if value is None or not 0 <= value <= 255:
                raise ValueError(f"{self.protocol} flow needs a type and a code 0-255")

    @classmethod
    def of(cls, src: str, dst: str, protocol: str | Protocol, port: int | None = None) -> Flow:
        """A TCP/UDP/SCTP flow from strings: `Flow.of("10.0.0.1", "10.0.0.2", "TCP", 80)`."""
        return cls(ipaddress.ip_address(src), ipaddress.ip_address(dst), Protocol(protocol), port)

    @classmethod
    def icmp(cls, src: str, dst: str, icmp_type: int, icmp_code: int = 0) -> Flow:
        """An ICMP (IPv4) or ICMPv6 (IPv6) flow, chosen by the address family."""
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        proto = Protocol.ICMP if d.version == 4 else Protocol.ICMPV6
        return cls(s, d, proto, None, icmp_type, icmp_code)

    def __str__(self) -> str:
        if self.protocol.has_ports:
            what = f"{self.protocol.value}/{self.dst_port}"
        else:
            what = f"{self.protocol.value} type {self.icmp_type} code {self.icmp_code}"
        return f"{self.src_ip} -> {self.dst_ip} {what}"
