"""Packet builders: Ethernet (optionally VLAN-tagged) + IPv4/IPv6 + TCP/UDP/SCTP/ICMP/ICMPv6,
with correct lengths and checksums (SCTP: CRC32c), in the spirit of cilium's bpf/tests/pktgen.h.
Used by the agent's traces (`stockade.agent.trace`: the probe frame of `stockade explain`), the
datapath tests, the `datapath` conformance engine and the benchmarks. Frames go to
BPF_PROG_TEST_RUN; the IP packets inside them can go to raw sockets. Pure: no kernel access.
"""

from __future__ import annotations

import ipaddress
import struct

from stockade.compiler import ir

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def addr(text: str) -> Address:
    return ipaddress.ip_address(text)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return ~crc & 0xFFFFFFFF


def _pseudo(src: Address, dst: Address, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


def _with_csum(l4: bytes, offset: int, src: Address, dst: Address, proto: int) -> bytes:
    csum = _csum(_pseudo(src, dst, proto, len(l4)) + l4)
    return l4[:offset] + struct.pack("!H", csum) + l4[offset + 2 :]


def tcp_segment(
    src: Address, dst: Address, sport: int, dport: int, flags: int = TCP_SYN, payload: bytes = b""
) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)
    return _with_csum(hdr + payload, 16, src, dst, ir.PROTO_TCP)


def udp_datagram(src: Address, dst: Address, sport: int, dport: int, payload: bytes = b"") -> bytes:
    hdr = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return _with_csum(hdr + payload, 6, src, dst, ir.PROTO_UDP)


def sctp_packet(sport: int, dport: int, vtag: int = 0) -> bytes:
    """An SCTP common header with one INIT chunk."""
    init = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234, 65535, 1, 1, 1)
    pkt = struct.pack("!HHII", sport, dport, vtag, 0) + init
    return pkt[:8] + struct.pack("<I", _crc32c(pkt)) + pkt[12:]


def icmp_message(
    src: Address,
    dst: Address,
    icmp_type: int,
    code: int,
    rest: bytes = b"\0\0\0\0",
    payload: bytes = b"",
) -> bytes:
    body = struct.pack("!BBH", icmp_type, code, 0) + rest + payload
    if src.version == 4:
        csum = _csum(body)
        return body[:2] + struct.pack("!H", csum) + body[4:]
    return _with_csum(body, 2, src, dst, ir.PROTO_ICMPV6)


def echo(src: Address, dst: Address, ident: int, seq: int = 1, reply: bool = False) -> bytes:
    kinds = {4: (8, 0), 6: (128, 129)}[src.version]
    icmp_type = kinds[1] if reply else kinds[0]
    return icmp_message(src, dst, icmp_type, 0, struct.pack("!HH", ident, seq), b"stockade")


def ipv4(
    src: Address,
    dst: Address,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    fragment_offset: int = 0,
    more_fragments: bool = False,
    options: bytes = b"",
    ident: int = 1,
) -> bytes:
    if len(options) % 4:
        raise ValueError("IPv4 options must be a multiple of 4 bytes")
    ihl = 5 + len(options) // 4
    frag = (fragment_offset // 8) | (0x2000 if more_fragments else 0)
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            4 << 4 | ihl,
            0,
            ihl * 4 + len(payload),
            ident,
            frag,
            ttl,
            proto,
            0,
            src.packed,
            dst.packed,
        )
        + options
    )
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def ipv6(
    src: Address,
    dst: Address,
    proto: int,
    payload: bytes,
    *,
    hop_limit: int = 64,
    ext: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """`ext`: extension headers as (header type, body after the next-header byte)."""
    chain = b""
    types = [t for t, _ in ext] + [proto]
    for i, (_, body) in enumerate(ext):
        chain += bytes([types[i + 1]]) + body
    first = types[0]
    hdr = struct.pack(
        "!IHBB16s16s", 6 << 28, len(chain) + len(payload), first, hop_limit, src.packed, dst.packed
    )
    return hdr + chain + payload


def hop_by_hop() -> tuple[int, bytes]:
    return (0, b"\0" + b"\x01\x04\0\0\0\0")  # hdr ext len 0, PadN


def fragment_header(offset: int = 0, more: bool = False, ident: int = 7) -> tuple[int, bytes]:
    return (44, struct.pack("!BHI", 0, (offset // 8) << 3 | int(more), ident))


def ethernet(payload: bytes, ethertype: int, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", ETH_P_8021Q, vlan) if vlan is not None else b""
    return DST_MAC + SRC_MAC + tag + struct.pack("!H", ethertype) + payload


def tagged(frame: bytes, tpids: tuple[int, ...], vid: int = 0) -> bytes:
    """`frame` with one 802.1Q/802.1ad tag per TPID inserted after the MAC addresses, outermost
    first, each carrying VLAN ID `vid`."""
    tags = b"".join(struct.pack("!HH", tpid, vid) for tpid in tpids)
    return frame[:12] + tags + frame[12:]


def ip_frame(ip_packet: bytes, vlan: int | None = None) -> bytes:
    ethertype = ETH_P_IP if ip_packet[0] >> 4 == 4 else ETH_P_IPV6
    return ethernet(ip_packet, ethertype, vlan)


def source_address(frame: bytes) -> Address | None:
    """The IP source address of an Ethernet frame (after any VLAN tags), None for another
    ethertype or a frame too short to hold one."""
    offset, ethertype = 12, None
    while len(frame) >= offset + 2:
        ethertype = struct.unpack_from("!H", frame, offset)[0]
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        offset += 4
    start = offset + 2
    if ethertype == ETH_P_IP and len(frame) >= start + 16:
        return ipaddress.IPv4Address(frame[start + 12 : start + 16])
    if ethertype == ETH_P_IPV6 and len(frame) >= start + 24:
        return ipaddress.IPv6Address(frame[start + 8 : start + 24])
    return None


def ip(src: Address, dst: Address, proto: int, l4: bytes) -> bytes:
    return ipv4(src, dst, proto, l4) if src.version == 4 else ipv6(src, dst, proto, l4)


def arp_request(sender: ipaddress.IPv4Address, target: ipaddress.IPv4Address) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, SRC_MAC, sender.packed, b"\0" * 6, target.packed
    )
    return b"\xff" * 6 + SRC_MAC + struct.pack("!H", ETH_P_ARP) + body


def icmp_error(
    src: Address, dst: Address, icmp_type: int, code: int, quoted_ip_packet: bytes
) -> bytes:
    """An ICMP(v6) error from `src` to `dst` quoting the start of `quoted_ip_packet`."""
    proto = ir.PROTO_ICMP if src.version == 4 else ir.PROTO_ICMPV6
    quoted = quoted_ip_packet[: (28 if src.version == 4 else 48) + 8]
    return ip(src, dst, proto, icmp_message(src, dst, icmp_type, code, b"\0\0\0\0", quoted))


ICMP_ERRORS = {ir.PROTO_ICMP: {3, 4, 5, 11, 12}, ir.PROTO_ICMPV6: {1, 2, 3, 4}}


def packet_frame(packet: ir.Packet, sport: int = 40000, tcp_flags: int = TCP_SYN) -> bytes:
    """The first packet of a connection that `ir.lookup` judges as `packet`."""
    src, dst, proto = packet.src, packet.dst, packet.protocol
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    if proto == ir.PROTO_TCP:
        return ip_frame(ip(src, dst, proto, tcp_segment(src, dst, sport, packet.port, tcp_flags)))
    if proto == ir.PROTO_UDP:
        return ip_frame(ip(src, dst, proto, udp_datagram(src, dst, sport, packet.port, b"x")))
    if proto == ir.PROTO_SCTP:
        return ip_frame(ip(src, dst, proto, sctp_packet(sport, packet.port)))
    if proto in (ir.PROTO_ICMP, ir.PROTO_ICMPV6):
        if (proto == ir.PROTO_ICMP) != (src.version == 4):
            raise ValueError("ICMP goes with IPv4 and ICMPv6 with IPv6")
        icmp_type, code = packet.port >> 8, packet.port & 0xFF
        if icmp_type in ICMP_ERRORS[proto]:
            quoted = ip(dst, src, ir.PROTO_UDP, udp_datagram(dst, src, 53, sport, b"q"))
            return ip_frame(icmp_error(src, dst, icmp_type, code, quoted))
        message = icmp_message(src, dst, icmp_type, code, b"\0\x07\0\x01")
        if proto == ir.PROTO_ICMPV6:
            return ip_frame(ipv6(src, dst, proto, message, hop_limit=packet.effective_hop_limit))
        return ip_frame(ip(src, dst, proto, message))
    if packet.port:
        raise ValueError(f"protocol {proto} has no ports; port must be 0")
    return ip_frame(ip(src, dst, proto, b"\0" * 16))
