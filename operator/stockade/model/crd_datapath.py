"""The `DatapathTable` kind (`stockade.io/v1alpha1`, short name `sdt`): the operator's hand-off to
the node agents.

The schema only: `crd.CRD_KINDS` renders the CRD from these models, and
`stockade.handoff.objects`, which builds and reads the objects (their names, labels and who
reports on which), validates what it reads against `DatapathTableSpec`; the entries are the
strings of `stockade.handoff.codec`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from stockade.model.crd_common import WireModel, cel, validations

MAX_ENTRIES = 65_536  # a hard bound; the operator aims at about 4,000 entries per shard
MAX_ENTRY_LENGTH = 1024  # a rules entry holds a kind, a namespace and a name
MAX_ERRORS = 32
DIGEST_PATTERN = r"^[0-9a-f]{0,64}$"

Entry = Annotated[str, Field(max_length=MAX_ENTRY_LENGTH)]
Part = Literal["program", "endpoints", "classes", "policy", "rules", "services", "fallback"]


class DatapathTableSpec(WireModel):
    """One shard of one part of a node's datapath tables, published by the operator."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.shard < self.shards", "shard must be below shards", field_path=".shard")
        )
    )

    node: str = Field(min_length=1, max_length=253, description="The node these tables are for.")
    part: Part = Field(
        description=(
            "Which table: program, endpoints, classes, policy, rules, services or fallback."
        )
    )
    shard: int = Field(ge=0, le=1 << 20, description="This shard's number within its part.")
    shards: int = Field(ge=1, le=1 << 20, description="How many shards the part has.")
    generation: int = Field(
        ge=0, description="The operator's publish generation that last changed this shard."
    )
    digest: str = Field(
        max_length=64, pattern=DIGEST_PATTERN, description="The digest of the entries."
    )
    entries: list[Entry] = Field(
        default_factory=list,
        max_length=MAX_ENTRIES,
        description="One map entry per string (stockade.handoff.codec).",
    )


class DatapathTableStatus(WireModel):
    """What the node's agent reports (on `<node>.program.0` only)."""

    applied_generation: int | None = Field(
        default=None, ge=0, description="The program generation the agent has written."
    )
    endpoints_attached: int | None = Field(
        default=None, ge=0, description="Endpoints with the programs attached."
    )
    errors: list[Entry] | None = Field(
        default=None,
        max_length=MAX_ERRORS,
        description="What the agent could not apply.",
    )
    compiled_digest: str | None = Field(
        default=None,
        max_length=64,
        pattern=DIGEST_PATTERN,
        description="The digest of the compiled programs.",
    )
    service_mode: Literal["netfilter", "fallback"] | None = Field(
        default=None,
        description="Where the node judges Service traffic: on the backend after DNAT "
        "(netfilter) or at the veth on the Service address (fallback).",
    )


class DatapathTable(WireModel):
    """A whole DatapathTable object, as the agent and the tests read it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["stockade.io/v1alpha1"]
    kind: Literal["DatapathTable"]
    spec: DatapathTableSpec
    status: DatapathTableStatus | None = None
