"""Whether a DatapathTable on the API server still holds what the operator published.

Pure: the publisher (`stockade.control.publish`) passes the head it published, the `Stamp` the
server gave its write (or its listing) and the object a watch event or a listing delivered. No
round trip is made to decide: the server raises `metadata.generation` on every change to the
spec, and on nothing else (the agent's status write, a label edit), so an object whose uid and
generation are the ones of our own write, or older, is our write or an event that arrived late.
Anything else is compared by content: the head (node, part, shard, generation, digest) must be
the published one and the entries must hash to it, so a hand edit that recomputes the digest is
caught as surely as one that does not. The labels must be ours too: an agent finds its node's
objects by them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stockade.handoff import NODE_LABEL, PART_LABEL, HandoffError, TableHead, TableObject


@dataclass(frozen=True)
class Stamp:
    """One stored version of an object, as the server identifies it."""

    uid: str
    generation: int  # metadata.generation: raised by every change to the spec
    version: str  # metadata.resourceVersion: changed by every write, status writes too

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> Stamp | None:
        """The stamp of a listed, watched or returned object; None when it carries none."""
        meta = obj.get("metadata") or {}
        uid, generation, version = (
            meta.get("uid"),
            meta.get("generation"),
            meta.get("resourceVersion"),
        )
        if not isinstance(uid, str) or not isinstance(generation, int) or not version:
            return None
        return cls(uid, generation, str(version))

    def covers(self, other: Stamp) -> bool:
        """Whether `other` is this version's spec or an older one of the same object."""
        return other.uid == self.uid and other.generation <= self.generation


def labelled(head: TableHead, obj: Mapping[str, Any]) -> bool:
    """Whether `obj` carries the labels its agent selects it by."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(NODE_LABEL) == head.node and labels.get(PART_LABEL) == head.part)


def holds(head: TableHead, obj: Mapping[str, Any]) -> bool:
    """Whether `obj` holds exactly what `head` describes: the same head, entries that hash to its
    digest, and its labels."""
    try:
        table = TableObject.from_api(obj)
    except HandoffError:
        return False
    return table.head() == head and table.content_digest == head.digest and labelled(head, obj)


def drifted(head: TableHead, stamp: Stamp | None, obj: Mapping[str, Any]) -> bool:
    """Whether `obj`, a watched version of the object published as `head` with `stamp` (None:
    not known), no longer holds what was published."""
    seen = Stamp.from_api(obj)
    if stamp is not None and seen is not None and stamp.covers(seen):
        return not labelled(head, obj)  # our spec, or older; a label edit is still drift
    return not holds(head, obj)
