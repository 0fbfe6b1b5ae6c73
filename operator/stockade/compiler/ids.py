"""Stable small-integer ids for endpoints, peer classes and rules.

The datapath keys its maps by integers. An id must not move when unrelated objects come and go,
or one new pod would rewrite every map entry; so ids are allocated once per key and kept, and a
freed id is reused only after its key is gone. `IdTable` is an immutable value: the agent (or the
operator) keeps the latest table and passes it to the next lowering.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class IdTable(Generic[K], Mapping[K, int]):
    """key → id (ids start at `first`); `assign` keeps existing ids and fills the gaps."""

    def __init__(self, ids: Mapping[K, int] | None = None, first: int = 1) -> None:
        self._ids: Mapping[K, int] = MappingProxyType(dict(ids or {}))
        self._first = first

    def __getitem__(self, key: K) -> int:
        return self._ids[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def assign(self, keys: Iterable[K], *, keep_unused: bool = False) -> IdTable[K]:
        """A table with an id for every key in `keys`.

        Keys already present keep their id; new keys take the lowest free ids in the order given
        (callers pass a sorted order so that the result is deterministic). Keys absent from `keys`
        are dropped unless `keep_unused`.
        """
        wanted = list(dict.fromkeys(keys))
        kept = {k: v for k, v in self._ids.items() if keep_unused or k in set(wanted)}
        used = set(kept.values())
        next_id = self._first
        for key in wanted:
            if key in kept:
                continue
            while next_id in used:
                next_id += 1
            kept[key] = next_id
            used.add(next_id)
        return IdTable(kept, self._first)

    def __repr__(self) -> str:
        return f"IdTable({dict(self._ids)!r})"
