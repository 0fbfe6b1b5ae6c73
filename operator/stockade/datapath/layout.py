"""Where the logical tables live in the pinned maps: hashes in front of the longest-prefix tries.

`ir.NodeTables` describes two longest-prefix tables (peer classes, policy). A trie lookup in the
kernel walks a path whose length grows with the number of entries (about 60 ns with ten entries
and 140 ns with ten thousand on the reference machine), while a hash lookup costs the same at
any size. So the writer (`stockade.datapath.maps.TableWriter`) splits each logical table:

- peer classes: host prefixes (/128, IPv4 /32 as IPv4-mapped /128) go to the `peer_hosts` hash
  keyed by the 16 address bytes; the `peer_classes` trie keeps the shorter prefixes. A host
  prefix is the longest there is, so a hash hit is the trie's answer.
- policy: entries of the exact levels (/96: one port; /64: a whole peer class) go to the
  `policy_exact` hash under their own key bytes. A level entry that has a trie-resident entry
  strictly beneath it is flagged POLICY_FLAG_LONGER and stays in the trie too. The program looks
  up /96, then /64 unless flagged, then the trie (bpf/policy.h), which equals the longest-prefix
  match over all entries; `ir.lookup` specifies the same order.

Entries past a hash's capacity stay in the trie, which keeps the answer exact. `join` is the
inverse of `split`, used to adopt what the maps hold after a restart. Keys and values are bytes
in the layouts of `stockade.compiler.abi`.
"""

from __future__ import annotations

from collections.abc import Mapping

from stockade.compiler import abi

DATA = abi.LPM_PREFIXLEN  # every LPM key starts with its prefix length; the data follows
CLASS_BYTES = abi.PREFIX_CLASS // 8  # endpoint<<1|dir and class: what a /64 policy prefix fixes

# logical table name -> (trie map, hash map)
SPLIT_MAPS = {"peer_classes": ("peer_classes", "peer_hosts"), "policy": ("policy", "policy_exact")}
PHYSICAL_MAPS = ("endpoints", "peer_classes", "peer_hosts", "policy", "policy_exact")

Contents = dict[bytes, bytes]


def _prefixlen(key: bytes) -> int:
    return int(abi.U32.unpack_from(key)[0])


def _flags(value: bytes) -> int:
    return int(abi.POLICY_VALUE.get(value, "flags"))


def _with_flags(value: bytes, flags: int) -> bytes:
    return abi.POLICY_VALUE.replace(value, "flags", flags)


def split_classes(classes: Mapping[bytes, bytes], capacity: int) -> tuple[Contents, Contents]:
    """(trie, hosts): host prefixes go to the hash, up to `capacity` of them."""
    hosts = sorted(k for k in classes if _prefixlen(k) == abi.CLASS_KEY_BITS)[:capacity]
    hashed = set(hosts)
    trie = {k: v for k, v in classes.items() if k not in hashed}
    return trie, {k[DATA:]: classes[k] for k in hosts}


def split_policy(policy: Mapping[bytes, bytes], capacity: int) -> tuple[Contents, Contents]:
    """(trie, exact): the exact levels go to the hash, /64 first, up to `capacity` entries."""
    for key, value in policy.items():
        if _flags(value) & abi.POLICY_FLAG_LONGER:
            raise ValueError(
                f"policy entry {key.hex()}: flag bit {abi.POLICY_FLAG_LONGER} is reserved"
            )
    by_level = {
        level: sorted(k for k in policy if _prefixlen(k) == level)
        for level in abi.POLICY_EXACT_LEVELS
    }
    chosen: list[bytes] = []
    for level in sorted(abi.POLICY_EXACT_LEVELS):  # /64 entries answer more packets each
        chosen += by_level[level][: capacity - len(chosen)]
    hashed = set(chosen)
    trie = {k: v for k, v in policy.items() if k not in hashed}
    beneath = {k[DATA : DATA + CLASS_BYTES] for k in trie if _prefixlen(k) > abi.POLICY_EXACT_CLASS}
    exact: Contents = {}
    for key in chosen:
        value = policy[key]
        if _prefixlen(key) == abi.POLICY_EXACT_CLASS and key[DATA : DATA + CLASS_BYTES] in beneath:
            value = _with_flags(value, _flags(value) | abi.POLICY_FLAG_LONGER)
            trie[key] = policy[key]
        exact[key] = value
    return trie, exact


def split(
    logical: Mapping[str, Mapping[bytes, bytes]], capacity: Mapping[str, int]
) -> dict[str, Contents]:
    """The contents of every physical map for the logical tables (endpoints, peer_classes,
    policy); `capacity` gives the max entries of peer_hosts and policy_exact."""
    class_trie, hosts = split_classes(logical["peer_classes"], capacity["peer_hosts"])
    policy_trie, exact = split_policy(logical["policy"], capacity["policy_exact"])
    return {
        "endpoints": dict(logical["endpoints"]),
        "peer_classes": class_trie,
        "peer_hosts": hosts,
        "policy": policy_trie,
        "policy_exact": exact,
    }


def join(physical: Mapping[str, Mapping[bytes, bytes]]) -> dict[str, Contents]:
    """The logical tables that `physical` holds (the inverse of `split`)."""
    classes = dict(physical["peer_classes"])
    for addr, value in physical.get("peer_hosts", {}).items():
        classes[abi.CLASS_KEY.pack(abi.CLASS_KEY_BITS, addr)] = value
    policy = dict(physical["policy"])
    for key, value in physical.get("policy_exact", {}).items():
        policy[key] = _with_flags(value, _flags(value) & ~abi.POLICY_FLAG_LONGER)
    return {"endpoints": dict(physical["endpoints"]), "peer_classes": classes, "policy": policy}


def longest_first(keys: list[bytes]) -> list[bytes]:
    """Upserts into policy_exact go longest prefix first: a /96 lands before the /64 above it
    loses its flag, so no lookup meanwhile answers with the /64 for that port."""
    return sorted(keys, key=lambda k: -_prefixlen(k))
