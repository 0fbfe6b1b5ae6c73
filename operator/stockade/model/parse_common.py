"""Field parsers of the upstream ClusterNetworkPolicy parser.

Called only by `stockade.model.parse_cnp` and `stockade.model.parse`: CIDRs, port numbers,
named ports and names, each checked the way the API server's validation does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from stockade.model import fields
from stockade.model.fields import Problems
from stockade.model.policy import IPNetwork

_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def parse_cidr(value: object, path: str, problems: Problems) -> IPNetwork | None:
    """A CIDR; host bits may be set (`10.0.0.1/8` means `10.0.0.0/8`), as the API accepts."""
    text = fields.string(value, path, problems)
    if text is None:
        return None
    if "/" not in text:
        problems.add(path, f"{text!r} is not a CIDR (address/prefix length)")
        return None
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        problems.add(path, f"{text!r} is not a valid CIDR")
        return None


def parse_port_number(value: object, path: str, problems: Problems) -> int | None:
    return fields.integer(value, path, problems, 1, 65535)


def port_name_problem(name: str) -> str | None:
    """Why `name` is not a valid container port name (IANA_SVC_NAME), or None."""
    if (
        not name
        or len(name) > 15
        or not _IANA_SVC_NAME.match(name)
        or "--" in name
        or not any(c.isalpha() for c in name)
    ):
        return f"{name!r} is not a valid port name (IANA_SVC_NAME: 1-15 lowercase a-z0-9 and -)"
    return None


def parse_name(
    metadata: Mapping[str, object], path: str, problems: Problems, key: str
) -> str | None:
    raw = metadata.get(key)
    if raw is None:
        problems.add(f"{path}.{key}", "required")
        return None
    text = fields.string(raw, f"{path}.{key}", problems)
    if text is not None and not text:
        problems.add(f"{path}.{key}", "must not be empty")
        return None
    return text
