"""stockade-cni as a container runtime runs it, with no agent listening: ADD fails (fail closed,
the runtime retries the pod) or, with `failOpen`, prints the previous result unchanged; DEL
succeeds (DEL must be idempotent, the agent detaches leftovers on its next sync); an ADD with no
previous result (the plugin chained first, or alone) is refused, naming it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stockade.sandbox.toolchain import STOCKADE_CNI, ensure

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "vethabc", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0"}],
}


def relay(
    command: str, socket: Path, *, fail_open: bool = False, prev: Any = PREV
) -> subprocess.CompletedProcess[str]:
    ensure((STOCKADE_CNI,))
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "stockade-cni",
        "socket": str(socket),
        "failOpen": fail_open,
    }
    if prev is not None:
        conf["prevResult"] = prev
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
        "CNI_PATH": str(STOCKADE_CNI.bin_dir),
    }
    return subprocess.run(
        [str(STOCKADE_CNI.path("stockade-cni"))],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_add_with_the_agent_down_fails_closed(tmp_path: Path) -> None:
    done = relay("ADD", tmp_path / "absent.sock")
    assert done.returncode != 0
    assert "the stockade agent is unreachable" in json.loads(done.stdout)["msg"]


def test_add_with_the_agent_down_and_fail_open_returns_the_previous_result(
    tmp_path: Path,
) -> None:
    done = relay("ADD", tmp_path / "absent.sock", fail_open=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == PREV


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_del_with_the_agent_down_succeeds(tmp_path: Path, fail_open: bool) -> None:
    for _ in range(2):
        done = relay("DEL", tmp_path / "absent.sock", fail_open=fail_open, prev=None)
        assert done.returncode == 0, done.stdout + done.stderr


def test_add_without_a_previous_result_is_refused(tmp_path: Path) -> None:
    done = relay("ADD", tmp_path / "absent.sock", fail_open=True, prev=None)
    assert done.returncode != 0
    assert "no prevResult" in json.loads(done.stdout)["msg"]
