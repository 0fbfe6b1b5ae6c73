"""The container-runtime side of CNI for sandbox nodes, as libcni (containernetworking/cni
`libcni/api.go`) does it, over the real plugin binaries.

A node's network is a configuration list (`*.conflist`, cniVersion 1.0.0; the runtime reads the
first one in the directory by name, so plugins can be chained in later). For ADD every plugin of
the list runs in order with its own config on stdin plus `name`, `cniVersion` and `prevResult`
(the previous plugin's result) injected, as libcni's `buildOneConfig` does; the final result is
cached (`<cache>/results/<network>-<container id>-<ifname>`, libcni's `cniCacheV1` record).
CHECK runs the plugins in order and DEL in reverse, both with the cached result as `prevResult`;
DEL then drops the cache entry. Plugins run with the NODE namespace as their host namespace
(`ip netns exec <node netns> <plugin>`), with `CNI_NETNS=/var/run/netns/<pod netns>`. A plugin's
error object (`{code, msg, details}` on stdout, non-zero exit) becomes a `CniError` naming the
plugin, the command and the pod.

What the sandbox's nodes configure (ptp or bridge, host-local, loopback) and where their CNI
state lives is `stockade.sandbox.node.network`, which calls this module; so do the node tests.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.sandbox.netns import NETNS_DIR
from stockade.sandbox.toolchain import CNI_PLUGINS, ToolchainError, ensure

CNI_VERSION = "1.0.0"
CONFLIST_FILE = "10-stockade.conflist"
CACHE_KIND = "cniCacheV1"
EXEC_TIMEOUT_S = 60.0
PLUGIN_DIR_ENV = "STOCKADE_CNI_BIN"
_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")  # libcni utils.ValidateContainerID


class CniError(RuntimeError):
    """A CNI operation failed; the message names the plugin, the command and the pod."""


def plugin_dir(explicit: Path | str | None = None) -> Path:
    """Where the CNI plugin binaries are: `explicit` if given, else $STOCKADE_CNI_BIN, else the
    toolchain's build of the reference plugins (built now if it is missing)."""
    chosen = explicit if explicit is not None else os.environ.get(PLUGIN_DIR_ENV)
    if chosen:
        return Path(chosen)
    try:
        ensure((CNI_PLUGINS,))
    except ToolchainError as exc:
        raise CniError(
            f"the CNI plugins could not be built ({exc}); pass a directory holding ptp, bridge, "
            f"host-local and loopback (--cni-bin) or set {PLUGIN_DIR_ENV}"
        ) from exc
    return CNI_PLUGINS.bin_dir


# -- configuration lists --------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkList:
    """A parsed network configuration list, with the bytes it was read from (cached by ADD)."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    raw: bytes
    disable_check: bool = False

    @classmethod
    def parse(cls, raw: bytes, source: str) -> NetworkList:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise CniError(f"{source}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CniError(f"{source}: a network configuration list must be a JSON object")
        name, version, plugins = data.get("name"), data.get("cniVersion"), data.get("plugins")
        if not isinstance(name, str) or not _ID_RE.match(name):
            raise CniError(f"{source}: field 'name' must match {_ID_RE.pattern}, got {name!r}")
        if not isinstance(version, str) or not version:
            raise CniError(f"{source}: field 'cniVersion' must be a version string")
        if not isinstance(plugins, list) or not plugins:
            raise CniError(f"{source}: field 'plugins' must be a non-empty list")
        for i, plugin in enumerate(plugins):
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
                raise CniError(f"{source}: field 'plugins[{i}].type' must be a plugin name")
        disable_check = data.get("disableCheck", False)
        if not isinstance(disable_check, bool):
            raise CniError(f"{source}: field 'disableCheck' must be true or false")
        return cls(name, version, tuple(plugins), raw, disable_check)

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> NetworkList:
        return cls.parse(json.dumps(data, indent=2).encode(), "configuration")


def write_conflist(conf_dir: Path, data: Mapping[str, Any], filename: str = CONFLIST_FILE) -> Path:
    NetworkList.of(data)  # validate before it lands where the runtime reads it
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / filename
    tmp = path.with_name(f".{filename}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_conflist(conf_dir: Path) -> NetworkList:
    """The first `*.conflist` in `conf_dir` by name, as a runtime picks its network."""
    found = sorted(conf_dir.glob("*.conflist"))
    if not found:
        raise CniError(f"no *.conflist in {conf_dir}")
    return NetworkList.parse(found[0].read_bytes(), str(found[0]))


def build_one_config(
    list_name: str,
    cni_version: str,
    plugin: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One plugin's stdin config: its own config with the list's name and version, and the
    previous result as `prevResult` (libcni `buildOneConfig`)."""
    conf = dict(plugin)
    conf["name"] = list_name
    conf["cniVersion"] = cni_version
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    return conf


# -- runtime configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    """The pod a CNI call is for (it goes into CNI_ARGS as the kubelet/containerd pass it)."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RuntimeConf:
    """libcni's RuntimeConf: which sandbox, which interface, which extra arguments."""

    container_id: str
    netns: str  # the namespace's name under /var/run/netns
    ifname: str
    args: tuple[tuple[str, str], ...] = ()
    pod: str = ""  # for messages

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def validate(self, network: str) -> None:
        if not _ID_RE.match(self.container_id):
            raise CniError(f"container id {self.container_id!r} must match {_ID_RE.pattern}")
        if not _ID_RE.match(network):
            raise CniError(f"network name {network!r} must match {_ID_RE.pattern}")
        bad = not 0 < len(self.ifname) <= 15 or self.ifname in (".", "..")
        if bad or any(c in self.ifname for c in "/: \t\n"):
            raise CniError(f"interface name {self.ifname!r} is not valid")


def pod_args(pod: PodRef, infra_container_id: str) -> tuple[tuple[str, str], ...]:
    """CNI_ARGS as containerd passes them for a Kubernetes pod. IgnoreUnknown=1 comes first, as
    containerd adds it: plugins (host-local, bridge) reject unknown keys otherwise."""
    return (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod.namespace),
        ("K8S_POD_NAME", pod.name),
        ("K8S_POD_INFRA_CONTAINER_ID", infra_container_id),
        ("K8S_POD_UID", pod.uid),
    )


def cni_args(args: Sequence[tuple[str, str]]) -> str:
    for key, value in args:
        if any(c in f"{key}{value}" for c in ";="):
            raise CniError(f"CNI_ARGS {key}={value!r}: keys and values may not hold ';' or '='")
    return ";".join(f"{k}={v}" for k, v in args)


def plugin_env(
    command: str, rt: RuntimeConf, path: Path, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of one plugin call (libcni `invoke.Args.AsEnv`)."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()}
    env = {k: v for k, v in env.items() if not k.startswith("CNI_")}
    env.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": rt.container_id,
            "CNI_NETNS": rt.netns_path,
            "CNI_IFNAME": rt.ifname,
            "CNI_ARGS": cni_args(rt.args),
            "CNI_PATH": str(path),
        }
    )
    return env


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Addresses:
    """What a pod got: its IPs (v4 first) and the gateways, from a CNI result."""

    ips: tuple[str, ...]
    gateways: tuple[str, ...] = field(default=())

    @property
    def ip_v4(self) -> str | None:
        return next((ip for ip in self.ips if ":" not in ip), None)

    @property
    def ip_v6(self) -> str | None:
        return next((ip for ip in self.ips if ":" in ip), None)


def parse_result(result: Mapping[str, Any]) -> Addresses:
    """The pod's addresses from a CNI 1.0 result (`ips[].address` in CIDR form)."""
    ips: list[str] = []
    gateways: list[str] = []
    for i, entry in enumerate(result.get("ips") or []):
        address = entry.get("address") if isinstance(entry, dict) else None
        try:
            iface = ipaddress.ip_interface(str(address))
        except ValueError as exc:
            raise CniError(f"CNI result field 'ips[{i}].address' is not an address: {exc}") from exc
        ips.append(str(iface.ip))
        if entry.get("gateway"):
            gateways.append(str(entry["gateway"]))
    ips.sort(key=lambda ip: ":" in ip)
    return Addresses(tuple(ips), tuple(gateways))


# -- invoking plugins -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Runs plugins from `plugins` with `host_netns` as their host namespace, caching in `cache`."""

    plugins: Path
    cache: Path
    host_netns: str

    def cache_file(self, network: str, rt: RuntimeConf) -> Path:
        return self.cache / "results" / f"{network}-{rt.container_id}-{rt.ifname}"

    def _exec(
        self,
        command: str,
        net: NetworkList,
        plugin: Mapping[str, Any],
        conf: Mapping[str, Any],
        rt: RuntimeConf,
    ) -> dict[str, Any] | None:
        kind = str(plugin["type"])
        pod = rt.pod or rt.container_id
        what = f"CNI {command} of pod {pod}: plugin {kind!r} (network {net.name!r})"
        binary = self.plugins / kind
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise CniError(f"{what}: no executable {binary}")
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", self.host_netns, str(binary)],
                input=json.dumps(conf).encode(),
                env=plugin_env(command, rt, self.plugins),
                capture_output=True,
                timeout=EXEC_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CniError(f"{what}: no answer within {EXEC_TIMEOUT_S:.0f}s") from exc
        if done.returncode != 0:
            raise CniError(
                f"{what} failed: {describe_error(done.stdout, done.stderr, done.returncode)}"
            )
        if command != "ADD":
            return None
        try:
            result = json.loads(done.stdout)
        except ValueError as exc:
            raise CniError(f"{what}: the result is not JSON: {done.stdout[:200]!r}") from exc
        if not isinstance(result, dict):
            raise CniError(f"{what}: the result is not a JSON object")
        return result

    def add(
        self, net: NetworkList, rt: RuntimeConf, timings: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """ADD every plugin in order, each given the previous one's result; cache the last.
        With `timings`, each plugin's run (its `ip netns exec` included) is added there in
        seconds, under its type (bench/startup.py reports them)."""
        rt.validate(net.name)
        result: dict[str, Any] | None = None
        for plugin in net.plugins:
            conf = build_one_config(net.name, net.cni_version, plugin, result)
            began = time.monotonic()
            result = self._exec("ADD", net, plugin, conf, rt)
            if timings is not None:
                kind = str(plugin["type"])
                timings[kind] = timings.get(kind, 0.0) + time.monotonic() - began
        assert result is not None
        self._write_cache(net, rt, result)
        return result

    def cached(self, network: str, rt: RuntimeConf) -> dict[str, Any] | None:
        """The cached ADD result for (network, container, ifname), or None."""
        try:
            record = json.loads(self.cache_file(network, rt).read_text())
        except (FileNotFoundError, ValueError):
            return None
        result = record.get("result") if isinstance(record, dict) else None
        return result if isinstance(result, dict) else None

    def check(self, net: NetworkList, rt: RuntimeConf) -> None:
        """CHECK every plugin in order against the cached result (none if `disableCheck`)."""
        if net.disable_check:
            return
        cached = self.cached(net.name, rt)
        if cached is None:
            raise CniError(
                f"CNI CHECK of pod {rt.pod or rt.container_id}: network {net.name!r} has no "
                f"cached result ({self.cache_file(net.name, rt)})"
            )
        for plugin in net.plugins:
            conf = build_one_config(net.name, net.cni_version, plugin, cached)
            self._exec("CHECK", net, plugin, conf, rt)

    def delete(self, net: NetworkList, rt: RuntimeConf) -> None:
        """DEL every plugin in reverse order with the cached result (if any), then drop it."""
        cached = self.cached(net.name, rt)
        for plugin in reversed(net.plugins):
            conf = build_one_config(net.name, net.cni_version, plugin, cached)
            self._exec("DEL", net, plugin, conf, rt)
        self.cache_file(net.name, rt).unlink(missing_ok=True)

    def _write_cache(self, net: NetworkList, rt: RuntimeConf, result: Mapping[str, Any]) -> None:
        record = {
            "kind": CACHE_KIND,
            "containerId": rt.container_id,
            "config": base64.b64encode(net.raw).decode(),
            "ifName": rt.ifname,
            "networkName": net.name,
            "netns": rt.netns_path,
            "cniArgs": [list(a) for a in rt.args],
            "result": dict(result),
        }
        path = self.cache_file(net.name, rt)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.chmod(0o600)
        tmp.replace(path)

    def cached_entries(self) -> list[CacheEntry]:
        """Every cached ADD (what a restarted runtime finds of the sandboxes it wired)."""
        entries = []
        results = self.cache / "results"
        if not results.is_dir():
            return []
        for path in sorted(results.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                record = json.loads(path.read_text())
                entries.append(
                    CacheEntry(
                        network=str(record["networkName"]),
                        container_id=str(record["containerId"]),
                        ifname=str(record["ifName"]),
                        netns_path=str(record.get("netns", "")),
                        args=tuple((str(k), str(v)) for k, v in record.get("cniArgs") or ()),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return entries


@dataclass(frozen=True)
class CacheEntry:
    network: str
    container_id: str
    ifname: str
    netns_path: str
    args: tuple[tuple[str, str], ...]

    @property
    def netns(self) -> str:
        return Path(self.netns_path).name

    def runtime_conf(self) -> RuntimeConf:
        return RuntimeConf(self.container_id, self.netns, self.ifname, self.args, self.container_id)


def describe_error(stdout: bytes, stderr: bytes, returncode: int) -> str:
    """A plugin's error object (`{code, msg, details}` on stdout) as one line; stderr otherwise."""
    try:
        err = json.loads(stdout)
    except ValueError:
        err = None
    if isinstance(err, dict) and ("msg" in err or "code" in err):
        text = f"[code {err.get('code')}] {err.get('msg', '')}"
        if err.get("details"):
            text += f" ({err['details']})"
        return text
    tail = (stderr or stdout).decode(errors="replace").strip()[-500:]
    return f"exit status {returncode}: {tail or 'no output'}"
