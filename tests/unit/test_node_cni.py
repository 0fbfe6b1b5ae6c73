"""The pure parts of the sandbox's CNI runtime: the per-node conflist, the per-plugin config with
name, version and prevResult injected (libcni's buildOneConfig), CNI_ARGS, the plugin environment,
result parsing, error objects, and the order in which ADD, CHECK and DEL chain the plugins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stockade.sandbox.node import cni
from stockade.sandbox.node.cni import (
    CniError,
    NetworkList,
    PodRef,
    Runtime,
    RuntimeConf,
    build_one_config,
    cni_args,
    describe_error,
    parse_result,
    plugin_env,
    pod_args,
)
from stockade.sandbox.node.network import node_conflist
from stockade.sandbox.topology import node_net

NODE = node_net("ut0", 3)


def test_the_routed_conflist_is_ptp_with_host_local_over_both_pod_cidrs(tmp_path: Path) -> None:
    conf = node_conflist(NODE, "routed", tmp_path / "ipam")
    assert conf["cniVersion"] == "1.0.0"
    (ptp,) = conf["plugins"]
    assert ptp["type"] == "ptp"
    ipam = ptp["ipam"]
    assert ipam["type"] == "host-local"
    assert ipam["dataDir"] == str(tmp_path / "ipam")
    assert [r[0]["subnet"] for r in ipam["ranges"]] == ["10.244.3.0/24", "fd00:10:244:3::/64"]
    assert [r[0]["rangeStart"] for r in ipam["ranges"]] == ["10.244.3.128", "fd00:10:244:3::1:1"]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]


def test_the_bridge_conflist_names_the_nodes_bridge_as_gateway(tmp_path: Path) -> None:
    (bridge,) = node_conflist(NODE, "bridge", tmp_path, bridge="stkut0br")["plugins"]
    assert (bridge["type"], bridge["bridge"], bridge["isGateway"]) == ("bridge", "stkut0br", True)
    with pytest.raises(CniError, match="bridge's name"):
        node_conflist(NODE, "bridge", tmp_path)


def test_the_runtime_reads_the_first_conflist_by_name(tmp_path: Path) -> None:
    cni.write_conflist(
        tmp_path, {"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "x"}]}, "20-b.conflist"
    )
    cni.write_conflist(
        tmp_path, {"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "y"}]}, "10-a.conflist"
    )
    assert cni.load_conflist(tmp_path).name == "a"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cniVersion": "1.0.0", "name": "bad name", "plugins": [{"type": "ptp"}]}, "'name'"),
        ({"name": "n", "plugins": [{"type": "ptp"}]}, "'cniVersion'"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "'plugins'"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"ipam": {}}]}, r"'plugins\[0\].type'"),
    ],
    ids=["name", "version", "no-plugins", "no-type"],
)
def test_a_bad_conflist_is_rejected_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(CniError, match=field):
        NetworkList.of(data)


def test_each_plugin_gets_the_list_name_version_and_the_previous_result() -> None:
    first = build_one_config("net", "1.0.0", {"type": "ptp", "name": "ignored"}, None)
    assert first == {"type": "ptp", "name": "net", "cniVersion": "1.0.0"}
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
    second = build_one_config("net", "1.0.0", {"type": "tuning"}, prev)
    assert second["prevResult"] == prev


def test_cni_args_carry_the_pod_as_containerd_passes_it() -> None:
    args = pod_args(PodRef("ns1", "web", "u-1"), "cid")
    assert cni_args(args) == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=cid;K8S_POD_UID=u-1"
    )
    with pytest.raises(CniError, match="K8S_POD_NAME"):
        cni_args([("K8S_POD_NAME", "a;b")])


def test_the_plugin_environment_replaces_inherited_cni_variables(tmp_path: Path) -> None:
    rt = RuntimeConf("cid", "stk-x-pod-1", "eth0", (("A", "1"),))
    env = plugin_env("ADD", rt, tmp_path, {"PATH": "/bin", "CNI_COMMAND": "DEL", "CNI_X": "y"})
    assert env == {
        "PATH": "/bin",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "cid",
        "CNI_NETNS": "/var/run/netns/stk-x-pod-1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "A=1",
        "CNI_PATH": str(tmp_path),
    }


def test_a_result_gives_the_pod_ips_v4_first() -> None:
    result = {
        "ips": [
            {"address": "fd00:10:244:3::1:2/64", "gateway": "fd00:10:244:3::1"},
            {"address": "10.244.3.128/24", "gateway": "10.244.3.1"},
        ]
    }
    got = parse_result(result)
    assert got.ips == ("10.244.3.128", "fd00:10:244:3::1:2")
    assert (got.ip_v4, got.ip_v6) == ("10.244.3.128", "fd00:10:244:3::1:2")
    with pytest.raises(CniError, match=r"'ips\[0\].address'"):
        parse_result({"ips": [{"address": "nope"}]})


def test_a_plugin_error_object_is_reported_with_code_and_message() -> None:
    out = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "bad config", "details": "x"})
    assert describe_error(out.encode(), b"", 1) == "[code 7] bad config (x)"
    assert describe_error(b"", b"panic: boom\n", 2) == "exit status 2: panic: boom"


def test_add_chains_results_check_and_del_use_the_cache_del_in_reverse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, Any]] = []

    def fake_exec(
        self: Runtime,
        command: str,
        net: NetworkList,
        plugin: dict[str, Any],
        conf: dict[str, Any],
        rt: RuntimeConf,
    ) -> dict[str, Any] | None:
        calls.append((command, plugin["type"], conf.get("prevResult")))
        return {"from": plugin["type"]} if command == "ADD" else None

    monkeypatch.setattr(Runtime, "_exec", fake_exec)
    net = NetworkList.of(
        {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}, {"type": "b"}]}
    )
    runtime = Runtime(tmp_path, tmp_path / "cache", "stk-node")
    rt = RuntimeConf("cid", "stk-pod", "eth0")
    assert runtime.add(net, rt) == {"from": "b"}
    runtime.check(net, rt)
    runtime.delete(net, rt)
    assert calls == [
        ("ADD", "a", None),
        ("ADD", "b", {"from": "a"}),
        ("CHECK", "a", {"from": "b"}),
        ("CHECK", "b", {"from": "b"}),
        ("DEL", "b", {"from": "b"}),
        ("DEL", "a", {"from": "b"}),
    ]
    assert not runtime.cache_file("n", rt).exists()
    with pytest.raises(CniError, match="no cached result"):
        runtime.check(net, rt)


def test_the_plugin_directory_comes_from_the_argument_the_environment_or_the_toolchain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCKADE_CNI_BIN", "/opt/x")
    assert cni.plugin_dir() == Path("/opt/x")
    assert cni.plugin_dir("/opt/y") == Path("/opt/y")
    monkeypatch.delenv("STOCKADE_CNI_BIN")
    built: list[object] = []
    monkeypatch.setattr(cni, "ensure", built.append)
    assert cni.plugin_dir() == cni.CNI_PLUGINS.bin_dir
    assert built == [(cni.CNI_PLUGINS,)]

    def fails(_: object) -> None:
        raise cni.ToolchainError("go is not on PATH")

    monkeypatch.setattr(cni, "ensure", fails)
    with pytest.raises(CniError, match="STOCKADE_CNI_BIN"):
        cni.plugin_dir()


def test_a_list_with_disable_check_is_not_checked(tmp_path: Path) -> None:
    net = NetworkList.of(
        {"cniVersion": "1.0.0", "name": "n", "disableCheck": True, "plugins": [{"type": "a"}]}
    )
    # No cached result and no plugin binary: a CHECK that ran would fail.
    Runtime(tmp_path, tmp_path / "cache", "stk-node").check(net, RuntimeConf("c", "p", "eth0"))
    with pytest.raises(CniError, match="'disableCheck'"):
        NetworkList.of(
            {"cniVersion": "1.0.0", "name": "n", "disableCheck": "yes", "plugins": [{"type": "a"}]}
        )
