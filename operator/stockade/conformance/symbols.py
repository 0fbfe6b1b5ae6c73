"""Symbolic addresses in case-file policies, resolved against an engine's real addresses.

Case files cannot know pod IPs, so policies write them symbolically (FORMAT.md `cidr_syntax`):

    podIP(ns/pod)/N            that pod's IP with prefix length N
    prefix(podIP(ns/pod),N)    the canonical network of length N that contains it
    nodeIP(node)[/N]           an address of that node (same forms as podIP)

On IPv6, `/32` written after an address means the single address (`/128`), as upstream does.
The runner calls `resolve` on every policy object before handing it to an engine.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from stockade.conformance.engine import ActionRejectedError, Addresses
from stockade.model.policy import IPAddress

_TERM = r"(podIP|nodeIP)\(\s*([^()\s]+)\s*\)"
_WITH_LEN = re.compile(rf"^{_TERM}(?:/(\d+))?$")
_PREFIX = re.compile(rf"^prefix\(\s*{_TERM}\s*,\s*(\d+)\s*\)$")


def resolve(value: Any, addresses: Addresses) -> Any:
    """A copy of `value` (any YAML value) with every symbolic string replaced."""
    if isinstance(value, str):
        return resolve_string(value, addresses)
    if isinstance(value, Mapping):
        return {k: resolve(v, addresses) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, addresses) for v in value]
    return value


def resolve_string(text: str, addresses: Addresses) -> str:
    if match := _PREFIX.match(text):
        address = _address(match.group(1), match.group(2), addresses)
        length = _length(address, int(match.group(3)), text)
        return str(ipaddress.ip_network(f"{address}/{length}", strict=False))
    if match := _WITH_LEN.match(text):
        address = _address(match.group(1), match.group(2), addresses)
        if match.group(3) is None:
            return str(address)
        return f"{address}/{_length(address, int(match.group(3)), text)}"
    return text


def _address(function: str, name: str, addresses: Addresses) -> IPAddress:
    try:
        return addresses.pod_ip(name) if function == "podIP" else addresses.node_ip(name)
    except KeyError as err:
        raise ActionRejectedError(f"cannot resolve {function}({name}): {err.args[0]}") from None


def _length(address: IPAddress, length: int, text: str) -> int:
    if address.version == 6 and length == 32:
        return 128
    if length > address.max_prefixlen:
        raise ActionRejectedError(f"{text}: prefix length {length} too long for {address}")
    return length
