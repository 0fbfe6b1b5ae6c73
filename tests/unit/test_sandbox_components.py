"""The sandbox's Kubernetes components are started as intended: the controller manager and the
scheduler with their own identities, no leader election and loopback-only serving; kube-proxy
inside its node namespace, leaving the machine-wide conntrack limit alone, with one cluster CIDR
per family covering every node; `stockade sandbox up` refuses an unknown proxy mode; a Pod
refused only because its namespace's ServiceAccount is not there yet is created again; and
processes stopped together each end, one that ignores SIGTERM by SIGKILL."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes.client.exceptions import ApiException

from stockade.sandbox import session
from stockade.sandbox.controlplane.pki import COMPONENT_USERS, PkiPaths, write_pki
from stockade.sandbox.controlplane.server import (
    CONTROLLERS,
    SERVICE_CIDRS,
    controller_manager_argv,
    scheduler_argv,
    scheduler_config,
    write_kubeconfig,
)
from stockade.sandbox.node import registration as kubelet
from stockade.sandbox.node.proxy import (
    FORWARDER_SCRIPT,
    check_mode,
    cluster_cidrs,
    forwarder_argv,
    proxy_argv,
    synced_families,
)
from stockade.sandbox.processes import Child, ProcessRecord, is_alive, stop_all, stop_records
from stockade.sandbox.topology import node_net


def flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


# -- the controller manager and the scheduler ---------------------------------------------------


def test_the_controller_manager_runs_only_the_listed_controllers_as_their_own_accounts(
    tmp_path: Path,
) -> None:
    pki = PkiPaths.in_dir(tmp_path / "pki")
    argv = controller_manager_argv(
        Path("/bin/kcm"), tmp_path, pki, tmp_path / "kcm.kubeconfig", 4242
    )
    got = flags(argv)
    assert argv[0] == "/bin/kcm"
    assert got["kubeconfig"] == str(tmp_path / "kcm.kubeconfig")
    assert got["leader-elect"] == "false"
    assert (got["bind-address"], got["secure-port"]) == ("127.0.0.1", "4242")
    assert got["controllers"].split(",") == list(CONTROLLERS)
    assert {"namespace-controller", "serviceaccount-controller"} <= set(CONTROLLERS)
    assert got["service-account-private-key-file"] == str(pki.sa_signing_key)
    assert got["root-ca-file"] == str(pki.ca_cert)
    assert got["use-service-account-credentials"] == "true"


def test_the_scheduler_reads_its_kubeconfig_from_a_configuration_without_leader_election(
    tmp_path: Path,
) -> None:
    config = scheduler_config(tmp_path / "sched.kubeconfig")
    assert config["kind"] == "KubeSchedulerConfiguration"
    assert config["clientConnection"]["kubeconfig"] == str(tmp_path / "sched.kubeconfig")
    assert config["leaderElection"] == {"leaderElect": False}
    got = flags(scheduler_argv(Path("/bin/ks"), tmp_path, tmp_path / "s.yaml", 4343))
    assert got["config"] == str(tmp_path / "s.yaml")
    assert (got["bind-address"], got["secure-port"]) == ("127.0.0.1", "4343")


def test_the_service_range_is_dual_stack_with_ipv4_first() -> None:
    assert SERVICE_CIDRS == ("10.96.0.0/16", "fd00:10:96::/112")


@pytest.mark.parametrize("component", sorted(COMPONENT_USERS))
def test_each_component_has_a_client_certificate_naming_its_bootstrap_rbac_user(
    tmp_path: Path, component: str
) -> None:
    paths = write_pki(tmp_path, "10.96.0.1")
    where = paths.component(component)
    cert = x509.load_pem_x509_certificate(where.cert.read_bytes())
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == COMPONENT_USERS[component]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert where.key.stat().st_mode & 0o077 == 0


def test_an_unknown_component_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="component 'kubelet'"):
        PkiPaths.in_dir(tmp_path).component("kubelet")


def test_a_component_kubeconfig_stands_alone_and_is_private(tmp_path: Path) -> None:
    paths = write_pki(tmp_path / "pki", "10.96.0.1")
    client = paths.component("kube-proxy")
    path = tmp_path / "kp.kubeconfig"
    write_kubeconfig(
        path, "https://127.0.0.1:6443", paths.ca_cert, client.cert, client.key, "system:kube-proxy"
    )
    config: Any = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert [u["name"] for u in config["users"]] == ["system:kube-proxy"]
    assert "client-key-data" in config["users"][0]["user"]
    assert path.stat().st_mode & 0o077 == 0


# -- kube-proxy ---------------------------------------------------------------------------------


def test_one_cluster_cidr_per_family_covers_every_node() -> None:
    nodes = [node_net("ab1", i) for i in (1, 2, 3)]
    assert cluster_cidrs(nodes) == ["10.244.0.0/22", "fd00:10:244::/62"]
    assert cluster_cidrs(nodes[:1]) == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    with pytest.raises(ValueError, match="nodes"):
        cluster_cidrs([])


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_kube_proxy_runs_inside_its_node_namespace_as_that_node(mode: str) -> None:
    nodes = [node_net("ab1", 1), node_net("ab1", 2)]
    argv = proxy_argv(Path("/bin/kp"), nodes[1], nodes, Path("/k/kp.kubeconfig"), check_mode(mode))
    assert argv[:5] == ["ip", "netns", "exec", "stk-ab1-node2", "/bin/kp"]
    got = flags(argv)
    assert got["proxy-mode"] == mode
    assert got["hostname-override"] == "node-2"
    assert got["cluster-cidr"] == "10.244.0.0/22,fd00:10:244::/62"
    assert got["conntrack-max-per-core"] == "0"
    assert got["kubeconfig"] == "/k/kp.kubeconfig"
    assert got["healthz-bind-address"].startswith("127.0.0.1:")
    assert got["metrics-bind-address"].startswith("127.0.0.1:")


def test_kube_proxy_counts_as_synced_per_family_once_its_sync_timestamp_is_set() -> None:
    metrics = "\n".join(
        [
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds [ALPHA] The last time",
            'kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 1.79e+09',
            'kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv6"} 0',
            'kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv6"} 1',
        ]
    )
    assert synced_families(metrics) == {"IPv4"}
    assert synced_families("") == set()


def test_an_unknown_proxy_mode_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="proxy mode 'ipvs'"):
        check_mode("ipvs")


def test_the_forwarder_listens_on_the_nodes_loopback_and_targets_the_api_server() -> None:
    node = node_net("ab1", 1)
    argv = forwarder_argv(node, ("127.0.0.1", 41234), Path("/s/ready"))
    assert argv[1:3] == ["-I", str(FORWARDER_SCRIPT)]
    got = flags(argv)
    assert got == {
        "netns": "stk-ab1-node1",
        "listen": "127.0.0.1:6443",
        "target": "127.0.0.1:41234",
        "ready-file": "/s/ready",
    }


def test_sandbox_up_refuses_an_unknown_proxy_mode_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(session.SandboxError, match="--proxy-mode"):
        session.up(tmp_path / "state", 1, "routed", lambda _: None, proxy_mode="ipvs")  # type: ignore[arg-type]
    assert not (tmp_path / "state").exists()


def test_the_sandbox_state_keeps_the_proxy_mode_and_processes(tmp_path: Path) -> None:
    record = ProcessRecord("kube-proxy node-1", 123, 456, tmp_path / "kp.log")
    state = session.SandboxState("r1", "now", 1, "routed", proxy_mode="iptables", proxies=(record,))
    state.save(tmp_path)
    assert session.SandboxState.load(tmp_path) == state


# -- Pods created before their namespace's ServiceAccount exists ---------------------------------


class FakeCore:
    def __init__(self, failures: list[ApiException]) -> None:
        self.failures = failures
        self.calls = 0

    def create_namespaced_pod(self, namespace: str, pod: Any) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return f"{namespace}/{pod.metadata.name}"


def refusal(status: int, body: str) -> ApiException:
    return ApiException(status=status, reason="refused", body=body)


NO_SA = (
    'pods "p" is forbidden: error looking up service account ns/default: '
    'serviceaccount "default" not found'
)
POD = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}


def test_a_pod_refused_for_a_missing_service_account_is_created_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = FakeCore([refusal(403, NO_SA), refusal(403, NO_SA)])
    monkeypatch.setattr(kubelet, "CoreV1Api", lambda api: core)
    monkeypatch.setattr(kubelet.time, "sleep", lambda s: None)
    assert kubelet.create_pod(object(), "ns", POD) == "ns/p"
    assert core.calls == 3


def test_a_pod_refused_for_another_reason_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    core = FakeCore([refusal(403, 'pods "p" is forbidden: exceeded quota')])
    monkeypatch.setattr(kubelet, "CoreV1Api", lambda api: core)
    with pytest.raises(ApiException, match="refused"):
        kubelet.create_pod(object(), "ns", POD)
    assert core.calls == 1


def test_retrying_a_missing_service_account_gives_up_after_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = FakeCore([refusal(403, NO_SA) for _ in range(1000)])
    clock = iter(range(0, 100000, 5))
    monkeypatch.setattr(kubelet, "CoreV1Api", lambda api: core)
    monkeypatch.setattr(kubelet.time, "sleep", lambda s: None)
    monkeypatch.setattr(kubelet.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(ApiException) as refused:
        kubelet.create_pod(object(), "ns", POD)
    assert "service account" in str(refused.value.body)
    assert 1 < core.calls < 1000


# Ignores SIGTERM, then says so on its log.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ignoring SIGTERM', flush=True); time.sleep(60)"
)


def _stubborn(log: Path, *, detach: bool) -> Child:
    child = Child.spawn("stubborn", [sys.executable, "-c", STUBBORN], log, detach=detach)
    while "ignoring SIGTERM" not in log.read_text():
        assert child.running(), log.read_text()
        time.sleep(0.02)
    return child


def test_stopping_processes_together_ends_each_and_kills_one_that_ignores_sigterm(
    tmp_path: Path,
) -> None:
    """`stop_all` (children) and `stop_records` (processes another run started) SIGTERM every
    process first and SIGKILL what still runs after the grace period."""
    children = [
        Child.spawn("polite", ["sleep", "60"], tmp_path / "polite.log", detach=False),
        _stubborn(tmp_path / "stubborn.log", detach=False),
    ]
    stop_all(children, grace=0.5)
    assert [c.popen.returncode for c in children if c.popen] == [-signal.SIGTERM, -signal.SIGKILL]
    detached = [
        Child.spawn("polite", ["sleep", "60"], tmp_path / "d-polite.log", detach=True),
        _stubborn(tmp_path / "d-stubborn.log", detach=True),
    ]
    stop_records([c.record for c in detached], grace=0.5)
    assert not any(is_alive(c.record) for c in detached)
    for child in detached:
        assert child.popen is not None
        child.popen.wait()  # reap them here
    assert [c.popen.returncode for c in detached if c.popen] == [-signal.SIGTERM, -signal.SIGKILL]
