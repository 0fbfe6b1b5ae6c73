"""The split of the longest-prefix tables over hashes and tries (`stockade.datapath.layout`):
host classes and exact policy levels go to the hashes, flagged /64 entries stay in the trie, a
full hash leaves the rest in the trie, and `join` gives back the logical tables."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.compiler import abi, ir
from stockade.compiler.ir import Action, Direction
from stockade.datapath import layout

IN = Direction.INGRESS


def _policy(*entries: ir.PolicyEntry) -> dict[bytes, bytes]:
    return {e.key(): e.value() for e in entries}


def _classes(*entries: ir.ClassEntry) -> dict[bytes, bytes]:
    return {e.key(): e.value() for e in entries}


def _flags(value: bytes) -> int:
    return int(abi.POLICY_VALUE.get(value, "flags"))


CLASS_WIDE = ir.PolicyEntry(1, IN, 64, 5, action=Action.DENY, rule_id=9)
ONE_PORT = ir.PolicyEntry(1, IN, 96, 5, ir.PROTO_TCP, 80, rule_id=1)
PORT_RANGE = ir.PolicyEntry(1, IN, 90, 5, ir.PROTO_TCP, 1024, rule_id=2)
OTHER_CLASS = ir.PolicyEntry(1, IN, 64, 6, action=Action.ALLOW, rule_id=3)
TCP_WIDE = ir.PolicyEntry(1, IN, 80, 6, ir.PROTO_TCP, action=Action.DENY, rule_id=4)
HOST = ir.ClassEntry(ipaddress.ip_network("10.0.0.7/32"), 3)
CIDR = ir.ClassEntry(ipaddress.ip_network("10.0.0.0/8"), 4)


def test_exact_levels_go_to_the_hash_and_a_class_with_longer_trie_entries_is_flagged() -> None:
    trie, exact = layout.split_policy(_policy(CLASS_WIDE, ONE_PORT, PORT_RANGE), 100)
    assert set(exact) == {CLASS_WIDE.key(), ONE_PORT.key()}
    assert _flags(exact[CLASS_WIDE.key()]) & abi.POLICY_FLAG_LONGER
    assert not _flags(exact[ONE_PORT.key()]) & abi.POLICY_FLAG_LONGER
    assert set(trie) == {CLASS_WIDE.key(), PORT_RANGE.key()}
    assert trie[CLASS_WIDE.key()] == CLASS_WIDE.value()


def test_a_class_whose_longer_entries_are_all_exact_stays_out_of_the_trie() -> None:
    trie, exact = layout.split_policy(_policy(CLASS_WIDE, ONE_PORT, OTHER_CLASS, TCP_WIDE), 100)
    assert set(trie) == {TCP_WIDE.key(), OTHER_CLASS.key()}
    assert not _flags(exact[CLASS_WIDE.key()]) & abi.POLICY_FLAG_LONGER
    assert _flags(exact[OTHER_CLASS.key()]) & abi.POLICY_FLAG_LONGER


def test_entries_past_the_hash_capacity_stay_in_the_trie_and_flag_their_class() -> None:
    trie, exact = layout.split_policy(_policy(CLASS_WIDE, ONE_PORT), 1)
    assert set(exact) == {CLASS_WIDE.key()}
    assert _flags(exact[CLASS_WIDE.key()]) & abi.POLICY_FLAG_LONGER
    assert set(trie) == {CLASS_WIDE.key(), ONE_PORT.key()}


def test_host_classes_go_to_the_hash_up_to_its_capacity() -> None:
    trie, hosts = layout.split_classes(_classes(HOST, CIDR), 10)
    assert hosts == {ir.to_v6(ipaddress.ip_address("10.0.0.7")).packed: HOST.value()}
    assert set(trie) == {CIDR.key()}
    trie, hosts = layout.split_classes(_classes(HOST, CIDR), 0)
    assert hosts == {} and set(trie) == {HOST.key(), CIDR.key()}


@pytest.mark.parametrize("capacity", [0, 1, 2, 100], ids=lambda c: f"capacity {c}")
def test_join_gives_back_the_logical_tables(capacity: int) -> None:
    logical = {
        "endpoints": {ir.EndpointEntry(ipaddress.ip_address("10.0.0.1"), 1).key(): b"x" * 8},
        "peer_classes": _classes(HOST, CIDR),
        "policy": _policy(CLASS_WIDE, ONE_PORT, PORT_RANGE, OTHER_CLASS, TCP_WIDE),
    }
    physical = layout.split(logical, {"peer_hosts": capacity, "policy_exact": capacity})
    assert layout.join(physical) == logical


def test_a_logical_entry_that_sets_the_reserved_flag_is_refused() -> None:
    flagged = abi.POLICY_VALUE.replace(CLASS_WIDE.value(), "flags", abi.POLICY_FLAG_LONGER)
    with pytest.raises(ValueError, match="reserved"):
        layout.split_policy({CLASS_WIDE.key(): flagged}, 10)
