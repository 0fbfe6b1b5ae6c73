"""Nothing a user writes reaches the generated C.

Policies, namespaces, pods and labels whose names and annotations carry comment terminators,
preprocessor directives, Jinja delimiters, newlines, NUL and very long strings are lowered to
NodeTables like any other; their names end up only in RuleInfo (a Python-side table), and the C
rendered for the node's Shape is byte-identical to the C of a cluster without them.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from stockade.compiler import ir
from stockade.compiler.lower import lower_node
from stockade.compiler.render import render_all
from stockade.compiler.shape import Shape
from stockade.model.cluster import ClusterState, Namespace, Node, Pod
from stockade.model.parse import parse_policy

HOSTILE = [
    "*/ int pwned; /*",
    '#include "/etc/passwd"',
    "{{ 7 * 7 }}",
    "{% for x in range(9) %}x{% endfor %}",
    "line\n#define STOCKADE_IPV6 0\n",
    "nul\0byte",
    "\\\n#error hostile",
    "x" * 100_000,
]
MARKERS = ["pwned", "passwd", "7 * 7", "range(9)", "hostile", "nul", "xxxxxxxxxxxxxxxx"]


def _policy(name: str, namespace: str, text: str) -> dict[str, object]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {"note": text},
            "labels": {"team": "x"},
        },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
            "egress": [{"ports": [{"protocol": "TCP", "port": 443}]}],
        },
    }


def _cluster(namespace: str, text: str) -> ClusterState:
    return ClusterState(
        namespaces=[Namespace(namespace, {"kubernetes.io/metadata.name": namespace, "t": text})],
        pods=[
            Pod(
                namespace,
                text,
                {"app": "web", "t": text},
                (ipaddress.ip_address("10.0.0.2"),),
                "node-1",
            ),
            Pod(namespace, "db", {"app": "db"}, (ipaddress.ip_address("10.0.0.3"),), "node-1"),
        ],
        nodes=[Node("node-1", (ipaddress.ip_address("10.0.0.254"),))],
    )


@pytest.mark.parametrize("text", HOSTILE, ids=[repr(t[:24]) for t in HOSTILE])
def test_hostile_names_reach_rule_info_but_never_the_c(text: str) -> None:
    namespace = f"ns-{text}"
    policy = parse_policy(_policy(text, namespace, text))
    lowered = lower_node(_cluster(namespace, text), [policy], "node-1")
    assert lowered.tables.policy, "the policy must have been lowered to entries"
    assert {info.name for info in lowered.tables.rules.values()} == {text}
    assert {info.namespace for info in lowered.tables.rules.values()} == {namespace}

    shape = Shape()  # the lowering's Shape is built from ints and bools only
    rendered = render_all(shape)
    for program in rendered:
        for name, body in program.files.items():
            for marker in MARKERS:
                assert marker not in body, f"{marker!r} reached {name}"
            assert "\0" not in body
    assert [p.source for p in rendered] == [p.source for p in render_all(Shape())]


def test_the_render_input_is_the_shape_alone() -> None:
    """A Shape carries only ints, bools and IntEnums; a string in any field is rejected."""
    for f in dataclasses.fields(Shape):
        with pytest.raises(ValueError, match=f"shape.{f.name}"):
            Shape(**{f.name: HOSTILE[0]})  # type: ignore[arg-type]
    for name, value in Shape().defines():
        assert type(value) is int
        assert name.isidentifier()


def test_rule_info_is_a_python_side_table() -> None:
    assert {f.name for f in dataclasses.fields(ir.NodeTables)} >= {"rules"}
    assert not hasattr(ir.PolicyEntry, "name")
