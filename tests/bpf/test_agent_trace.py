"""`stockade explain`'s datapath part against the kernel: the agent's tracer runs a crafted first
packet through the programs it loaded and pinned, with its live maps, for generated probes
(every pod pair and node address, several ports and protocols, both families); `explain` then
agrees with the reference evaluator on the verdict and the deciding rule of every probe. The
probes leave no conntrack entry and no device binding behind. A corrupted policy-map entry
(the allow rule's entries turned to deny) makes `explain` report the disagreement."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stockade.agent.sync import Syncer
from stockade.agent.trace import Probe, Tracer
from stockade.compiler import abi
from stockade.control.policies import parse_record
from stockade.datapath import libbpf, maps
from stockade.inspect import explain
from stockade.inspect.agents import AgentError
from stockade.inspect.live import Live
from stockade.model.evaluator import evaluate
from stockade.model.flow import Flow
from stockade.model.policy import Protocol
from tests.bpf.agent_harness import POLICY, PORT, Cluster, pin_root, running_syncer
from tests.fixtures.netns import MakeTopology

PORTS = (PORT, 80, 8081)


class LocalAgent:
    """The tracer of the agent of `cluster.node_name`, asked in this process (the HTTP route
    and the transport are tested elsewhere); other nodes have no agent here."""

    def __init__(self, cluster: Cluster, syncer: Syncer) -> None:
        self.node = cluster.node_name
        self.syncer = syncer
        self.tracer = Tracer(syncer.programs)

    def nodes(self) -> list[str]:
        return [self.node]

    def get(self, node: str, route: str, query: Mapping[str, object]) -> Any:
        if node != self.node or route != "/trace":
            raise AgentError(f"node {node}: no agent in this test")
        probe = Probe.parse({k: str(v) for k, v in query.items()})
        return {"hooks": self.tracer.trace(probe, self.syncer.maps, self.syncer.rules)}


def live(cluster: Cluster) -> Live:
    record = parse_record({**POLICY, "metadata": {**POLICY["metadata"], "uid": "u"}})
    assert record is not None
    return Live(cluster.state(), (record,))


def probes(state: Live, family: int) -> list[tuple[explain.Endpoint, explain.Endpoint, Flow]]:
    """Every probe toward or from web (the node's one endpoint)."""
    web = explain.resolve(state, "demo/web", family)
    others = [explain.resolve(state, k, family) for k in ("demo/client", "demo/other")]
    for node in state.state.nodes.values():
        for ip in node.ips:
            if ip.version == family:
                others.append(explain.resolve(state, str(ip)))
    out = []
    for other in others:
        for src, dst in ((other, web), (web, other)):
            for protocol in (Protocol.TCP, Protocol.UDP, Protocol.SCTP):
                for port in PORTS:
                    out.append((src, dst, explain.flow_of(src, dst, protocol, port, 0)))
            icmp = Protocol.ICMP if family == 4 else Protocol.ICMPV6
            out.append((src, dst, explain.flow_of(src, dst, icmp, 128 if family == 6 else 8, 0)))
    return out


def local_hops(result: explain.Explanation, node: str) -> list[explain.Hop]:
    return [h for h in result.hops if h.node == node]


def test_explain_agrees_with_the_loaded_programs_on_every_probe(topology: MakeTopology) -> None:
    topo = topology(nodes=2)
    cluster = Cluster.create(topo)
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):
        syncer.sync()
        assert syncer.maps is not None
        agent = LocalAgent(cluster, syncer)
        state = live(cluster)
        bindings = maps.Bindings(syncer.maps).read()
        checked = 0
        verdicts = set()
        for family in (4, 6):
            for src, dst, flow in probes(state, family):
                result = explain.explain(state, None, src, dst, flow)
                for hop in local_hops(result, cluster.node_name):
                    hop.datapath = explain.ask(agent, hop, flow)
                    hop.problems = explain.compare(hop.reference, hop.datapath)
                    assert not hop.problems, (str(flow), hop.direction, hop.problems)
                    verdicts.add((hop.direction, hop.reference.verdict.value))
                    checked += 1
        assert checked >= 100
        # both hooks judged, and the ingress hook both allowed (client on 8080) and denied
        assert {("ingress", "allow"), ("ingress", "deny"), ("egress", "allow")} <= verdicts
        assert maps.conntrack_entries(syncer.maps) == []  # probes open no path for replies
        assert maps.Bindings(syncer.maps).read() == bindings


def test_a_corrupted_policy_entry_makes_explain_report_a_disagreement(
    topology: MakeTopology,
) -> None:
    topo = topology(nodes=2)
    cluster = Cluster.create(topo)
    objects = cluster.table_objects()
    with pin_root() as root, running_syncer(root, topo, objects) as (syncer, _):
        syncer.sync()
        assert syncer.maps is not None
        agent = LocalAgent(cluster, syncer)
        state = live(cluster)
        src = explain.resolve(state, "demo/client")
        dst = explain.resolve(state, "demo/web")
        flow = explain.flow_of(src, dst, Protocol.TCP, PORT, 0)

        def ingress() -> explain.Hop:
            result = explain.explain(state, None, src, dst, flow)
            (hop,) = [h for h in local_hops(result, cluster.node_name) if h.direction == "ingress"]
            hop.datapath = explain.ask(agent, hop, flow)
            hop.problems = explain.compare(hop.reference, hop.datapath)
            return hop

        before = ingress()
        assert before.problems == [] and before.reference.verdict.value == "allow"
        allow_rule = before.datapath["ruleId"]  # type: ignore[index]
        corrupted = 0
        for name in ("policy", "policy_exact"):  # the LPM trie and the hash in front of it
            fd = syncer.maps.fd(name)
            entries = list(libbpf.map_dump(fd, abi.POLICY_KEY.size, abi.POLICY_VALUE.size))
            for key, value in entries:
                fields = list(abi.POLICY_VALUE.unpack(value))
                if fields[0] == allow_rule:
                    fields[2] = abi.Action.DENY
                    libbpf.map_update(fd, key, abi.POLICY_VALUE.pack(*fields))
                    corrupted += 1
        assert corrupted
        after = ingress()
        assert after.datapath is not None and after.datapath["verdict"] == "deny"
        assert any(p.startswith("verdict: reference allow, datapath deny") for p in after.problems)
        decision = evaluate(state.state, state.policies, flow)
        text = explain.render(explain.Explanation(src, dst, flow, decision, [after]))
        assert "DISAGREEMENT" in text
