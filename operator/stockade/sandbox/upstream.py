"""The upstream ClusterNetworkPolicy CRD (`policy.networking.k8s.io`), fetched at a pinned version.

stockade enforces the upstream `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy beside
its own kinds, so the sandbox API server must serve that API too. The CRD is not stockade's to
write: it ships in the Go module `sigs.k8s.io/network-policy-api`, which `go mod download` puts
in the machine's module cache (downloaded once, then read from the cache). Release v0.3.0 is the
first on the module proxy whose CRD serves v1alpha2 (beside v1beta1, the storage version, with
an identical schema); v0.1.x only has the older AdminNetworkPolicy kinds. The experimental
channel is installed because it carries `destinationNamedPort` and `nodes` peers, which stockade
implements.

Callers: `make setup` runs `python -m stockade.sandbox.upstream` (downloads into the module cache
and prints the manifest paths), the sandbox installs the CRD with `install_upstream_crds()`, and
the API server tests use `upstream_crd_manifests()`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import kubernetes.client
import yaml
from kubernetes.client.exceptions import ApiException

from stockade.sandbox.toolchain import ToolchainError

NETWORK_POLICY_API_MODULE = "sigs.k8s.io/network-policy-api"
NETWORK_POLICY_API_VERSION = "v0.3.0"

Channel = Literal["standard", "experimental"]
CHANNEL: Channel = "experimental"

GROUP = "policy.networking.k8s.io"
SERVED_VERSION = "v1alpha2"  # the version stockade reads and the conformance files write
CRD_NAMES = (f"clusternetworkpolicies.{GROUP}",)
_MANIFEST = "config/crd/{channel}/policy.networking.k8s.io_clusternetworkpolicies.yaml"
_BUNDLE_VERSION = f"{GROUP}/bundle-version"
_CHANNEL_ANNOTATION = f"{GROUP}/channel"
_UNREACHABLE = re.compile(
    r"dial tcp|no such host|connection refused|i/o timeout|TLS handshake|network is unreachable"
    r"|403 Forbidden|404 Not Found|410 Gone|not available"
)
DOWNLOAD_TIMEOUT = 300.0
ESTABLISHED_TIMEOUT = 30.0


class UpstreamCrdError(ToolchainError):
    """The upstream CRD could not be fetched or is not what stockade expects; the message says
    which step failed and why."""


def module_dir(
    version: str = NETWORK_POLICY_API_VERSION, env: Mapping[str, str] | None = None
) -> Path:
    """Download `sigs.k8s.io/network-policy-api@version` into the Go module cache (a no-op when
    it is already there) and return its directory. `env` replaces the process environment."""
    if shutil.which("go") is None:
        raise UpstreamCrdError("`go` is not on PATH; install Go to fetch the upstream CRD")
    module = f"{NETWORK_POLICY_API_MODULE}@{version}"
    go_env = dict(os.environ if env is None else env)
    # Outside any module, with a writable cache, never switching Go toolchains.
    go_env.update({"GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod -modcacherw", "GO111MODULE": "on"})
    with tempfile.TemporaryDirectory(prefix="stockade-upstream-") as tmp:
        try:
            proc = subprocess.run(
                ["go", "mod", "download", "-json", module],
                cwd=tmp,
                env=go_env,
                capture_output=True,
                text=True,
                timeout=DOWNLOAD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise UpstreamCrdError(
                f"downloading {module} took more than {DOWNLOAD_TIMEOUT:.0f}s "
                "(is the Go module proxy reachable? check GOPROXY and the network)"
            ) from None
    try:
        info = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or info.get("Error") or not info.get("Dir"):
        error = str(info.get("Error") or "") or proc.stderr.strip()
        hint = ""
        proxy = go_env.get("GOPROXY") or "https://proxy.golang.org,direct"
        if proxy == "off":
            hint = " (module downloads are off: GOPROXY=off and the module cache lacks it)"
        elif _UNREACHABLE.search(error):
            hint = (
                f" (the Go module proxy {proxy} could not be reached or does not serve this "
                "version: check GOPROXY and the network)"
            )
        raise UpstreamCrdError(
            f"downloading {module} failed (exit {proc.returncode}){hint}: "
            f"{error or 'go printed no module directory'}"
        )
    return Path(str(info["Dir"]))


def manifest_path(version: str = NETWORK_POLICY_API_VERSION, channel: Channel = CHANNEL) -> Path:
    """The ClusterNetworkPolicy CRD manifest of that release and channel, in the module cache."""
    path = module_dir(version) / _MANIFEST.format(channel=channel)
    if not path.is_file():
        raise UpstreamCrdError(
            f"{NETWORK_POLICY_API_MODULE}@{version} has no {channel} ClusterNetworkPolicy CRD "
            f"at {path}"
        )
    return path


@functools.cache
def _manifests(version: str, channel: Channel) -> tuple[dict[str, Any], ...]:
    return _load(manifest_path(version, channel), version, channel)


def _load(path: Path, version: str, channel: Channel) -> tuple[dict[str, Any], ...]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise UpstreamCrdError(f"{path}: cannot read the CRD manifest: {exc}") from exc
    for doc in docs:
        _check(doc, path, version, channel)
    names = tuple(sorted(d["metadata"]["name"] for d in docs))
    if names != CRD_NAMES:
        raise UpstreamCrdError(f"{path}: expected the CRDs {CRD_NAMES}, found {names}")
    return tuple(docs)


def _check(doc: Any, path: Path, version: str, channel: Channel) -> None:
    """Refuse a manifest that is not the pinned release's CRD serving v1alpha2."""
    if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
        raise UpstreamCrdError(f"{path}: not a CustomResourceDefinition")
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    if annotations.get(_BUNDLE_VERSION) != version:
        raise UpstreamCrdError(
            f"{path}: metadata.annotations[{_BUNDLE_VERSION}] is "
            f"{annotations.get(_BUNDLE_VERSION)!r}, expected {version!r}"
        )
    if annotations.get(_CHANNEL_ANNOTATION) != channel:
        raise UpstreamCrdError(f"{path}: not the {channel} channel")
    served = [v.get("name") for v in doc["spec"].get("versions", ()) if v.get("served")]
    if SERVED_VERSION not in served:
        raise UpstreamCrdError(
            f"{path}: spec.versions serves {served}, not {GROUP}/{SERVED_VERSION}"
        )


def upstream_crd_manifests(
    version: str = NETWORK_POLICY_API_VERSION, channel: Channel = CHANNEL
) -> list[dict[str, Any]]:
    """The upstream CRDs to install, as objects (fresh copies: callers may change them).

    Downloads the module on first use (then the module cache answers); raises UpstreamCrdError
    when `go` is missing, the proxy is unreachable or the manifest is not the pinned release's.
    """
    return copy.deepcopy(list(_manifests(version, channel)))


def install_upstream_crds(
    api_client: Any,
    manifests: list[dict[str, Any]] | None = None,
    timeout: float = ESTABLISHED_TIMEOUT,
) -> tuple[str, ...]:
    """Create (or replace) the upstream CRDs and wait until each is Established; return their
    names. `api_client` is a `kubernetes.client.ApiClient` with rights on CRDs."""
    # Raw dicts go to the API as they are (the typed client models would drop unknown fields).
    ext: Any = kubernetes.client.ApiextensionsV1Api(api_client)
    names: list[str] = []
    for manifest in manifests if manifests is not None else upstream_crd_manifests():
        name = str(manifest["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            body = copy.deepcopy(manifest)
            body["metadata"]["resourceVersion"] = _resource_version(ext, name)
            ext.replace_custom_resource_definition(name, body)
        names.append(name)
    deadline = time.monotonic() + timeout
    for name in names:
        while not _established(ext, name):
            if time.monotonic() > deadline:
                raise UpstreamCrdError(f"CRD {name} not Established after {timeout:.0f}s")
            time.sleep(0.1)
    return tuple(names)


def _resource_version(ext: Any, name: str) -> str:
    return str(ext.read_custom_resource_definition(name).metadata.resource_version)


def _established(ext: Any, name: str) -> bool:
    crd = ext.read_custom_resource_definition(name)
    conditions = (crd.status.conditions if crd.status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def main() -> int:
    """Fetch the pinned CRD into the module cache and print where it is."""
    try:
        path = manifest_path()
        _load(path, NETWORK_POLICY_API_VERSION, CHANNEL)
    except UpstreamCrdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
