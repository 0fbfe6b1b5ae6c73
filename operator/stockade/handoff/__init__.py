"""The hand-off from the operator to the node agents, end to end: the one owner of the
`DatapathTable` wire contract.

- `codec`: one node's tables and Shape as text entries in shards, and the `program` part's
  manifest of shard digests (the format, documented once there);
- `objects`: the `DatapathTable` object that carries one shard, built (`TableObject.build`,
  `body()`) and read back (`TableObject.from_api`, validated against the CRD's model), and the
  agent's `Report` on its node's program object;
- `assemble`: the agent's side, a node's objects checked against the manifest and assembled
  into one complete set, or found incomplete.

Digests are computed once: a `codec.Shard` hashes its entries when it is made (the manifest,
the operator's plan and the object take that digest), and a received `TableObject` hashes its
entries at most once.

Where it sits: pure (no I/O, neither kopf nor kubernetes), above the compiler whose output it
carries and beside the datapath, so that both the operator side (`stockade.control`, which never
imports the datapath) and the agent (`stockade.agent`) use it; `.importlinter` enforces both.
The I/O stays with them: `stockade.control.publish` writes the objects, `stockade.agent.watch`
and `stockade.agent.report` read and report.
"""

from stockade.handoff.assemble import Assembler, HandoffSet, IncompleteError
from stockade.handoff.codec import (
    CLASSES,
    ENDPOINTS,
    FALLBACK,
    INLINE_ENTRIES,
    NO_NAMESPACE,
    PARTS,
    POLICY,
    PROGRAM,
    RULES,
    SERVICES,
    SHARD_ENTRIES,
    TABLE_PARTS,
    HandoffError,
    Program,
    Shard,
    Shards,
    decode,
    decode_class,
    decode_endpoint,
    decode_fallback,
    decode_policy,
    decode_program,
    decode_rule,
    decode_service,
    decode_tables,
    digest,
    encode,
    encode_rule,
    encode_tables,
    rule_entries,
    shard_count,
)
from stockade.handoff.objects import (
    CHANGED_AT,
    NODE_LABEL,
    PART_LABEL,
    Report,
    TableHead,
    TableObject,
    applied_generation,
    format_time,
    node_selector,
    object_name,
    parse_time,
    program_name,
    program_report,
)

__all__ = [
    "CHANGED_AT",
    "CLASSES",
    "ENDPOINTS",
    "FALLBACK",
    "INLINE_ENTRIES",
    "NODE_LABEL",
    "NO_NAMESPACE",
    "PARTS",
    "PART_LABEL",
    "POLICY",
    "PROGRAM",
    "RULES",
    "SERVICES",
    "SHARD_ENTRIES",
    "TABLE_PARTS",
    "Assembler",
    "HandoffError",
    "HandoffSet",
    "IncompleteError",
    "Program",
    "Report",
    "Shard",
    "Shards",
    "TableHead",
    "TableObject",
    "applied_generation",
    "decode",
    "decode_class",
    "decode_endpoint",
    "decode_fallback",
    "decode_policy",
    "decode_program",
    "decode_rule",
    "decode_service",
    "decode_tables",
    "digest",
    "encode",
    "encode_rule",
    "encode_tables",
    "format_time",
    "node_selector",
    "object_name",
    "parse_time",
    "program_name",
    "program_report",
    "rule_entries",
    "shard_count",
]
