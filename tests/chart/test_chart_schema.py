"""values.schema.json: one component definition for both blocks, and no unknown key accepted.

Checked through the pinned helm itself (`helm template` validates values against the schema),
so the tests see what a user sees.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.chart.chart import CHART, template

REJECTED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown top-level key": ({"operatr": {}}, "additional properties 'operatr' not allowed"),
    "unknown operator key": ({"operator": {"replica": 3}}, "/operator/replica"),
    "unknown agent key": ({"agent": {"hostNetwork": False}}, "/agent/hostNetwork"),
    "operator-only key in the agent": ({"agent": {"replicas": 2}}, "/agent/replicas"),
    "agent-only key in the operator": ({"operator": {"bpffs": {}}}, "/operator/bpffs"),
    "unknown image key": ({"agent": {"image": {"name": "x"}}}, "'name' not allowed"),
    "unknown metrics key": ({"operator": {"metrics": {"path": "/m"}}}, "'path' not allowed"),
    "capability with the CAP_ prefix": ({"agent": {"capabilities": ["CAP_BPF"]}}, "capabilities/0"),
    "two agents on one node during an update": (
        {"agent": {"updateStrategy": {"rollingUpdate": {"maxSurge": 1}}}},
        "maxSurge",
    ),
    "two operators without leader election": (
        {"operator": {"leaderElection": {"enabled": False}}},
        "/operator/replicas",
    ),
    "a relative bpffs path": ({"agent": {"bpffs": {"hostPath": "sys/fs/bpf"}}}, "hostPath"),
    "a log level that does not exist": ({"operator": {"logLevel": "loud"}}, "logLevel"),
    "a host name as the bind address": ({"agent": {"bindAddress": "localhost"}}, "bindAddress"),
}


@pytest.mark.parametrize("values,message", REJECTED.values(), ids=REJECTED.keys())
def test_the_schema_rejects(values: dict[str, Any], message: str) -> None:
    proc = template(values, check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr


def test_the_defaults_and_a_full_override_are_accepted() -> None:
    template(None)
    template(
        {
            "operator": {"extraEnv": [{"name": "A", "value": "1"}], "extraArgs": ["--x"]},
            "agent": {"capabilities": ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]},
            "imagePullSecrets": ["regcred"],
        }
    )


def test_both_blocks_reuse_one_component_definition() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    component = schema["$defs"]["component"]
    for block in ("operator", "agent"):
        spec = schema["properties"][block]
        assert spec["$ref"] == "#/$defs/component"
        assert spec["unevaluatedProperties"] is False
        own = set(spec["properties"]) - set(component["properties"])
        assert own, f"{block} adds no keys of its own"
    assert schema["additionalProperties"] is False
