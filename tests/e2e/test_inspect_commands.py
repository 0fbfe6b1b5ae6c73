"""`stockade explain`, `observe`, `usage` and `status` on the whole stack, run as a user runs
them (`python -m stockade.cli ...` with the sandbox's kubeconfig and STOCKADE_AGENTS): a denied
probe between real pods shows in observe with the policy and rule that decided, explain names
the same rule and the datapath agrees, usage shows the rule that matched and the one that did
not (and a policy that selects nothing), status shows both nodes' agents, and a flood of 10,000
denied datagrams becomes one Event on the policy with the packets' count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import pytest

from stockade.sandbox import session
from stockade.sandbox.workloads.traffic import Outcome
from tests.e2e.stack_fixtures import PORT, Stack, running_stack
from tests.fixtures.controlplane import wait_for
from tests.paths import ROOT

A, YB = "x/a", "y/b"  # x/a on node-1, y/b on node-2
FLOOD = 10_000
FLOOD_PORT = 9999


def netpol(name: str, spec: dict[str, Any], namespace: str = "x") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


# x/a accepts TCP/80 from y/b (rule 0) and UDP/5353 from namespace z (rule 1, never used);
# everything else to x/a is dropped by the isolation default.
GUARD = netpol(
    "guard-a",
    {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"ns": "y"}},
                        "podSelector": {"matchLabels": {"pod": "b"}},
                    }
                ],
                "ports": [{"port": PORT, "protocol": "TCP"}],
            },
            {
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
                "ports": [{"port": 5353, "protocol": "UDP"}],
            },
        ],
    },
)
NOBODY = netpol("selects-nobody", {"podSelector": {"matchLabels": {"pod": "none"}}})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("inspect")) as running:
        running.apply(GUARD)
        running.apply(NOBODY)
        running.wait_agents_applied()
        running.wait_reachability(denied={("x/b", A), ("y/a", A)})
        yield running


def stockade(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    state = session.SandboxState.load(stack.state_dir)
    assert state is not None and state.stack is not None
    env = dict(os.environ, STOCKADE_AGENTS=state.stack.agents_setting())
    return subprocess.run(
        [sys.executable, "-m", "stockade.cli", *args, "--kubeconfig", str(stack.kubeconfig)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


ISOLATION = {
    "kind": "NetworkPolicy.networking.k8s.io",
    "namespace": "x",
    "name": "guard-a",
    "direction": "Ingress",
    "index": -1,
}


def test_observe_shows_a_denied_probe_with_the_rule_that_decided(stack: Stack) -> None:
    assert stack.observe([("y/a", A)]) == {("y/a", A): Outcome.TIMEOUT}

    def denied() -> list[dict[str, Any]] | None:
        done = stockade(stack, "observe", "-n", "x", "--verdict", "drop", "-o", "json")
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        found = [r for r in records if (r["srcPod"], r["dstPod"]) == ("y/a", A)]
        return found or None

    (record,) = [r for r in wait_for("observe shows y/a -> x/a", denied, 10) if r["port"] == PORT]
    assert record["policy"] == ISOLATION
    assert (record["event"], record["direction"], record["node"]) == ("drop", "ingress", "node-1")
    assert record["count"] >= 1
    text = stockade(stack, "observe", "--pod", "a", "-n", "x", "--policy", "guard-a")
    assert f"DROP  y/a -> {A} TCP/{PORT} ingress on node-1" in text.stdout


def test_explain_names_the_rule_and_the_datapath_agrees(stack: Stack) -> None:
    denied = stockade(stack, "explain", "--from", "y/a", "--to", A, "--port", str(PORT))
    assert denied.returncode == 0, denied.stdout + denied.stderr
    assert "verdict: DENY by NetworkPolicy.networking.k8s.io x/guard-a Ingress" in denied.stdout
    assert "DISAGREE" not in denied.stdout
    allowed = as_json(
        stockade(stack, "explain", "--from", YB, "--to", A, "--port", str(PORT), "-o", "json")
    )
    assert (allowed["verdict"], allowed["agree"]) == ("allow", True)
    ingress = next(h for h in allowed["hops"] if h["direction"] == "ingress")
    assert ingress["reference"]["rule"] == dict(ISOLATION, index=0)
    assert ingress["datapath"]["rule"] == dict(ISOLATION, index=0)
    assert {h["node"] for h in allowed["hops"]} == {"node-1", "node-2"}
    # kubectl's plugin is the same command
    plugin = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "kubectl-stockade"),
            "explain",
            "--from",
            YB,
            "--to",
            A,
            "--port",
            str(PORT),
            "--kubeconfig",
            str(stack.kubeconfig),
            "--reference-only",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert plugin.returncode == 0, plugin.stderr
    assert "verdict: ALLOW by NetworkPolicy.networking.k8s.io x/guard-a Ingress rule 0" in (
        plugin.stdout
    )


def test_usage_shows_a_used_and_an_unused_rule(stack: Stack) -> None:
    assert stack.observe([(YB, A)]) == {(YB, A): Outcome.CONNECTED}
    report = as_json(stockade(stack, "usage", "-n", "x", "-o", "json"))
    by_index = {r["rule"]["index"]: r for r in report["rules"] if r["rule"]["name"] == "guard-a"}
    assert by_index[0]["packets"] > 0
    assert by_index[1]["packets"] == 0
    assert dict(ISOLATION, index=1) in report["unusedRules"]
    assert dict(ISOLATION, index=0) not in report["unusedRules"]
    assert {"kind": ISOLATION["kind"], "namespace": "x", "name": "selects-nobody"} in report[
        "unusedPolicies"
    ]


def test_status_shows_each_nodes_agent(stack: Stack) -> None:
    report = as_json(stockade(stack, "status", "-o", "json"))
    assert set(report["nodes"]) == {"node-1", "node-2"}
    assert report["healthy"]
    for node in report["nodes"].values():
        assert node["applied"] == node["published"]
        assert node["agent"]["mode"]["conntrackOnPolicyChange"] == "revalidate"
        # the agent measured the kernel's tick: conntrack reads jiffies (stockade.datapath.clock)
        assert node["agent"]["mode"]["conntrackClock"].startswith("jiffies, "), node["agent"]
    assert report["nodes"]["node-1"]["agent"]["rules"] > 0
    text = stockade(stack, "status")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count(", conntrack clock jiffies, ") == 2, text.stdout


def isolation_drops(stack: Stack) -> int:
    """Packets the isolation default of guard-a dropped, over every node (`stockade usage`)."""
    report = as_json(stockade(stack, "usage", "-n", "x", "-o", "json"))
    return sum(r["packets"] for r in report["rules"] if r["rule"] == ISOLATION)


def events_lost(stack: Stack) -> int:
    report = as_json(stockade(stack, "status", "-o", "json"))
    return sum(int(n["agent"]["eventsLost"]) for n in report["nodes"].values())


def test_a_flood_of_denied_datagrams_is_one_event_with_its_count(stack: Stack) -> None:
    src, dst = stack.add_pod("y/flood", "node-2", {"pod": "flood"}), stack.pod(A)
    stack.wait_agents_applied()
    flood = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({FLOOD}): s.sendto(b'x', ('{dst.ip_v4}', {FLOOD_PORT}))\n"
    )
    dropped_before, lost_before = isolation_drops(stack), events_lost(stack)
    started = time.time()
    subprocess.run(
        ["ip", "netns", "exec", src.netns, sys.executable, "-c", flood], check=True, timeout=120
    )
    dropped = isolation_drops(stack) - dropped_before  # the datapath's own count
    lost = events_lost(stack) - lost_before
    core = kubernetes.client.CoreV1Api(stack.api)

    def posted() -> list[Any] | None:
        listed = core.list_namespaced_event("x", field_selector="involvedObject.name=guard-a")
        mine = [
            e
            for e in listed.items
            if e.reason == "PolicyDenied" and f"to {dst.ip_v4} UDP/{FLOOD_PORT}" in e.message
        ]
        counted = sum(e.count for e in mine)
        return mine if mine and counted + lost >= dropped else None

    # posted once the wall-clock minute of the flood is over (the agent flushes every 5 s)
    events = wait_for("the flood's Events", posted, timeout=90 + (60 - started % 60))
    assert dropped > FLOOD // 2  # the flood reached the datapath
    assert len(events) <= 2  # one per source and minute: the flood spanned one or two
    assert sum(e.count for e in events) + lost == dropped
    assert all(f"from {src.ip_v4}" in e.message for e in events)
    assert all(e.involved_object.kind == "NetworkPolicy" for e in events)
