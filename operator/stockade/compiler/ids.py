"""Stable small-integer ids for endpoints, peer classes and rules.

The datapath keys its maps by integers. An id must not move when unrelated objects come and go,
or one new pod would rewrite every map entry; so ids are allocated once per key and kept, and a
freed id is reused only after its key is gone. `IdTable` is an immutable value: the operator keeps
the latest table and passes it to the next lowering.

A new key first tries a slot derived from a digest of the key (`space` slots), so that a process
that starts from nothing (an operator restart) gives most keys the ids they had before and
rewrites little; a key whose slot is taken probes upwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class IdTable(Generic[K], Mapping[K, int]):
    """key → id (ids start at `first`); `assign` keeps existing ids and fills the gaps."""

    def __init__(
        self, ids: Mapping[K, int] | None = None, first: int = 1, space: int = 1 << 16
    ) -> None:
        self._ids: Mapping[K, int] = MappingProxyType(dict(ids or {}))
        self._first = first
        self._space = space

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
        wanted = dict.fromkeys(keys)
        kept = {k: v for k, v in self._ids.items() if keep_unused or k in wanted}
        used = set(kept.values())
        for key in wanted:
            if key in kept:
                continue
            candidate = self._first + _slot(key, self._space)
            while candidate in used:
                candidate += 1
            kept[key] = candidate
            used.add(candidate)
        return IdTable(kept, self._first, self._space)

    def __repr__(self) -> str:
        return f"IdTable({dict(self._ids)!r})"


def _slot(key: Hashable, space: int) -> int:
    """A slot from the key's repr: stable across processes, unlike hash() of strings."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % space
