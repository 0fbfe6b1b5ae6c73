"""The hand-off codec round-trips one node's tables and Shape, shards stay bounded and stable,
and malformed entries are refused with a message naming the entry."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from stockade import handoff
from stockade.compiler import ir
from stockade.compiler.lower import lower_node
from stockade.compiler.shape import FragmentPolicy, Shape
from stockade.handoff import codec
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.parse import parse_policy
from stockade.model.policy import PortRange, Protocol


def _state(pods: int = 6) -> ClusterState:
    return ClusterState(
        [Namespace("x", {"ns": "x"})],
        [
            Pod(
                "x",
                f"p{i}",
                {"pod": f"p{i % 3}"},
                (ipaddress.ip_address(f"10.0.{i % 2}.{i}"),),
                f"n{i % 2}",
            )
            for i in range(pods)
        ],
        [Node("n0", (ipaddress.ip_address("172.18.0.10"),)), Node("n1")],
    )


POLICY = parse_policy(
    {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow", "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "p0"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"pod": "p1"}}}],
                    "ports": [{"port": 80}, {"port": 1000, "endPort": 2000}],
                }
            ],
        },
    }
)


@pytest.mark.parametrize("inline_max", [0, handoff.INLINE_ENTRIES], ids=["sharded", "inline"])
def test_the_lowering_of_a_node_round_trips_through_the_codec(inline_max: int) -> None:
    tables = lower_node(_state(), [POLICY], "n0").tables
    shape = Shape(vlan=True, fragments=FragmentPolicy.DROP)
    decoded, program = handoff.decode(handoff.encode(tables, shape, inline_max))
    assert set(decoded.endpoints) == set(tables.endpoints)
    assert set(decoded.classes) == set(tables.classes)
    assert set(decoded.policy) == set(tables.policy) and len(decoded.policy) == len(tables.policy)
    assert dict(decoded.rules) == dict(tables.rules)
    assert program.shape == shape


SERVICES = (
    ir.ServiceEntry(ipaddress.ip_network("10.96.0.0/12")),
    ir.ServiceEntry(ipaddress.ip_network("fd96::/108")),
    ir.ServiceEntry(ipaddress.ip_network("172.18.0.10/32"), 30000, 32767),
)


@pytest.mark.parametrize("inline_max", [0, handoff.INLINE_ENTRIES], ids=["sharded", "inline"])
def test_service_space_and_a_services_shape_round_trip(inline_max: int) -> None:
    tables = ir.NodeTables(services=SERVICES)
    shape = Shape(services=True, service_prefixes_max=1024)
    decoded, program = handoff.decode(handoff.encode(tables, shape, inline_max))
    assert set(decoded.services) == set(SERVICES) and len(decoded.services) == 3
    assert program.shape == shape


FALLBACK = (
    ir.ServiceVerdictEntry(3, ipaddress.ip_address("10.96.0.10"), 6, 80, ir.Action.ALLOW, 7),
    ir.ServiceVerdictEntry(3, ipaddress.ip_address("fd96::10"), 17, 53, ir.Action.DENY, 0, True),
    ir.ServiceVerdictEntry(9, ipaddress.ip_address("10.96.0.10"), 132, 80, ir.Action.DENY, 8),
)


@pytest.mark.parametrize("inline_max", [0, handoff.INLINE_ENTRIES], ids=["sharded", "inline"])
def test_the_service_fallback_verdicts_round_trip(inline_max: int) -> None:
    tables = ir.NodeTables(service_verdicts=FALLBACK)
    decoded, _ = handoff.decode(handoff.encode(tables, Shape(), inline_max))
    assert decoded.service_verdicts == tuple(sorted(FALLBACK, key=lambda e: e.key()))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("3 10.96.0.10 6 80 1 7", "expected 7 fields"),
        ("3 nonsense 6 80 1 7 0", "bad address"),
        ("0 10.96.0.10 6 80 1 7 0", "endpoint id 0 is outside"),
        ("3 10.96.0.10 6 70000 1 7 0", "port 70000 is outside"),
        ("3 10.96.0.10 6 80 0 7 0", "action 0 is neither allow nor deny"),
        ("3 10.96.0.10 6 80 1 7 2", "no backends 2 is outside"),
    ],
)
def test_a_malformed_fallback_entry_is_refused_naming_the_field(entry: str, message: str) -> None:
    with pytest.raises(handoff.HandoffError, match=message):
        handoff.decode_fallback(entry)


def test_the_manifest_lists_every_shard_with_its_digest() -> None:
    parts = handoff.encode(lower_node(_state(), [POLICY], "n0").tables, inline_max=0)
    program = handoff.decode_program(parts[handoff.PROGRAM][0].entries)
    assert not program.inline
    for part in handoff.TABLE_PARTS:
        assert program.manifest[part] == {
            i: handoff.digest(shard.entries) for i, shard in parts[part].items()
        }


def test_small_tables_travel_inside_the_program_object_and_large_ones_in_shards() -> None:
    tables = lower_node(_state(), [POLICY], "n0").tables
    count = len(tables.endpoints) + len(tables.classes) + len(tables.policy) + len(tables.rules)
    inline = handoff.encode(tables, inline_max=count)
    assert list(inline) == [handoff.PROGRAM]
    program = handoff.decode_program(inline[handoff.PROGRAM][0].entries)
    assert not any(program.manifest.values())
    assert sum(len(e) for e in program.inline.values()) == count
    sharded = handoff.encode(tables, inline_max=count - 1)
    assert set(sharded) == {handoff.PROGRAM, *handoff.TABLE_PARTS}
    assert not handoff.decode_program(sharded[handoff.PROGRAM][0].entries).inline


def test_a_malformed_inline_entry_is_refused_naming_it() -> None:
    with pytest.raises(handoff.HandoffError, match="bad address"):
        handoff.decode(
            {handoff.PROGRAM: {0: ("shape ipv6 1", "endpoints nonsense 1")}},
        )


@pytest.mark.parametrize("inline_max", [0, handoff.INLINE_ENTRIES], ids=["sharded", "inline"])
def test_the_fast_open_namespaces_round_trip_in_the_program_part(inline_max: int) -> None:
    tables = lower_node(_state(), [POLICY], "n0").tables
    parts = handoff.encode(tables, None, inline_max, frozenset({"free", "kube-public"}))
    decoded, program = handoff.decode(parts)
    assert program.open_namespaces == {"free", "kube-public"}
    assert set(decoded.policy) == set(tables.policy)
    assert handoff.decode(handoff.encode(tables, None, inline_max))[1].open_namespaces == set()


def test_a_fast_open_entry_that_is_no_namespace_name_is_refused_naming_it() -> None:
    with pytest.raises(handoff.HandoffError, match="'Bad_Name' is no namespace name"):
        handoff.decode_program(("shape ipv6 1", "open Bad_Name"))


def test_a_cluster_scoped_rule_keeps_its_empty_namespace() -> None:
    info = ir.RuleInfo("ClusterNetworkPolicy.stockade.io", "", "deny", ir.Direction.EGRESS, 3)
    assert handoff.decode_rule(handoff.encode_rule(9, info)) == (9, info)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [(0, 0), (1, 1), (handoff.SHARD_ENTRIES, 1), (handoff.SHARD_ENTRIES + 1, 2), (9000, 8)],
    ids=["empty", "one", "full", "one-over", "many"],
)
def test_a_part_splits_into_a_power_of_two_of_bounded_shards(entries: int, expected: int) -> None:
    assert handoff.shard_count(entries) == expected


def test_big_parts_stay_well_under_the_object_size_limit() -> None:
    classes = tuple(
        ir.ClassEntry(ipaddress.ip_network(f"10.{i >> 8 & 255}.{i & 255}.0/24"), i % 50 + 1)
        for i in range(20_000)
    )
    shards = handoff.encode_tables(ir.NodeTables(classes=classes))[handoff.CLASSES]
    assert len(shards) == 16
    assert max(len(s.entries) for s in shards.values()) < 2 * handoff.SHARD_ENTRIES
    assert max(sum(len(e) + 4 for e in s.entries) for s in shards.values()) < 256 * 1024


def test_one_endpoint_changing_rewrites_only_the_policy_shard_that_holds_it() -> None:
    def policy(ep: int, port: int) -> ir.PolicyEntry:
        return ir.PolicyEntry(ep, ir.Direction.INGRESS, 96, 1, 6, port, ir.Action.DENY)

    before = tuple(policy(ep, p) for ep in range(1, 400) for p in range(1, 20))
    after = (*tuple(e for e in before if e.endpoint_id != 7), policy(7, 999))
    old = handoff.encode_tables(ir.NodeTables(policy=before))[handoff.POLICY]
    new = handoff.encode_tables(ir.NodeTables(policy=after))[handoff.POLICY]
    assert len(old) == len(new) == 4
    assert sum(old[i] != new[i] for i in old) == 1


@pytest.mark.parametrize("inline_max", [0, handoff.INLINE_ENTRIES], ids=["sharded", "inline"])
def test_encoding_with_the_last_encoding_reuses_only_the_parts_whose_tables_are_equal(
    inline_max: int,
) -> None:
    """The operator hands each node's last tables and parts back to `encode`: what it gives is
    what encoding from nothing gives, and a part whose table is unchanged is the same object."""
    other = replace(
        POLICY, ingress=(replace(POLICY.ingress[0], ports=(PortRange(Protocol.TCP, 81),)),)
    )
    first = lower_node(_state(), [POLICY], "n0")
    second = lower_node(_state(), [other], "n0", first.ids).tables
    assert second.classes == first.tables.classes and second.policy != first.tables.policy
    last = handoff.encode(first.tables, None, inline_max)
    reused = handoff.encode(second, None, inline_max, last=(first.tables, last))
    assert reused == handoff.encode(second, None, inline_max)
    if inline_max == 0:
        assert reused[handoff.CLASSES] is last[handoff.CLASSES]
        assert reused[handoff.POLICY] is not last[handoff.POLICY]


def test_one_endpoint_with_many_entries_spreads_over_every_shard() -> None:
    """A pod under a large policy: its entries are not one shard past the object size limit."""
    big = tuple(
        ir.PolicyEntry(1, ir.Direction.INGRESS, 96, c, 6, port, ir.Action.ALLOW)
        for c in range(1, 11)
        for port in range(1, 2001)
    )
    small = tuple(
        ir.PolicyEntry(ep, ir.Direction.INGRESS, 96, 1, 6, 80, ir.Action.ALLOW)
        for ep in range(2, 50)
    )
    shards = handoff.encode_tables(ir.NodeTables(policy=big + small))[handoff.POLICY]
    assert len(shards) == 16
    assert max(len(s.entries) for s in shards.values()) < 2 * handoff.SHARD_ENTRIES
    # every small endpoint still lives in exactly one shard
    for ep in range(2, 50):
        holding = [i for i, s in shards.items() if any(e.startswith(f"{ep} ") for e in s.entries)]
        assert len(holding) == 1


@pytest.mark.parametrize(
    ("decoder", "entry", "message"),
    [
        (handoff.decode_endpoint, "10.0.0.1", "expected 2 fields"),
        (handoff.decode_endpoint, "nonsense 1", "bad address"),
        (handoff.decode_class, "10.0.0.0/8 x 0", "class id 'x' is not a number"),
        (handoff.decode_policy, "1 5 96 1 6 80 1 0 0 0", "policy entry"),
        (handoff.decode_rule, "1 K ns n Sideways 0", "Ingress or Egress"),
    ],
    ids=["endpoint-fields", "endpoint-address", "class-int", "policy-direction", "rule-direction"],
)
def test_a_malformed_entry_is_refused_naming_it(decoder, entry: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(handoff.HandoffError, match=message):
        decoder(entry)


@pytest.mark.parametrize("policy", list(FragmentPolicy), ids=lambda p: p.name)
def test_every_fragment_policy_and_the_fragments_map_size_round_trip(
    policy: FragmentPolicy,
) -> None:
    shape = Shape(fragments=policy, fragments_max=1234)
    entries = codec.encode_shape(shape)
    assert f"shape fragments {int(policy)}" in entries
    assert "shape fragments_max 1234" in entries
    assert handoff.decode_program(entries).shape == shape


def test_fragment_policy_numbers_are_stable() -> None:
    """The numbers travel in program objects between operator and agents of other versions."""
    assert {p.name: int(p) for p in FragmentPolicy} == {"PASS": 1, "DROP": 0, "TRACK": 2}
    assert Shape().fragments is FragmentPolicy.TRACK


def test_an_unknown_fragment_policy_is_refused_naming_the_field() -> None:
    with pytest.raises(handoff.HandoffError, match=r"shape.fragments 3 is none of \[0, 1, 2\]"):
        handoff.decode_program(["shape fragments 3"])


def test_a_fragments_map_size_past_its_limit_is_refused_naming_the_field() -> None:
    with pytest.raises(handoff.HandoffError, match=r"shape\.fragments_max: 2097152 is outside"):
        handoff.decode_program([f"shape fragments_max {1 << 21}"])


def test_an_unknown_shape_field_is_refused() -> None:
    with pytest.raises(handoff.HandoffError, match="unknown shape field 'turbo'"):
        handoff.decode_program(["shape turbo 1"])


# Every number that reaches a map key or value is range-checked: out of range it would alias
# another key (port 65,616 is port 80 in 16 bits) or index past an array.
OUT_OF_RANGE = {
    "port above 65535": (handoff.decode_policy, "1 0 96 1 6 65616 1 5 0 0", "port 65616"),
    "protocol above 255": (handoff.decode_policy, "1 0 96 1 262 80 1 5 0 0", "protocol 262"),
    "endpoint id 0": (handoff.decode_policy, "0 0 32 0 0 0 2 5 0 0", "endpoint id 0"),
    "endpoint id past 31 bits": (
        handoff.decode_endpoint,
        "10.0.0.1 2147483648",
        "endpoint id 2147483648 is outside 1..2147483647",
    ),
    "class id past 32 bits": (handoff.decode_class, "10.0.0.0/8 4294967296 0", "class id"),
    "unknown class flag": (handoff.decode_class, "10.0.0.0/8 3 2", "unknown flags 0x2"),
    "prefix inside the class": (handoff.decode_policy, "1 0 40 1 0 0 1 5 0 0", "prefixlen 40"),
    "prefix past the key": (handoff.decode_policy, "1 0 97 1 6 80 1 5 0 0", "prefixlen 97"),
    "negative rule id": (handoff.decode_policy, "1 0 96 1 6 80 1 -5 0 0", "rule id '-5'"),
    "sign and spaces": (handoff.decode_rule, "+7 K ns n Ingress 0", "rule id '\\+7'"),
    "digit separators": (handoff.decode_endpoint, "10.0.0.1 1_000", "endpoint id '1_000'"),
    "index below the isolation default": (handoff.decode_rule, "7 K ns n Ingress -2", "index -2"),
    "a 2^32-entry conntrack": (
        handoff.decode_program,
        ["shape conntrack_max 4294967295"],
        "shape.conntrack_max: 4294967295 is outside 1..4194304",
    ),
    "a service port past 65535": (
        handoff.decode_service,
        "10.96.0.0/12 0 65616",
        "port max 65616 is outside 0..65535",
    ),
    "a service port range upside down": (
        handoff.decode_service,
        "172.18.0.10/32 32767 30000",
        "port min 32767 above port max",
    ),
    "a service network that is none": (handoff.decode_service, "10.96.0.0/99 0 0", "bad network"),
    "a service prefix trie past its limit": (
        handoff.decode_program,
        ["shape service_prefixes_max 4294967295"],
        "shape.service_prefixes_max: 4294967295 is outside",
    ),
    "a shard number past the bound": (
        handoff.decode_program,
        ["shard policy 70000 abc"],
        "shard 70000",
    ),
}


@pytest.mark.parametrize(("decoder", "entry", "message"), OUT_OF_RANGE.values(), ids=OUT_OF_RANGE)
def test_a_number_out_of_its_range_is_refused_naming_the_field(decoder, entry, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(handoff.HandoffError, match=message):
        decoder(entry)


def test_every_size_field_of_the_shape_has_a_limit() -> None:
    import dataclasses

    from stockade.compiler.shape import SIZE_LIMITS, Shape

    sizes = {f.name for f in dataclasses.fields(Shape) if f.type in ("int", int)}
    # bounded on their own: 0..8, and 0 (no budget) ..conntrack_max's limit
    assert sizes - set(SIZE_LIMITS) == {"ipv6_ext_headers", "conntrack_per_endpoint"}
    Shape(**SIZE_LIMITS)  # the limits themselves are valid
    with pytest.raises(ValueError, match=r"shape\.conntrack_per_endpoint"):
        Shape(conntrack_per_endpoint=SIZE_LIMITS["conntrack_max"] + 1)
    with pytest.raises(ValueError, match=r"shape\.conntrack_per_endpoint"):
        Shape(conntrack_per_endpoint=-1)
