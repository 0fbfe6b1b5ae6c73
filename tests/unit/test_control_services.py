"""The Service address space the operator hands every node: read from Services and
ServiceCIDRs as the API server sends them (malformed fields are absent, never an error),
node addresses on the NodePort range only when some Service has node ports, and every node's
tables and Shape carrying it when the operator's service space is on."""

from __future__ import annotations

import ipaddress

from stockade import handoff
from stockade.compiler import ir
from stockade.control.lowering import Lowerer
from stockade.control.policies import PolicyRecord
from stockade.control.services import (
    ServiceInfo,
    service_cidr_from_api,
    service_from_api,
    service_space,
)
from stockade.control.store import Store
from stockade.model.cluster import Namespace, Node
from stockade.model.parse import parse_policy

net = ipaddress.ip_network
ip = ipaddress.ip_address

SERVICE = {
    "metadata": {"name": "db", "namespace": "shop"},
    "spec": {
        "clusterIP": "10.96.7.7",
        "clusterIPs": ["10.96.7.7", "fd96::7"],
        "externalIPs": ["198.51.100.7", "not-an-address"],
        "ports": [{"port": 5432, "targetPort": "pg", "nodePort": 31000}],
    },
    "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "lb.example"}]}},
}


def test_a_service_gives_its_cluster_external_and_load_balancer_addresses() -> None:
    info = service_from_api(SERVICE)
    assert info.addresses == (ip("10.96.7.7"), ip("fd96::7"), ip("198.51.100.7"), ip("203.0.113.9"))
    assert info.node_ports


def test_a_headless_or_malformed_service_gives_nothing_and_raises_nothing() -> None:
    headless = {"spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}}
    assert service_from_api(headless) == ServiceInfo((), False)
    assert service_from_api({"spec": "garbage", "status": 7}) == ServiceInfo((), False)


def test_a_service_cidr_gives_its_networks() -> None:
    obj = {"spec": {"cidrs": ["10.96.0.0/12", "fd96::/108", "nonsense", "10.96.0.0/12"]}}
    assert service_cidr_from_api(obj) == (net("10.96.0.0/12"), net("fd96::/108"))


def test_node_addresses_count_on_the_node_port_range_only_when_a_service_has_node_ports() -> None:
    nodes = [ip("172.18.0.2"), ip("10.96.0.9")]  # the second inside the Service CIDR
    cluster_ip = ServiceInfo((ip("10.96.7.7"),), False)
    node_port = ServiceInfo((ip("10.96.7.8"),), True)
    without = service_space([net("10.96.0.0/12")], [cluster_ip], nodes)
    assert {(str(e.network), e.port_min, e.port_max) for e in without} == {
        ("10.96.0.0/12", 0, 0),
        ("10.96.7.7/32", 0, 0),
    }
    with_node_ports = service_space(
        [net("10.96.0.0/12")], [cluster_ip, node_port], nodes, (30000, 30100)
    )
    assert ("172.18.0.2/32", 30000, 30100) in {
        (str(e.network), e.port_min, e.port_max) for e in with_node_ports
    }
    assert not any(str(e.network) == "10.96.0.9/32" for e in with_node_ports)


def test_service_cidrs_from_the_api_win_over_the_configured_ones() -> None:
    store = Store()
    store.configured_cidrs = (net("10.0.0.0/16"),)
    assert [e.network for e in store.snapshot().service_space] == [net("10.0.0.0/16")]
    store.put_service_cidr("kubernetes", (net("10.96.0.0/12"),))
    assert [e.network for e in store.snapshot().service_space] == [net("10.96.0.0/12")]
    store.put_service_cidr("kubernetes", None)
    assert [e.network for e in store.snapshot().service_space] == [net("10.0.0.0/16")]


def test_a_service_change_asks_for_a_lowering_and_an_unchanged_one_does_not() -> None:
    asked: list[bool] = []
    store = Store(on_change=asked.append)
    store.put_service("shop/db", service_from_api(SERVICE))
    store.put_service("shop/db", service_from_api(SERVICE))
    assert asked == [True]


def test_with_service_space_on_every_node_gets_it_and_a_shape_with_services() -> None:
    store = Store()
    store.put_node("n1", Node("n1", (ip("172.18.0.2"),)))
    store.put_service("shop/db", service_from_api(SERVICE))
    store.put_service_cidr("kubernetes", (net("10.96.0.0/12"),))
    snap = store.snapshot()
    tables, program = handoff.decode(Lowerer(services=True).desired(snap)["n1"])
    assert program.shape.services
    assert set(tables.services) == set(snap.service_space)
    assert ir.ServiceEntry(net("172.18.0.2/32"), 30000, 32767) in tables.services
    off_tables, off_program = handoff.decode(Lowerer().desired(snap)["n1"])
    assert not off_program.shape.services and off_tables.services == ()


def test_every_node_gets_the_namespaces_where_a_new_pod_may_open_at_once() -> None:
    store = Store()
    store.put_node("n1", Node("n1", (ip("172.18.0.2"),)))
    for name in ("shop", "free"):
        store.put_namespace(name, Namespace(name, {"kubernetes.io/metadata.name": name}))
    policy = parse_policy(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "shop"},
            "spec": {"podSelector": {}},
        }
    )
    record = PolicyRecord(policy.kind, "shop", "deny", "u1", 1, policy)
    lowerer = Lowerer()
    assert handoff.decode(lowerer.desired(store.snapshot())["n1"])[1].open_namespaces == {
        "shop",
        "free",
    }
    store.put_policy(record.key, record)
    _, program = handoff.decode(lowerer.desired(store.snapshot())["n1"])
    assert program.open_namespaces == {"free"}
