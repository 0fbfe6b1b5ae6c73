"""The inspecting commands without a cluster: explain's comparison of the reference evaluator
with an agent's answer (agreement, a verdict or a rule that differs, no answer), observe's
filters, usage summed over nodes with the unused rules and policies, the agent's JSON routes
and trace parameters (a bad one is refused, naming it), and the command lines of `stockade`
and `kubectl stockade`."""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from stockade.agent.trace import Probe
from stockade.cli import build_parser
from stockade.compiler import ir
from stockade.control.policies import parse_record
from stockade.inspect import command, explain, observe, status
from stockade.inspect.agents import AGENT_SELECTOR, AgentError, ProxyAgents, parse_agent_urls
from stockade.inspect.live import Live
from stockade.model.cluster import ClusterState, Namespace, Pod
from stockade.model.flow import Flow
from stockade.runtime import serve_http
from stockade.sandbox.stack import StackRecord

DENY_ALL = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "deny-all", "namespace": "x", "uid": "u1", "generation": 1},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
}
UNUSED = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "nothing", "namespace": "y", "uid": "u2", "generation": 1},
    "spec": {"podSelector": {"matchLabels": {"app": "none"}}, "policyTypes": ["Ingress"]},
}
ISOLATION = {
    "kind": "NetworkPolicy.networking.k8s.io",
    "namespace": "x",
    "name": "deny-all",
    "direction": "Ingress",
    "index": -1,
}


def live() -> Live:
    pods = [
        Pod("x", "a", {"pod": "a"}, (ipaddress.ip_address("10.0.0.1"),), "n1"),
        Pod("y", "b", {"pod": "b"}, (ipaddress.ip_address("10.0.1.1"),), "n2"),
    ]
    namespaces = [Namespace(n, {"kubernetes.io/metadata.name": n}) for n in ("x", "y")]
    records = tuple(r for o in (DENY_ALL, UNUSED) if (r := parse_record(o)) is not None)
    return Live(ClusterState(namespaces, pods), records)


class Answers:
    """Agents that answer from a table (the transport is not under test here)."""

    def __init__(self, answers: Mapping[tuple[str, str], Any]) -> None:
        self.answers = answers

    def nodes(self) -> list[str]:
        return sorted({node for node, _ in self.answers})

    def get(self, node: str, route: str, query: Mapping[str, object]) -> Any:
        if (node, route) not in self.answers:
            raise AgentError(f"node {node}: unreachable")
        return self.answers[(node, route)]


def hooks(direction: str, verdict: str, rule: Any) -> dict[str, Any]:
    return {"hooks": [{"direction": direction, "verdict": verdict, "rule": rule, "ruleId": 4}]}


def test_explain_names_the_deciding_rule_and_agrees_with_a_matching_datapath() -> None:
    state = live()
    src = explain.resolve(state, "y/b")
    dst = explain.resolve(state, "x/a")
    flow = explain.flow_of(src, dst, Flow.of("10.0.1.1", "10.0.0.1", "TCP", 80).protocol, 80, 0)
    agents = Answers(
        {
            ("n2", "/trace"): hooks("egress", "allow", None),
            ("n1", "/trace"): hooks("ingress", "deny", ISOLATION),
        }
    )
    result = explain.explain(state, agents, src, dst, flow)
    assert result.decision.verdict.value == "deny"
    assert explain.identity(result.decision.rule) == ISOLATION
    assert result.agree
    assert "DISAGREE" not in explain.render(result)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (hooks("ingress", "allow", ISOLATION), "verdict: reference deny, datapath allow"),
        (hooks("ingress", "deny", None), "rule: reference"),
        ({"hooks": []}, "no answer"),
    ],
    ids=["verdict", "rule", "not-attached"],
)
def test_explain_reports_a_datapath_that_disagrees(answer: Any, problem: str) -> None:
    state = live()
    src, dst = explain.resolve(state, "y/b"), explain.resolve(state, "x/a")
    flow = explain.flow_of(src, dst, Flow.of("10.0.1.1", "10.0.0.1", "TCP", 80).protocol, 80, 0)
    agents = Answers({("n2", "/trace"): hooks("egress", "allow", None), ("n1", "/trace"): answer})
    result = explain.explain(state, agents, src, dst, flow)
    assert not result.agree
    ingress = next(h for h in result.hops if h.direction == "ingress")
    assert any(problem in p for p in ingress.problems)
    assert "DISAGREEMENT" in explain.render(result)


def test_explain_refuses_an_unknown_pod_naming_it() -> None:
    with pytest.raises(ValueError, match="no pod x/nope"):
        explain.resolve(live(), "x/nope")


def test_observe_filters_by_namespace_pod_policy_and_verdict() -> None:
    record = {"event": "drop", "srcPod": "y/b", "dstPod": "x/a", "policy": ISOLATION}
    assert observe.Filter().keeps(record)
    assert observe.Filter(namespace="x", pod="a").keeps(record)
    assert not observe.Filter(namespace="x", pod="b").keeps(record)
    assert observe.Filter(policy="deny-all", verdict="drop").keeps(record)
    assert not observe.Filter(verdict="audit").keeps(record)
    assert not observe.Filter(namespace="z").keeps(record)


def test_observe_merges_nodes_names_pods_and_counts_lost_events() -> None:
    flow = {"event": "drop", "src": "10.0.1.1", "dst": "10.0.0.1", "protocol": 6, "port": 80}
    flow |= {"policy": ISOLATION, "count": 3, "lastSeen": 1.0, "reason": "policy"}
    flow |= {"direction": "ingress"}
    agents = Answers(
        {
            ("n1", "/flows"): {"cursor": 5, "lost": 2, "evicted": 1, "flows": [flow]},
            ("n2", "/flows"): {"cursor": 0, "lost": 0, "evicted": 0, "flows": []},
        }
    )
    watcher = observe.Observer(agents, live().pod_name)
    records = watcher.poll()
    assert [(r["srcPod"], r["dstPod"], r["node"]) for r in records] == [("y/b", "x/a", "n1")]
    assert watcher.cursors == {"n1": 5, "n2": 0}
    assert watcher.events_lost == 3
    line = observe.render_flows(records, "text")[0]
    assert line.startswith("DROP  y/b -> x/a TCP/80 ingress on n1")
    assert "x/deny-all Ingress isolation default x3" in line
    assert json.loads(observe.render_flows(records, "json")[0])["count"] == 3


def test_usage_sums_nodes_and_lists_unused_rules_and_policies() -> None:
    other = dict(ISOLATION, index=0)
    agents = Answers(
        {
            ("n1", "/usage"): {"rules": [{"rule": ISOLATION, "packets": 4}, {"rule": other}]},
            ("n2", "/usage"): {"rules": [{"rule": ISOLATION, "packets": 1}]},
        }
    )
    report = observe.usage(live(), agents)
    assert [(r["rule"]["index"], r["packets"], r["nodes"]) for r in report["rules"]] == [
        (-1, 5, ["n1", "n2"]),
        (0, 0, ["n1"]),
        (-1, 0, []),  # y/nothing selects no pod: no node has its rules, and it matched nothing
    ]
    nothing = dict(ISOLATION, namespace="y", name="nothing")
    assert report["unusedRules"] == [other, nothing]
    assert [p["name"] for p in report["unusedPolicies"]] == ["nothing"]
    assert "policies that matched nothing (1):" in observe.render_usage(report)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"dst": "10.0.0.1", "port": "80"}, "src"),
        ({"src": "10.0.0.1", "dst": "nope", "port": "80"}, "dst"),
        ({"src": "10.0.0.1", "dst": "fd00::1", "port": "80"}, "src, dst"),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "GRE", "port": "80"}, "protocol"),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "port": "70000"}, "port"),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "ICMPv6"}, "protocol"),
    ],
    ids=["no-src", "bad-dst", "families", "protocol", "port", "icmpv6-on-ipv4"],
)
def test_a_bad_trace_parameter_is_refused_naming_it(query: dict[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        Probe.parse(query)


def test_a_trace_probe_is_the_first_packet_the_lowering_judges() -> None:
    probe = Probe.parse({"src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "icmp", "port": "2048"})
    assert probe.packet() == ir.Packet(
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"), ir.PROTO_ICMP, 2048
    )


def test_json_routes_answer_json_and_a_bad_parameter_is_a_400_naming_it() -> None:
    def route(query: Mapping[str, str]) -> object:
        if "bad" in query:
            raise ValueError("bad: not allowed")
        return {"echo": dict(query)}

    server = serve_http(0, lambda: "", routes={"/thing": route}, address="127.0.0.1")
    port = server.server_address[1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/thing?a=1", timeout=10) as answer:
            assert answer.headers["Content-Type"] == "application/json"
            assert json.loads(answer.read()) == {"echo": {"a": "1"}}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/thing?bad=1", timeout=10)
        assert refused.value.code == 400
        assert "bad: not allowed" in refused.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_status_text_shows_each_agents_mode_and_errors() -> None:
    agent = {
        "mode": {
            "conntrackOnPolicyChange": "keep",
            "conntrackClock": "jiffies, 4000000 ns a tick",
            "shape": "abc",
        },
        "rules": 3,
        "flowEvents": 5,
        "eventsLost": 0,
    }
    node = {"applied": 2, "published": 3, "attached": 1, "digest": "d" * 64, "errors": ["late"]}
    report = {"nodes": {"n1": {**node, "healthy": False, "agent": agent}}, "healthy": False}
    lines = status.render(report)
    assert lines[0].startswith("n1: NOT OK  generation 2/3 applied, 1 endpoint(s) attached")
    assert lines[1] == (
        "  mode: conntrack on policy change keep, conntrack clock jiffies, 4000000 ns a tick, "
        "shape abc; 3 rule(s); 5 drop/audit event(s), 0 lost"
    )
    assert lines[2] == "  error: late"


def test_agent_urls_are_node_equals_url() -> None:
    assert parse_agent_urls(["n1=http://127.0.0.1:9"]) == {"n1": "http://127.0.0.1:9"}
    with pytest.raises(ValueError, match=r"^--agent:"):
        parse_agent_urls(["n1:http://x"])


def test_the_sandbox_records_its_agents_as_the_commands_read_them() -> None:
    record = StackRecord(1, Path("/sys/fs/bpf/x"), (), {"node-1": 4001, "node-2": 4002})
    again = StackRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert parse_agent_urls(None, again.agents_setting()) == {
        "node-1": "http://127.0.0.1:4001",
        "node-2": "http://127.0.0.1:4002",
    }
    assert parse_agent_urls(["n=http://h:1"], again.agents_setting()) == {"n": "http://h:1"}


@pytest.mark.parametrize("name", ["explain", "observe", "usage", "status"])
def test_stockade_and_kubectl_stockade_have_the_command(name: str) -> None:
    args = ["--from", "x/a", "--to", "y/b", "--port", "80"] if name == "explain" else []
    assert build_parser().parse_args([name, *args]).command == name
    assert command.build_kubectl_parser().parse_args([name, *args]).command == name


def test_explain_with_a_bad_port_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.kubectl_main(["explain", "--from", "x/a", "--to", "y/b"]) == 1
    assert capsys.readouterr().err.strip() == "kubectl stockade: error: --port: required for TCP"


def test_proxy_agents_find_agent_pods_and_ask_them_through_pods_proxy() -> None:
    """Against a stand-in API server on loopback: the agent pods are listed by the chart's
    labels in their namespace, and each is asked at pods/<pod>:<port>/proxy/<route>."""
    seen: list[Mapping[str, str]] = []
    pods = {
        "items": [
            {
                "metadata": {"name": "agent-abc", "namespace": "stockade-system"},
                "spec": {"nodeName": "n1", "containers": []},
                "status": {"phase": "Running"},
            },
            {
                "metadata": {"name": "agent-old", "namespace": "stockade-system"},
                "spec": {"nodeName": "n2", "containers": []},
                "status": {"phase": "Pending"},
            },
        ]
    }

    def listing(query: Mapping[str, str]) -> object:
        seen.append(query)
        return pods

    def usage(query: Mapping[str, str]) -> object:
        return {"node": "n1", "rules": [], "asked": dict(query)}

    base = "/api/v1/namespaces/stockade-system/pods"
    routes = {base: listing, f"{base}/agent-abc:9471/proxy/usage": usage}
    server = serve_http(0, lambda: "", routes=routes, address="127.0.0.1")
    config = kubernetes.client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with kubernetes.client.ApiClient(config) as api:
            agents = ProxyAgents(api)
            assert agents.nodes() == ["n1"]  # a pod not Running is no agent to ask
            assert seen[0]["labelSelector"] == AGENT_SELECTOR
            assert agents.get("n1", "/usage", {"x": 1})["asked"] == {"x": "1"}
            with pytest.raises(AgentError, match="node n1: agent pod agent-abc: 404"):
                agents.get("n1", "/flows", {})
            with pytest.raises(AgentError, match="node n2: no running agent pod"):
                agents.get("n2", "/usage", {})
    finally:
        server.shutdown()
        server.server_close()
