"""The fallback mode's Service verdicts (`stockade.compiler.fallback`) against their reference:
the evaluator composed over the backends. For generated clusters, policies and Services (ready
backends among pods, nodes and outsiders, a named target port resolved per backend, Services
without a ready backend), every client endpoint's entry is ALLOW exactly when the reference
allows the client's egress to every ready backend on its target port, with the rule of the
first backend deciding; an endpoint without an entry is one that the reference allows to every
backend. And the operator's table from EndpointSlices (`control.services`)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.compiler import ir
from stockade.compiler.fallback import service_verdicts
from stockade.compiler.lower import Lowering
from stockade.control import lowering as lowering_module
from stockade.control.lowering import Lowerer
from stockade.control.policies import parse_record
from stockade.control.services import (
    ServiceInfo,
    ServicePort,
    endpoint_slice_from_api,
    service_backends,
    service_from_api,
)
from stockade.control.store import Store
from stockade.model.cluster import Namespace, Node, Pod
from stockade.model.evaluator import judge
from stockade.model.flow import Flow
from stockade.model.policy import Direction, Protocol
from tests.fixtures.scenarios import EXTERNAL, NODES, PROFILE, Scenario, scenario

ip = ipaddress.ip_address
PROTOCOLS = {ir.PROTO_TCP: Protocol.TCP, ir.PROTO_UDP: Protocol.UDP, ir.PROTO_SCTP: Protocol.SCTP}


@st.composite
def services(draw: st.DrawFn, case: Scenario) -> list[ir.ServiceBackends]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        family = draw(st.sampled_from((4, 6)))
        address = ip(f"10.96.0.{i + 1}" if family == 4 else f"fd96::{i + 1}")
        protocol = draw(st.sampled_from(sorted(PROTOCOLS)))
        candidates = [a for p in case.state.pods for a in p.ips if a.version == family]
        candidates += [a for n in NODES for a in n.ips if a.version == family]
        candidates += [a for e in EXTERNAL if (a := ip(e)).version == family]
        chosen = draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True))
        backends = set()
        for backend in chosen:
            pod = case.state.pod_at(backend)
            named = [
                n
                for n, p in (pod.named_ports.items() if pod else ())
                if p[1] is PROTOCOLS[protocol]
            ]
            if named and draw(st.booleans()):  # the target port a named port gives this backend
                number = pod.named_ports[draw(st.sampled_from(sorted(named)))][0]  # type: ignore[union-attr]
            else:
                number = draw(st.sampled_from((53, 80, 81, 443, 8080, 9000, 9100)))
            backends.add((backend, number))
        ordered = tuple(sorted(backends, key=lambda b: (b[0].packed, b[1])))
        out.append(ir.ServiceBackends(address, protocol, 80 + i, ordered))
    return out


def _rule(tables: ir.NodeTables, rule_id: int) -> tuple[str, str, str, int] | None:
    info = tables.rules.get(rule_id) if rule_id else None
    return (info.kind, info.namespace, info.name, info.index) if info else None


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_fallback_verdicts_are_the_evaluator_composed_over_the_ready_backends(
    data: st.DataObject,
) -> None:
    case = data.draw(scenario())
    table = data.draw(services(case))
    lowering = Lowering(case.state, case.policies)
    policies = list(case.policies)
    for node in NODES:
        tables = lowering.node(node.name).tables
        got = {
            (e.endpoint_id, e.address, e.protocol, e.port): e
            for e in service_verdicts(tables, table)
        }
        for endpoint in tables.endpoints:
            for svc in table:
                if svc.address.version != endpoint.address.version:
                    continue
                wants = [
                    judge(
                        case.state,
                        policies,
                        Flow(endpoint.address, backend, PROTOCOLS[svc.protocol], port),
                        Direction.EGRESS,
                    )
                    for backend, port in svc.backends
                ]
                entry = got.get((endpoint.endpoint_id, svc.address, svc.protocol, svc.port))
                if entry is None:  # no egress policy: the reference allows every backend
                    assert all(w.allowed for w in wants), (endpoint, svc)
                    continue
                if not wants:
                    assert (entry.action, entry.rule_id, entry.no_backends) == (
                        ir.Action.DENY,
                        ir.RULE_NONE,
                        True,
                    )
                    continue
                allowed = all(w.allowed for w in wants)
                assert (entry.action is ir.Action.ALLOW) == allowed, (endpoint, svc)
                assert not entry.no_backends
                decider = next((w for w in wants if not w.allowed), wants[0])
                want_rule = (
                    (
                        decider.rule.kind.value,
                        decider.rule.namespace,
                        decider.rule.name,
                        decider.rule.index,
                    )
                    if decider.rule
                    else None
                )
                assert _rule(tables, entry.rule_id) == want_rule, (endpoint, svc)


# --- the operator's table from EndpointSlices ---------------------------------------------------

SERVICE = {
    "metadata": {"name": "db", "namespace": "shop"},
    "spec": {
        "clusterIPs": ["10.96.7.7", "fd96::7"],
        "ports": [
            {"name": "pg", "port": 5432, "targetPort": "pg", "nodePort": 31000},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "bad", "port": 70000},
        ],
    },
}


def _slice(
    name: str, family: str, ports: list[dict], endpoints: list[dict], service: str = "db"
) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }


SLICES = [
    # the named target port "pg" is 5432 on these backends ...
    _slice(
        "db-a",
        "IPv4",
        [
            {"name": "pg", "port": 5432, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ],
        [
            {"addresses": ["10.244.0.2"], "conditions": {"ready": True}},
            {"addresses": ["10.244.0.3"]},  # no conditions: ready
            {"addresses": ["10.244.0.4"], "conditions": {"ready": False, "serving": True}},
            {"addresses": ["fd00::9", "garbage"]},  # another family's address in an IPv4 slice
        ],
    ),
    # ... and 6432 on this one
    _slice("db-b", "IPv4", [{"name": "pg", "port": 6432}], [{"addresses": ["10.244.1.5"]}]),
    _slice("db-c", "IPv6", [{"name": "pg", "port": 5432}], [{"addresses": ["fd00::2"]}]),
    _slice("db-d", "FQDN", [{"name": "pg", "port": 5432}], [{"addresses": ["db.example"]}]),
    _slice("other", "IPv4", [{"name": "pg", "port": 1}], [{"addresses": ["10.244.9.9"]}], "other"),
]


def _table(node_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()) -> dict:
    slices = [s for s in map(endpoint_slice_from_api, SLICES) if s is not None]
    backends = service_backends({"shop/db": service_from_api(SERVICE)}, slices, node_addresses)
    return {(b.address, b.protocol, b.port): b.backends for b in backends}


def test_the_backends_of_each_service_port_are_its_ready_endpoints_with_their_target_ports() -> (
    None
):
    table = _table()
    assert table[(ip("10.96.7.7"), ir.PROTO_TCP, 5432)] == (
        (ip("10.244.0.2"), 5432),
        (ip("10.244.0.3"), 5432),
        (ip("10.244.1.5"), 6432),  # the named port resolved on this backend
    )
    assert table[(ip("fd96::7"), ir.PROTO_TCP, 5432)] == ((ip("fd00::2"), 5432),)
    assert table[(ip("10.96.7.7"), ir.PROTO_UDP, 53)] == (
        (ip("10.244.0.2"), 5353),
        (ip("10.244.0.3"), 5353),
    )
    # a port that no IPv6 slice names has no backend; an invalid port is no entry
    assert table[(ip("fd96::7"), ir.PROTO_UDP, 53)] == ()
    assert len(table) == 4


def test_node_ports_on_every_node_address_lead_to_the_same_backends() -> None:
    table = _table((ip("172.18.0.10"), ip("fc00::10")))
    assert (
        table[(ip("172.18.0.10"), ir.PROTO_TCP, 31000)]
        == table[(ip("10.96.7.7"), ir.PROTO_TCP, 5432)]
    )
    assert table[(ip("fc00::10"), ir.PROTO_TCP, 31000)] == ((ip("fd00::2"), 5432),)
    assert (ip("172.18.0.10"), ir.PROTO_UDP, 31000) not in table


def test_slices_that_name_no_service_or_family_are_not_read() -> None:
    assert endpoint_slice_from_api({"addressType": "IPv4", "metadata": {"name": "x"}}) is None
    assert endpoint_slice_from_api(SLICES[3]) is None
    assert endpoint_slice_from_api({"metadata": "garbage"}) is None


def test_a_headless_service_has_no_backend_entry() -> None:
    headless = {"spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}
    slices = [s for s in map(endpoint_slice_from_api, SLICES) if s is not None]
    assert service_backends({"shop/db": service_from_api(headless)}, slices) == ()


def test_the_operator_hands_every_node_the_fallback_verdicts_of_its_clients() -> None:

    store = Store()
    store.put_namespace("shop", Namespace("shop", {"kubernetes.io/metadata.name": "shop"}))
    store.put_node("n0", Node("n0", (ip("172.18.0.10"),)))
    store.put_pod("shop/web", Pod("shop", "web", {"app": "web"}, (ip("10.244.0.9"),), "n0"))
    store.put_pod("shop/db", Pod("shop", "db", {"app": "db"}, (ip("10.244.0.2"),), "n0"))
    store.put_service(
        "shop/db",
        ServiceInfo((ip("10.96.7.7"),), False, (ServicePort("pg", ir.PROTO_TCP, 5432),)),
    )
    for s in SLICES[:2]:
        info = endpoint_slice_from_api(s)
        store.put_endpoint_slice(f"shop/{s['metadata']['name']}", info)
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 5432}]}
            ],
        },
    }
    record = parse_record(policy, store.policy)
    assert record is not None
    store.put_policy(record.key, record)
    snap = store.snapshot()
    lowerer = Lowerer(services=True)
    lowerer.desired(snap)
    (entry,) = [e for e in lowerer._encoded["n0"][0][0].service_verdicts]
    # 10.244.0.3 and 10.244.1.5 are no pods: the egress rule allows only the db pod
    assert (entry.address, entry.port, entry.action) == (ip("10.96.7.7"), 5432, ir.Action.DENY)


def test_the_verdicts_are_computed_again_only_when_tables_or_backends_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real = lowering_module.service_verdicts

    def counted(tables: ir.NodeTables, backends: Any) -> tuple[ir.ServiceVerdictEntry, ...]:
        calls.append("x")
        return real(tables, backends)

    monkeypatch.setattr(lowering_module, "service_verdicts", counted)
    store = Store()
    store.put_node("n0", Node("n0", (ip("172.18.0.10"),)))
    store.put_service(
        "shop/db", ServiceInfo((ip("10.96.7.7"),), False, (ServicePort("pg", ir.PROTO_TCP, 5432),))
    )
    lowerer = Lowerer(services=True)
    lowerer.desired(store.snapshot())
    lowerer.desired(store.snapshot())
    assert len(calls) == 1
    store.put_endpoint_slice("shop/db-b", endpoint_slice_from_api(SLICES[1]))
    lowerer.desired(store.snapshot())
    assert len(calls) == 2
