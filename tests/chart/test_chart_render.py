"""The chart as rendered by `helm lint` and `helm template`, under several values scenarios.

Assertions are on the rendered objects: a schema alone does not catch a template that refers to
a value that does not exist, or RBAC that drifts from what the code needs (tests/chart/access.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.chart.access import required
from tests.chart.chart import (
    CHART,
    NAMESPACE,
    default_values,
    expand,
    find,
    helm,
    kinds,
    merge,
    render,
    roles_of,
    template,
    without_feature,
)

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "single operator without leader election": {
        "operator": {"replicas": 1, "leaderElection": {"enabled": False}}
    },
    "no upstream ClusterNetworkPolicy": {"operator": {"upstreamClusterNetworkPolicy": False}},
    "Service space": {"operator": {"serviceSpace": True}, "agent": {"serviceMode": "netfilter"}},
    "agent only": {"operator": {"enabled": False}},
    "operator only": {"agent": {"enabled": False}},
    "metrics off": {
        "operator": {"metrics": {"enabled": False}},
        "agent": {"metrics": {"enabled": False}},
    },
    "existing service accounts and digests": {
        "operator": {
            "serviceAccount": {"create": False, "name": "ops"},
            "image": {"digest": "sha256:" + "a" * 64},
        },
        "agent": {"serviceAccount": {"create": False, "name": "nodes"}},
    },
    "agent node scope policy off": {"agent": {"nodeScopePolicy": False}},
    "bpffs mounted by the chart, custom lease": {
        "agent": {"bpffs": {"mountIfMissing": True}},
        "operator": {"leaderElection": {"leaseName": "elect-me"}},
    },
}


CLUSTER_KINDS = (
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)
POLICY = "stockade-agent-node-scope"


def service_account(objects: list[dict[str, Any]], component: str) -> str | None:
    kind = "Deployment" if component == "operator" else "DaemonSet"
    for obj in objects:
        if obj["kind"] == kind:
            name: str = obj["spec"]["template"]["spec"]["serviceAccountName"]
            return name
    return None


def test_helm_lint_passes_with_no_warnings() -> None:
    out = helm("lint", str(CHART), "--strict").stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("overrides", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_rbac_grants_exactly_what_the_enabled_features_need(overrides: dict[str, Any]) -> None:
    values = merge(default_values(), overrides)
    objects = render(overrides)
    for component in ("operator", "agent"):
        needed = without_feature(required(component, values))
        sa = service_account(objects, component)
        granted = set().union(*(expand(r) for r in roles_of(objects, sa))) if sa else set()
        assert granted == needed, (
            f"{component}: granted but not needed: {sorted(map(str, granted - needed))}; "
            f"needed but not granted: {sorted(map(str, needed - granted))}"
        )


@pytest.mark.parametrize("overrides", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_every_object_is_labelled_and_namespaced_in_the_release(overrides: dict[str, Any]) -> None:
    for obj in render(overrides):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "stockade", kinds([obj])
        if obj["kind"] not in CLUSTER_KINDS:
            assert obj["metadata"]["namespace"] == NAMESPACE, kinds([obj])


def test_disabled_components_render_nothing_of_theirs() -> None:
    agent_only = kinds(render(SCENARIOS["agent only"]))
    assert not [k for k in agent_only if "operator" in k]
    operator_only = kinds(render(SCENARIOS["operator only"]))
    assert not [k for k in operator_only if "agent" in k]


def test_operator_runs_two_leader_elected_replicas_locked_down() -> None:
    deploy = find(render(), "Deployment", "stockade-operator")
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert container["command"] == ["stockade"]
    assert container["args"] == ["operator", "--leader-election"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert env["STOCKADE_LEASE_NAME"]["value"] == "stockade-operator"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["STOCKADE_LOWERING"]["value"] == "process"  # a worker process: docs/install.md


def test_the_lowering_value_reaches_the_operator() -> None:
    deploy = find(render({"operator": {"lowering": "thread"}}), "Deployment", "stockade-operator")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STOCKADE_LOWERING"]["value"] == "thread"


def test_operator_without_leader_election_runs_one_replica_without_the_flag() -> None:
    deploy = find(
        render(SCENARIOS["single operator without leader election"]),
        "Deployment",
        "stockade-operator",
    )
    assert deploy["spec"]["replicas"] == 1
    assert "--leader-election" not in deploy["spec"]["template"]["spec"]["containers"][0]["args"]


def test_agent_runs_on_every_node_with_only_bpf_net_admin_and_perfmon() -> None:
    ds = find(render(), "DaemonSet", "stockade-agent")
    pod = ds["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "agent"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert "initContainers" not in pod
    assert container["args"] == ["agent", "--node", "$(NODE_NAME)"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    rolling = ds["spec"]["updateStrategy"]
    assert rolling == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }


def test_agent_writes_are_scoped_to_its_node_by_an_admission_policy_by_default() -> None:
    objects = render()
    policy = find(objects, "ValidatingAdmissionPolicy", POLICY)["spec"]
    binding = find(objects, "ValidatingAdmissionPolicyBinding", POLICY)["spec"]
    assert binding == {"policyName": POLICY, "validationActions": ["Deny"]}
    assert policy["failurePolicy"] == "Fail"
    (condition,) = policy["matchConditions"]
    user = "system:serviceaccount:stockade-system:stockade-agent"
    assert condition["expression"] == f'request.userInfo.username == "{user}"'
    (rule,) = policy["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["datapathtables", "datapathtables/status"]
    assert all(v["reason"] == "Forbidden" for v in policy["validations"])
    # kubelet binds the token it mounts to the pod: the agent's token names its node
    ds = find(objects, "DaemonSet", "stockade-agent")["spec"]["template"]["spec"]
    assert ds.get("automountServiceAccountToken", True) is True


def test_the_node_scope_policy_names_an_existing_agent_service_account() -> None:
    objects = render(SCENARIOS["existing service accounts and digests"])
    policy = find(objects, "ValidatingAdmissionPolicy", POLICY)["spec"]
    user = "system:serviceaccount:stockade-system:nodes"
    assert policy["matchConditions"][0]["expression"] == f'request.userInfo.username == "{user}"'


@pytest.mark.parametrize("overrides", ["agent node scope policy off", "operator only"])
def test_no_node_scope_policy_when_it_or_the_agent_is_off(overrides: str) -> None:
    rendered = kinds(render(SCENARIOS[overrides]))
    assert not [k for k in rendered if k.startswith("ValidatingAdmissionPolicy")]


def test_agent_mounts_the_node_bpffs_with_host_to_container_propagation() -> None:
    pod = find(render(), "DaemonSet", "stockade-agent")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["bpffs"] == {
        "name": "bpffs",
        "mountPath": "/sys/fs/bpf",
        "mountPropagation": "HostToContainer",
    }
    assert volumes["bpffs"]["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
    # besides the CNI plugin's (its socket, the installer's CNI directories), everything else
    # the read-only root needs to write is scratch space
    assert {n for n, v in volumes.items() if "hostPath" in v} == {
        "bpffs",
        "cni-socket",
        "cni-conf",
        "cni-bin",
    }
    assert {mounts["tmp"]["mountPath"], mounts["compile-cache"]["mountPath"]} == {
        "/tmp",
        "/var/cache/stockade",
    }


def test_only_the_optional_bpffs_init_container_is_privileged() -> None:
    objects = render(SCENARIOS["bpffs mounted by the chart, custom lease"])
    pod = find(objects, "DaemonSet", "stockade-agent")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert init["volumeMounts"][0]["mountPropagation"] == "Bidirectional"
    assert pod["volumes"][0]["hostPath"]["type"] == "DirectoryOrCreate"
    assert pod["containers"][0]["securityContext"]["privileged"] is False
    role = find(objects, "Role", "stockade-operator-leader-election")
    assert role["rules"][1]["resourceNames"] == ["elect-me"]


def test_metrics_services_select_their_component_and_name_its_port() -> None:
    objects = render()
    for component, port in (("operator", 9090), ("agent", 9471)):
        svc = find(objects, "Service", f"stockade-{component}-metrics")
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component
        assert svc["spec"]["ports"] == [
            {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
        ]
    assert find(objects, "Service", "stockade-agent-metrics")["spec"]["clusterIP"] == "None"
    assert not [k for k in kinds(render(SCENARIOS["metrics off"])) if k.startswith("Service/")]


def test_images_default_to_the_app_version_and_prefer_a_digest() -> None:
    objects = render(SCENARIOS["existing service accounts and digests"])
    op = find(objects, "Deployment", "stockade-operator")["spec"]["template"]["spec"]
    ag = find(objects, "DaemonSet", "stockade-agent")["spec"]["template"]["spec"]
    assert op["containers"][0]["image"] == "ghcr.io/stockade/operator@sha256:" + "a" * 64
    assert ag["containers"][0]["image"] == "ghcr.io/stockade/agent:0.1.0"
    assert (op["serviceAccountName"], ag["serviceAccountName"]) == ("ops", "nodes")
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]


def test_the_helm_test_probes_the_operator_metrics_service() -> None:
    pod = find(render(), "Pod", "stockade-test-operator-metrics")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert "http://stockade-operator-metrics:9090/metrics" in script


def test_a_missing_service_account_name_is_reported_by_name() -> None:
    proc = template({"agent": {"serviceAccount": {"create": False, "name": ""}}}, check=False)
    assert proc.returncode != 0
    assert "agent.serviceAccount.name is required" in proc.stderr


def test_crds_are_installed_from_the_chart_crds_directory() -> None:
    objects = render(extra=["--include-crds"])
    crds = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition")
    assert "datapathtables.stockade.io" in crds
    assert "networkpolicies.stockade.io" in crds
    assert "clusternetworkpolicies.stockade.io" in crds


@pytest.mark.parametrize(
    ("kind", "name", "component"),
    [("Deployment", "stockade-operator", "operator"), ("DaemonSet", "stockade-agent", "agent")],
    ids=["operator", "agent"],
)
def test_each_component_binds_its_endpoints_to_its_bind_address(
    kind: str, name: str, component: str
) -> None:
    def bind_address(values: dict[str, Any]) -> str:
        containers = find(render(values), kind, name)["spec"]["template"]["spec"]["containers"]
        (container,) = [c for c in containers if c["name"] == component]
        env = {e["name"]: e.get("value") for e in container["env"]}
        address: str = env["STOCKADE_BIND_ADDRESS"]
        return address

    assert bind_address({}) == "0.0.0.0"
    assert bind_address({component: {"bindAddress": "10.1.2.3"}}) == "10.1.2.3"


MONITORING = {
    "monitoring": {
        "dashboard": {"enabled": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
    }
}


def test_the_grafana_dashboard_and_service_monitors_render_only_when_enabled() -> None:
    assert not [k for k in kinds(render()) if k.startswith(("ServiceMonitor/", "ConfigMap/"))]
    objects = render(MONITORING)
    dashboard = find(objects, "ConfigMap", "stockade-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["stockade.json"])["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for series in (
        "stockade_datapath_policy_events_total",
        "stockade_agent_events_lost_total",
        "stockade_agent_policy_apply_seconds_bucket",
    ):
        assert series in exprs
    for component in ("operator", "agent"):
        monitor = find(objects, "ServiceMonitor", f"stockade-{component}")
        service = find(objects, "Service", f"stockade-{component}-metrics")
        selected = monitor["spec"]["selector"]["matchLabels"]
        assert selected.items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
        assert monitor["metadata"]["labels"]["release"] == "kps"
    no_agent_metrics = merge(MONITORING, {"agent": {"metrics": {"enabled": False}}})
    assert "ServiceMonitor/stockade-agent" not in kinds(render(no_agent_metrics))


def test_the_dashboard_queries_only_series_stockade_serves() -> None:
    from tests.unit.test_docs_metrics import documented

    dashboard = find(render(MONITORING), "ConfigMap", "stockade-dashboard")
    text = dashboard["data"]["stockade.json"]
    served = documented() | {"stockade_rule_packets_total"}
    used = set(re.findall(r"\b(stockade_[a-z_]+)\b", text))
    # a histogram's series: its name documented, with _bucket, _sum or _count
    used = {re.sub(r"_(bucket|sum|count)$", "", u) if u not in served else u for u in used}
    assert used and used <= served


def test_the_inspect_roles_grant_reading_and_the_agents_proxy() -> None:
    objects = render()
    cluster_role = find(objects, "ClusterRole", "stockade-inspect")
    verbs = {v for rule in cluster_role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list"}  # reading only
    role = find(objects, "Role", "stockade-inspect")
    assert {"apiGroups": [""], "resources": ["pods/proxy"], "verbs": ["get"]} in role["rules"]
    assert not [k for k in kinds(render({"inspect": {"role": False}})) if "inspect" in k]


def test_the_agent_pod_installs_and_chains_stockade_cni_and_serves_its_socket() -> None:
    pod = find(render(), "DaemonSet", "stockade-agent")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    installer, agent = containers["cni-installer"], containers["agent"]
    assert installer["args"] == [
        "cni-install",
        "--conf-dir=/host/cni/net.d",
        "--bin-dir=/host/cni/bin",
        "--binary=/opt/stockade/bin/stockade-cni",
        "--socket=/run/stockade/cni.sock",
        "--watch=5",
        "--remove-on-exit",
    ]
    assert installer["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cni-conf"]["hostPath"]["path"] == "/etc/cni/net.d"
    assert volumes["cni-bin"]["hostPath"]["path"] == "/opt/cni/bin"
    assert volumes["cni-socket"]["hostPath"]["path"] == "/run/stockade"
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["STOCKADE_CNI_SOCKET"] == "/run/stockade/cni.sock"
    assert env["STOCKADE_PENDING_BUDGET"] == "2"
    assert env["STOCKADE_PENDING_ADD_WAIT"] == "0"
    assert env["STOCKADE_PENDING_ON_TIMEOUT"] == "closed"
    assert {"name": "cni-socket", "mountPath": "/run/stockade"} in agent["volumeMounts"]


def test_the_cni_values_choose_directories_and_fail_open_or_leave_it_out() -> None:
    values = {
        "agent": {
            "cni": {
                "confDir": "/var/lib/cni/conf",
                "binDir": "/home/kubernetes/bin",
                "failOpen": True,
                "pendingBudgetSeconds": 5,
                "addWaitSeconds": 0.5,
            }
        }
    }
    pod = find(render(values), "DaemonSet", "stockade-agent")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert "--fail-open" in containers["cni-installer"]["args"]
    env = {e["name"]: e.get("value") for e in containers["agent"]["env"]}
    assert (env["STOCKADE_PENDING_ON_TIMEOUT"], env["STOCKADE_PENDING_BUDGET"]) == ("open", "5")
    assert env["STOCKADE_PENDING_ADD_WAIT"] == "0.5"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cni-conf"]["hostPath"]["path"] == "/var/lib/cni/conf"
    assert volumes["cni-bin"]["hostPath"]["path"] == "/home/kubernetes/bin"
    off = find(render({"agent": {"cni": {"enabled": False}}}), "DaemonSet", "stockade-agent")
    spec = off["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    assert "STOCKADE_CNI_SOCKET" not in {e["name"] for e in spec["containers"][0]["env"]}
