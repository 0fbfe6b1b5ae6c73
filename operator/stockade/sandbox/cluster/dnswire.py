"""The DNS wire format, as much of it as the sandbox's cluster DNS needs: a strict query parser and
a response encoder (RFC 1035 §4, EDNS(0) per RFC 6891).

A pod can send anything, so the parser trusts nothing: every length and offset is checked
against the message, compression pointers (never needed in a question) are refused, and the
outcome is a parsed `Query`, a `Malformed` (answer FORMERR with the query's id) or `None` (drop:
too short to carry an id, or itself a response). The encoder never produces more than the
query allows (512 bytes over UDP without EDNS, the advertised size with it, 65535 over TCP): it
keeps whole records while they fit and sets TC when one does not.

Pure and standard library only; `stockade.sandbox.cluster.dns` answers with it.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
HEADER_LEN = HEADER.size
UDP_LIMIT = 512  # without EDNS (RFC 1035 §4.2.1)
EDNS_PAYLOAD = 1232  # what we advertise and the most we send over UDP with EDNS
TCP_LIMIT = 65535
MAX_NAME = 255
MAX_LABEL = 63

QR, AA, TC, RD = 0x8000, 0x0400, 0x0200, 0x0100
OPCODE_SHIFT, OPCODE_MASK = 11, 0xF
POINTER_TO_QUESTION = 0xC000 | HEADER_LEN  # the question name always starts right after the header


class RType(enum.IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


CLASS_IN = 1
CLASS_ANY = 255


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16  # extended (EDNS): upper 8 bits go into the OPT record


@dataclass(frozen=True)
class Edns:
    payload: int
    version: int
    do_bit: bool


@dataclass(frozen=True)
class Query:
    """One well-formed question."""

    id: int
    flags: int
    labels: tuple[bytes, ...]  # as sent (case preserved), without the root label
    qtype: int
    qclass: int
    question: bytes  # the question section as sent (echoed in the response)
    edns: Edns | None

    @property
    def name(self) -> str:
        """The lower-cased name with a trailing dot; non-ASCII bytes escaped as \\DDD."""
        return "".join(_label_text(label) + "." for label in self.labels) or "."

    @property
    def opcode(self) -> int:
        return (self.flags >> OPCODE_SHIFT) & OPCODE_MASK

    def limit(self, tcp: bool) -> int:
        """The largest response this query allows."""
        if tcp:
            return TCP_LIMIT
        if self.edns is None:
            return UDP_LIMIT
        return max(UDP_LIMIT, min(self.edns.payload, EDNS_PAYLOAD))


@dataclass(frozen=True)
class Malformed:
    """A query we could read the header of but not the rest: answer FORMERR (or NOTIMP)."""

    id: int
    flags: int
    reason: str
    rcode: Rcode = Rcode.FORMERR


def _label_text(label: bytes) -> str:
    out = []
    for byte in label.lower():
        ch = chr(byte)
        if ch.isascii() and (ch.isalnum() or ch in "-_"):
            out.append(ch)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def _read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Labels of an uncompressed name at `offset` and the offset after it; ValueError if bad."""
    labels: list[bytes] = []
    total = 1
    while True:
        if offset >= len(data):
            raise ValueError("name runs past the end of the message")
        length = data[offset]
        if length & 0xC0:
            raise ValueError("compressed or extended label in a question")
        offset += 1
        if length == 0:
            return tuple(labels), offset
        total += length + 1
        if total > MAX_NAME:
            raise ValueError("name longer than 255 bytes")
        if offset + length > len(data):
            raise ValueError("label runs past the end of the message")
        labels.append(data[offset : offset + length])
        offset += length


def _read_opt(data: bytes, offset: int) -> tuple[Edns, int]:
    """The OPT pseudo-record at `offset` (the one additional record we accept)."""
    if offset >= len(data) or data[offset] != 0:
        raise ValueError("additional record is not an OPT record with the root name")
    offset += 1
    if offset + 10 > len(data):
        raise ValueError("OPT record truncated")
    rtype, payload, ttl, rdlen = struct.unpack_from("!HHIH", data, offset)
    if rtype != RType.OPT:
        raise ValueError(f"additional record of type {rtype} is not OPT")
    offset += 10
    if offset + rdlen > len(data):
        raise ValueError("OPT data runs past the end of the message")
    offset += rdlen
    return Edns(payload=payload, version=(ttl >> 16) & 0xFF, do_bit=bool(ttl & 0x8000)), offset


def parse_query(data: bytes) -> Query | Malformed | None:
    """Parse one query message. Never raises."""
    if len(data) < HEADER_LEN:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        return None  # a response: answering it could start a loop
    if (flags >> OPCODE_SHIFT) & OPCODE_MASK != 0:
        return Malformed(qid, flags, "only standard queries (opcode 0)", Rcode.NOTIMP)
    if qdcount != 1:
        return Malformed(qid, flags, f"{qdcount} questions (exactly one is supported)")
    if ancount or nscount or arcount > 1:
        return Malformed(qid, flags, "a query carries no answers/authority, at most one OPT")
    try:
        labels, offset = _read_name(data, HEADER_LEN)
        if offset + 4 > len(data):
            raise ValueError("question truncated")
        qtype, qclass = struct.unpack_from("!HH", data, offset)
        offset += 4
        question = data[HEADER_LEN:offset]
        edns = None
        if arcount:
            edns, offset = _read_opt(data, offset)
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes after the last record")
    except ValueError as exc:
        return Malformed(qid, flags, str(exc))
    return Query(qid, flags, labels, qtype, qclass, question, edns)


# -- responses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One answer or authority record; `owner` None means the question's name (a pointer)."""

    rtype: int
    ttl: int
    rdata: bytes
    owner: bytes | None = None


def encode_name(name: str) -> bytes:
    """Wire form of a dotted ASCII name ("a.b." or "a.b"); ValueError if it is not valid."""
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= MAX_LABEL:
            raise ValueError(f"label {label!r} of {name!r} must be 1..63 bytes")
        out += bytes([len(raw)]) + raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name {name!r} is longer than 255 bytes")
    return bytes(out)


def a_record(ip: str, ttl: int) -> Record:
    return Record(RType.A, ttl, ipaddress.IPv4Address(ip).packed)


def aaaa_record(ip: str, ttl: int) -> Record:
    return Record(RType.AAAA, ttl, ipaddress.IPv6Address(ip).packed)


def srv_record(port: int, target: bytes, ttl: int) -> Record:
    """Priority 0, weight 100, `port`, `target` (an encoded name, never compressed: RFC 2782)."""
    return Record(RType.SRV, ttl, struct.pack("!HHH", 0, 100, port) + target)


def soa_record(zone: str, ttl: int, serial: int) -> Record:
    """The zone's SOA, for the authority section of negative answers (RFC 2308)."""
    rdata = (
        encode_name(f"ns.dns.{zone}")
        + encode_name(f"hostmaster.{zone}")
        + struct.pack("!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, ttl)
    )
    return Record(RType.SOA, ttl, rdata, owner=encode_name(zone))


def _record_bytes(record: Record) -> bytes:
    owner = record.owner if record.owner is not None else struct.pack("!H", POINTER_TO_QUESTION)
    return (
        owner
        + struct.pack("!HHIH", record.rtype, CLASS_IN, record.ttl, len(record.rdata))
        + (record.rdata)
    )


def _opt_bytes(rcode: int) -> bytes:
    ttl = ((rcode >> 4) & 0xFF) << 24  # extended rcode, version 0, no flags
    return b"\x00" + struct.pack("!HHIH", RType.OPT, EDNS_PAYLOAD, ttl, 0)


def _flags(query_flags: int, rcode: int, authoritative: bool, truncated: bool) -> int:
    flags = QR | (query_flags & (OPCODE_MASK << OPCODE_SHIFT)) | (query_flags & RD) | (rcode & 0xF)
    if authoritative:
        flags |= AA
    if truncated:
        flags |= TC
    return flags


def error_response(bad: Malformed) -> bytes:
    """Header only: FORMERR/NOTIMP for a query we cannot read; always 12 bytes."""
    return HEADER.pack(bad.id, _flags(bad.flags, bad.rcode, False, False), 0, 0, 0, 0)


def response(
    query: Query,
    rcode: Rcode,
    answers: list[Record],
    authority: list[Record] | None = None,
    *,
    tcp: bool = False,
) -> bytes:
    """Encode the answer to `query` within the size it allows, setting TC if records were left
    out. A negative answer's authority (SOA) is left out first, then answers from the end."""
    limit = query.limit(tcp)
    opt = _opt_bytes(rcode) if query.edns is not None else b""
    header_rcode = rcode & 0xF
    body = bytearray(query.question)
    room = limit - HEADER_LEN - len(body) - len(opt)
    kept_answers: list[bytes] = []
    truncated = False
    for record in answers:
        raw = _record_bytes(record)
        if len(raw) > room:
            truncated = True
            break
        kept_answers.append(raw)
        room -= len(raw)
    kept_authority: list[bytes] = []
    if not truncated:
        for record in authority or []:
            raw = _record_bytes(record)
            if len(raw) > room:
                break  # the SOA of a negative answer is optional: leave it out, no TC
            kept_authority.append(raw)
            room -= len(raw)
    for raw in kept_answers + kept_authority:
        body += raw
    header = HEADER.pack(
        query.id,
        _flags(query.flags, header_rcode, True, truncated),
        1,
        len(kept_answers),
        len(kept_authority),
        1 if opt else 0,
    )
    return header + bytes(body) + opt


def badvers_response(query: Query) -> bytes:
    """EDNS version other than 0 (RFC 6891 §6.1.3): BADVERS, in the OPT record."""
    return response(query, Rcode.BADVERS, [])
