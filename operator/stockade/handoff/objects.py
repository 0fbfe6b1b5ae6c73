"""The `DatapathTable` object: built here, read here, by the operator and the agent alike.

One cluster-scoped object per (node, part, shard) carries one `codec.Shard`: named
`<node>.<part>.<shard>`, labelled `stockade.io/node` and `stockade.io/part` (an agent watches only
its node), with `spec` as `stockade.model.crd_datapath.DatapathTableSpec` defines it (the CRD is
generated from that model, and `TableObject.from_api` validates against it). The agent reports on
the `status` of its node's `<node>.program.0` object (`Report`), and the operator reads the
program generation each node applied from there.

Callers: `stockade.control.plan` builds `TableObject`s, `stockade.control.publish` writes their
`body()` and reads listed objects back; `stockade.agent.watch` reads watched objects,
`stockade.handoff.assemble` checks them against the manifest, `stockade.agent.report` writes
`Report.body()`, `stockade.control.status` reads `applied_generation()`.

A program object may carry the annotation `stockade.io/changed-at` (`CHANGED_AT`): when the
operator took in the earliest change (policy, pod, namespace... event) that its generation carries,
as RFC 3339 UTC time with nanoseconds. The agent observes the time from there to its apply in
`stockade_agent_policy_apply_seconds`; an object without it (a restored object, an older
operator), or with a value that is not such a time, is applied all the same.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from stockade.handoff.codec import PROGRAM, HandoffError, Shard, digest
from stockade.model.crd import API_VERSION, DATAPATH_TABLE
from stockade.model.crd_datapath import MAX_ENTRY_LENGTH, MAX_ERRORS, DatapathTableSpec

NODE_LABEL = "stockade.io/node"
PART_LABEL = "stockade.io/part"
CHANGED_AT = "stockade.io/changed-at"
NANOS = 1_000_000_000
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)


def format_time(nanos: int) -> str:
    """Unix nanoseconds as RFC 3339 UTC time with nine fractional digits."""
    seconds, fraction = divmod(nanos, NANOS)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction:09d}Z"


def parse_time(text: object) -> int | None:
    """Unix nanoseconds of an RFC 3339 time (0 to 9 fractional digits); None if it is not one."""
    if not isinstance(text, str):
        return None
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        return None
    base, fraction, zone = match.groups()
    offset = "+00:00" if zone.upper() == "Z" else zone
    try:
        when = datetime.fromisoformat(base + offset)
    except ValueError:
        return None
    return int(when.timestamp()) * NANOS + int((fraction or "").ljust(9, "0"))


def object_name(node: str, part: str, shard: int) -> str:
    """The DatapathTable name of one shard: `<node>.<part>.<shard>`."""
    return f"{node}.{part}.{shard}"


def program_name(node: str) -> str:
    """The name of a node's program object, the one its agent reports on."""
    return object_name(node, PROGRAM, 0)


def node_selector(node: str) -> str:
    """The label selector of one node's objects."""
    return f"{NODE_LABEL}={node}"


@dataclass(frozen=True)
class TableHead:
    """What a DatapathTable says about itself, its entries aside: what the operator keeps of
    every object it published."""

    name: str
    node: str
    part: str
    shard: int
    shards: int  # how many shards the part has
    generation: int  # the operator's publish generation that last changed this shard
    digest: str  # of the entries, as the operator computed it


@dataclass(frozen=True)
class TableObject(TableHead):
    """One DatapathTable's spec (its status is the agent's report, read apart)."""

    entries: tuple[str, ...] = ()
    changed_at: int | None = None  # Unix ns, the `CHANGED_AT` annotation (program objects)

    @classmethod
    def build(
        cls,
        node: str,
        part: str,
        number: int,
        shards: int,
        generation: int,
        shard: Shard,
        changed_at: int | None = None,
    ) -> TableObject:
        """The object that carries shard `number` of `shards` of `node`'s `part`."""
        return cls(
            object_name(node, part, number),
            node,
            part,
            number,
            shards,
            generation,
            shard.digest,
            shard.entries,
            changed_at,
        )

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> TableObject:
        """Read a listed or watched object; HandoffError names the field that is wrong."""
        name = str((obj.get("metadata") or {}).get("name", "?"))
        try:
            spec = DatapathTableSpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise HandoffError(f"DatapathTable {name}: {problems}") from None
        return cls(
            name,
            spec.node,
            spec.part,
            spec.shard,
            spec.shards,
            spec.generation,
            spec.digest,
            tuple(spec.entries),
            parse_time(((obj.get("metadata") or {}).get("annotations") or {}).get(CHANGED_AT)),
        )

    def head(self) -> TableHead:
        return TableHead(
            self.name, self.node, self.part, self.shard, self.shards, self.generation, self.digest
        )

    def annotations(self) -> dict[str, str]:
        if self.changed_at is None:
            return {}
        return {CHANGED_AT: format_time(self.changed_at)}

    def body(self) -> dict[str, Any]:
        """The whole object as the API server takes it (not validated here: the server does)."""
        annotations = self.annotations()
        return {
            "apiVersion": API_VERSION,
            "kind": DATAPATH_TABLE.kind,
            "metadata": {
                "name": self.name,
                "labels": {NODE_LABEL: self.node, PART_LABEL: self.part},
                **({"annotations": annotations} if annotations else {}),
            },
            "spec": {
                "node": self.node,
                "part": self.part,
                "shard": self.shard,
                "shards": self.shards,
                "generation": self.generation,
                "digest": self.digest,
                "entries": list(self.entries),
            },
        }

    @functools.cached_property
    def content_digest(self) -> str:
        """The digest of the entries as received, computed once per object."""
        return digest(self.entries)


@dataclass(frozen=True)
class Report:
    """`status` of `<node>.program.0`: what the node's agent has applied."""

    applied_generation: int
    endpoints_attached: int
    errors: tuple[str, ...]
    compiled_digest: str
    service_mode: str = ""  # netfilter or fallback (stockade.agent.services); "" unknown

    def body(self) -> dict[str, Any]:
        errors = [e[:MAX_ENTRY_LENGTH] for e in self.errors[:MAX_ERRORS]]
        if len(self.errors) > MAX_ERRORS:
            errors[-1] = f"... and {len(self.errors) - MAX_ERRORS + 1} more errors"
        return {
            "appliedGeneration": self.applied_generation,
            "endpointsAttached": self.endpoints_attached,
            "errors": errors,
            "compiledDigest": self.compiled_digest,
            **({"serviceMode": self.service_mode} if self.service_mode else {}),
        }


def applied_generation(status: Mapping[str, Any] | None) -> int:
    """The program generation a node's report says its agent applied; -1 when none."""
    value = (status or {}).get("appliedGeneration")
    return value if isinstance(value, int) else -1


def program_report(obj: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None] | None:
    """(node, status) when `obj` is a node's program object, else None."""
    spec = obj.get("spec") or {}
    if spec.get("part") != PROGRAM or spec.get("shard") != 0:
        return None
    status = obj.get("status")
    return str(spec.get("node", "")), status if isinstance(status, Mapping) else None
