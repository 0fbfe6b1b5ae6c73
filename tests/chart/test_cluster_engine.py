"""The `cluster` conformance engine against the sandbox API server: it creates exactly the
model's Namespace and Pod objects, and probes with the `kubectl exec ... agnhost connect`
command lines it would run on a real cluster (pods never run here: no kubelet serves them)."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from stockade.conformance.casefile import CaseFile, Check, Expect, parse_case_file
from stockade.conformance.engine import Addresses, Outcome
from stockade.conformance.engines import create_engine
from stockade.conformance.engines.cluster import AGNHOST, ClusterEngine
from stockade.model.policy import Protocol
from stockade.sandbox.controlplane.server import ControlPlane
from stockade.sandbox.toolchain import KUBERNETES


def case_file(x: str, y: str) -> CaseFile:
    """A model with two namespaces named `x` and `y` (unique per test: a deleted namespace stays
    Terminating for a while, or for good while a Pod bound to a node waits for a kubelet)."""
    X, Y = x, y  # noqa: N806 - the model's names
    raw = {
        "model": {
            "namespaces": {
                X: {"labels": {"kubernetes.io/metadata.name": X, "ns": "x"}},
                Y: {"labels": {"kubernetes.io/metadata.name": Y, "ns": "y"}},
            },
            "nodes": {"node-1": {"labels": {"zone": "a"}}, "node-2": {}},
            "pods": {
                f"{X}/a": {"labels": {"pod": "a"}},
                f"{X}/b": {"labels": {"pod": "b"}},
                f"{Y}/a": {"labels": {"pod": "a"}},
                f"{Y}/host": {
                    "labels": {"pod": "host"},
                    "host_network": True,
                    "node": "node-2",
                    "serves": [
                        {"port": 34345, "protocol": "TCP", "name": "web"},
                        {"port": 34351, "protocol": "SCTP"},
                    ],
                },
            },
        },
        "cases": [
            {
                "id": "serves-80-81",
                "server_ports": [80, 81],
                "server_protocols": ["TCP", "UDP", "SCTP"],
                "steps": [{"actions": [], "probes": []}],
            }
        ],
    }
    return parse_case_file(yaml.safe_load(yaml.safe_dump(raw)))


@pytest.fixture
def ns() -> tuple[str, str]:
    suffix = secrets.token_hex(3)
    return f"x-{suffix}", f"y-{suffix}"


@pytest.fixture
def nodes(api_client: Any) -> Iterator[list[str]]:
    core = kubernetes.client.CoreV1Api(api_client)
    suffix = secrets.token_hex(3)
    names = [f"cluster-engine-{suffix}-{i}" for i in (1, 2)]
    for i, name in enumerate(names):
        core.create_node(
            kubernetes.client.V1Node(metadata=kubernetes.client.V1ObjectMeta(name=name))
        )
        core.patch_node_status(
            name,
            {"status": {"addresses": [{"type": "InternalIP", "address": f"172.18.0.{i + 2}"}]}},
        )
    yield names
    for name in names:
        core.delete_node(name)


@pytest.fixture
def engine(control_plane: ControlPlane, nodes: list[str]) -> Iterator[ClusterEngine]:
    engine = ClusterEngine(
        kubeconfig=str(control_plane.kubeconfig),
        kubectl=str(KUBERNETES.path("kubectl")),
        nodes=nodes,
    )
    yield engine
    engine.teardown()


def pods_in(api_client: Any, namespace: str) -> dict[str, Any]:
    core = kubernetes.client.CoreV1Api(api_client)
    return {p.metadata.name: p for p in core.list_namespaced_pod(namespace).items}


def test_the_cli_knows_the_cluster_engine() -> None:
    assert create_engine("cluster").name == "cluster"


def test_it_creates_exactly_the_model_namespaces_and_pods(
    engine: ClusterEngine, api_client: Any, nodes: list[str], ns: tuple[str, str]
) -> None:
    X, Y = ns  # noqa: N806
    casefile = case_file(*ns)
    engine.create_world(casefile.topology, casefile.cases[0])
    core = kubernetes.client.CoreV1Api(api_client)
    for name, ns_label in ((X, "x"), (Y, "y")):
        labels = core.read_namespace(name).metadata.labels
        assert labels["ns"] == ns_label
        assert labels["stockade.io/conformance"] == "true"
    assert sorted(pods_in(api_client, X)) == ["a", "b"]
    assert sorted(pods_in(api_client, Y)) == ["a", "host"]
    a = pods_in(api_client, X)["a"]
    assert a.metadata.labels == {"pod": "a"}
    assert a.spec.node_name == nodes[0]
    assert pods_in(api_client, X)["b"].spec.node_name == nodes[1]  # round-robin over nodes
    served = {
        c.name: (c.args, [(p.name, p.container_port, p.protocol) for p in c.ports])
        for c in a.spec.containers
    }
    assert served == {
        "cont-80-tcp": (
            ["serve-hostname", "--tcp", "--http=false", "--port", "80"],
            [("serve-80-tcp", 80, "TCP")],
        ),
        "cont-80-udp": (
            ["serve-hostname", "--udp", "--http=false", "--port", "80"],
            [("serve-80-udp", 80, "UDP")],
        ),
        "cont-80-sctp": (["porter"], [("serve-80-sctp", 80, "SCTP")]),
        "cont-81-tcp": (
            ["serve-hostname", "--tcp", "--http=false", "--port", "81"],
            [("serve-81-tcp", 81, "TCP")],
        ),
        "cont-81-udp": (
            ["serve-hostname", "--udp", "--http=false", "--port", "81"],
            [("serve-81-udp", 81, "UDP")],
        ),
        "cont-81-sctp": (["porter"], [("serve-81-sctp", 81, "SCTP")]),
    }
    sctp = next(c for c in a.spec.containers if c.name == "cont-80-sctp")
    assert [(e.name, e.value) for e in sctp.env] == [("SERVE_SCTP_PORT_80", "foo")]
    assert {c.image for c in a.spec.containers} == {AGNHOST}
    host = pods_in(api_client, Y)["host"]
    assert host.spec.host_network is True
    assert host.spec.node_name == nodes[1]  # the model pins it to node-2
    assert [
        (p.name, p.container_port, p.host_port) for c in host.spec.containers for p in c.ports
    ] == [("web", 34345, 34345), (None, 34351, 34351)]
    assert core.read_node(nodes[0]).metadata.labels["zone"] == "a"


def test_teardown_deletes_the_case_namespaces(
    engine: ClusterEngine, api_client: Any, ns: tuple[str, str]
) -> None:
    X, Y = ns  # noqa: N806
    casefile = case_file(*ns)
    engine.create_world(casefile.topology, casefile.cases[0])
    engine.teardown()
    core = kubernetes.client.CoreV1Api(api_client)
    for name in (X, Y):  # Terminating, or already gone if the namespace controller finished
        assert _deleted_or_terminating(core, name), name


def _deleted_or_terminating(core: Any, name: str) -> bool:
    try:
        namespace = core.read_namespace(name)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return namespace.metadata.deletion_timestamp is not None


def _addressed(engine: ClusterEngine, ns: tuple[str, str]) -> None:
    X, Y = ns  # noqa: N806
    casefile = case_file(*ns)
    engine.create_world(casefile.topology, casefile.cases[0])
    ip = ipaddress.ip_address
    engine.addresses = Addresses(
        {
            f"{X}/a": (ip("10.244.1.10"),),
            f"{X}/b": (ip("10.244.2.10"),),
            f"{Y}/a": (ip("10.244.1.11"),),
            f"{Y}/host": (ip("172.18.0.3"),),
        },
        {"node-1": (ip("172.18.0.2"),), "node-2": (ip("172.18.0.3"),)},
    )


def test_probes_are_agnhost_connect_run_in_the_source_pod(
    engine: ClusterEngine, control_plane: ControlPlane, ns: tuple[str, str]
) -> None:
    X, Y = ns  # noqa: N806
    _addressed(engine, ns)
    check = Check(f"{X}/a", f"{Y}/a", Protocol.UDP, 81, Expect.ALLOWED)
    assert engine.probe_command(check) == [
        str(KUBERNETES.path("kubectl")),
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "exec",
        "--namespace",
        X,
        "a",
        "--container",
        "cont-80-tcp",
        "--",
        "/agnhost",
        "connect",
        "10.244.1.11:81",
        "--timeout=1s",
        "--protocol=udp",
    ]
    to_host = Check(f"{X}/b", f"{Y}/host", Protocol.SCTP, 34351, Expect.DENIED)
    assert engine.probe_command(to_host)[-3:] == [
        "172.18.0.3:34351",
        "--timeout=1s",
        "--protocol=sctp",
    ]


def test_probe_outcomes_are_read_from_agnhost_and_retried_until_as_expected(
    engine: ClusterEngine, ns: tuple[str, str]
) -> None:
    X, Y = ns  # noqa: N806
    _addressed(engine, ns)
    answers = {
        "10.244.1.11:80": [(1, "TIMEOUT"), (0, "")],
        "10.244.2.10:80": [(1, "REFUSED")],
        "172.18.0.3:34345": [(1, "TIMEOUT")],
    }
    seen: list[str] = []

    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        target = argv[-3]
        seen.append(target)
        code, err = answers[target].pop(0) if len(answers[target]) > 1 else answers[target][0]
        return subprocess.CompletedProcess(list(argv), code, "", err)

    engine.runner = runner
    checks = [
        Check(f"{X}/a", f"{Y}/a", Protocol.TCP, 80, Expect.ALLOWED),
        Check(f"{X}/a", f"{X}/b", Protocol.TCP, 80, Expect.ALLOWED),
        Check(f"{X}/a", f"{Y}/host", Protocol.TCP, 34345, Expect.DENIED),
    ]
    observed = engine.probe(checks)
    assert [o.outcome for o in observed] == [Outcome.CONNECTED, Outcome.REFUSED, Outcome.TIMEOUT]
    # the refused check was asked each round; the others only until they were as expected
    assert seen.count("10.244.2.10:80") == engine.attempts
    assert seen.count("10.244.1.11:80") == 2
    assert seen.count("172.18.0.3:34345") == 1
