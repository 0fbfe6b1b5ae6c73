"""Pinned Go-built binaries for the sandbox: the Kubernetes control-plane binaries (kube-apiserver,
kube-controller-manager, kube-scheduler, kube-proxy, kubectl), etcd, helm and the CNI reference
plugins (ptp, bridge, host-local, loopback), and stockade's own chained CNI plugin, stockade-cni
(the relay in the repository's `cni/` module, keyed on a digest of its sources).

Each tool is built from the Go module proxy with the machine's Go into a cache outside the
repository, keyed by tool and version. Beside each tool's bin/ a stamp holds the digest of what
was built (packages, binaries, ldflags), so a tool is rebuilt when it is missing or when its
definition changed. The sandbox control plane, the chart tests and `make setup` call `ensure()`;
`python -m stockade.sandbox.toolchain` builds all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
CNI_PLUGINS_VERSION = "v1.10.0"

# What helm's release Makefile stamps into a v3.22.0 build. The commit is the v3.22.0 tag's, as
# the released binary's `helm version` reports it (the module proxy carries no VCS data). The
# default Kubernetes version is the Makefile's: from client-go v0.37.0 in helm's go.mod it takes
# major 0+1 and minor 37 (without it helm assumes v1.20, below the chart's kubeVersion floor).
HELM_GIT_COMMIT = "144ca65f8501953fa8b41cd1d37c7223051c85b7"
HELM_K8S_MAJOR = "1"
HELM_K8S_MINOR = "37"


class ToolchainError(RuntimeError):
    """A tool could not be built; the message says which step failed and why."""


def cache_root() -> Path:
    """Where built tools live: $STOCKADE_CACHE, else ~/.cache/stockade."""
    env = os.environ.get("STOCKADE_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "stockade"
    return base / "toolchain"


@dataclass(frozen=True)
class GoTool:
    """One wrapper Go module that builds one or more binaries at a pinned version."""

    name: str
    module: str
    version: str
    binaries: tuple[str, ...]
    go_mod: Callable[[], str]
    packages: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    extra_files: dict[str, str] = field(default_factory=dict)

    @property
    def bin_dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}" / "bin"

    @property
    def stamp_path(self) -> Path:
        """The file beside bin/ that records the digest of the build in that directory."""
        return self.bin_dir.parent / "stamp"

    @property
    def digest(self) -> str:
        """A digest of everything that shapes the binaries: a change to any of it means rebuild."""
        spec = {
            "module": self.module,
            "version": self.version,
            "binaries": list(self.binaries),
            "packages": list(self.packages),
            "ldflags": list(self.ldflags),
            "extra_files": dict(sorted(self.extra_files.items())),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def path(self, binary: str) -> Path:
        return self.bin_dir / binary

    def present(self) -> bool:
        """Every binary is there and executable, and the stamp says it was built as defined now."""
        try:
            stamp = self.stamp_path.read_text().strip()
        except OSError:
            return False
        return stamp == self.digest and all(
            self.path(b).is_file() and os.access(self.path(b), os.X_OK) for b in self.binaries
        )


def _log(msg: str) -> None:
    print(f"[toolchain] {msg}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"})
    return env


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    """Run a go command, printing a progress line every 30 s (go build itself is silent)."""
    start = time.monotonic()
    out: list[str] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env=_go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        reader = threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True)
        reader.start()
        # Wait on the reader, not on poll(): once go closes its output the reader ends at once,
        # and a loop on poll() would then spin (printing a line per turn) until go exits.
        while True:
            reader.join(timeout=30)
            if not reader.is_alive():
                break
            last = out[-1].strip()[:90] if out else ""
            _log(f"{what}: {time.monotonic() - start:.0f}s {last}")
    text = "".join(out)
    if proc.returncode != 0:
        hint = ""
        if re.search(r"dial tcp|no such host|connection refused|i/o timeout|TLS handshake", text):
            hint = " (the Go module proxy could not be reached: check GOPROXY and the network)"
        raise ToolchainError(f"{what} failed (exit {proc.returncode}){hint}:\n{text[-4000:]}")
    return text


def _staging_modules(version: str) -> list[str]:
    """Read the staging modules (`k8s.io/x => ./staging/...`) from that release's go.mod."""
    with tempfile.TemporaryDirectory() as tmp:
        text = _run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
            Path(tmp),
            f"fetching k8s.io/kubernetes {version} go.mod",
        )
    gomod = Path(json.loads(text)["GoMod"]).read_text()
    mods = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.M)
    if not mods:
        raise ToolchainError(f"no staging replacements found in k8s.io/kubernetes {version} go.mod")
    return mods


def _kubernetes_go_mod() -> str:
    minor = KUBERNETES_VERSION.split(".")[1]
    staging = "\n".join(
        f"\t{m} => {m} v0.{minor}.{KUBERNETES_VERSION.split('.')[2]}"
        for m in _staging_modules(KUBERNETES_VERSION)
    )
    return (
        "module stockade.local/toolchain/kubernetes\n\ngo 1.25\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n{staging}\n)\n"
    )


def _k8s_ldflags() -> tuple[str, ...]:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    flags: list[str] = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return tuple(flags)


KUBERNETES = GoTool(
    name="kubernetes",
    module="k8s.io/kubernetes",
    version=KUBERNETES_VERSION,
    binaries=(
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
        "kubectl",
    ),
    go_mod=_kubernetes_go_mod,
    packages=(
        "k8s.io/kubernetes/cmd/kube-apiserver",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
        "k8s.io/kubernetes/cmd/kube-scheduler",
        "k8s.io/kubernetes/cmd/kube-proxy",
        "k8s.io/kubernetes/cmd/kubectl",
    ),
    ldflags=_k8s_ldflags(),
)

ETCD = GoTool(
    name="etcd",
    module="go.etcd.io/etcd/server/v3",
    version=ETCD_VERSION,
    binaries=("etcd",),
    go_mod=lambda: (
        "module stockade.local/toolchain/etcd\n\ngo 1.24\n\n"
        f"require go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
    ),
    packages=("./cmd/etcd",),
    ldflags=(f"-X go.etcd.io/etcd/api/v3/version.GitSHA=stockade-{ETCD_VERSION}",),
    extra_files={
        "cmd/etcd/main.go": (
            "// Command etcd runs etcd's own entry point at the pinned server version.\n"
            'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n"
        )
    },
)

HELM = GoTool(
    name="helm",
    module="helm.sh/helm/v3",
    version=HELM_VERSION,
    binaries=("helm",),
    go_mod=lambda: (
        "module stockade.local/toolchain/helm\n\ngo 1.24\n\n"
        f"require helm.sh/helm/v3 {HELM_VERSION}\n"
    ),
    packages=("helm.sh/helm/v3/cmd/helm",),
    # The ldflags of helm's own Makefile for a tagged, clean build (metadata is empty for a tag).
    ldflags=(
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        "-X helm.sh/helm/v3/internal/version.metadata=",
        f"-X helm.sh/helm/v3/internal/version.gitCommit={HELM_GIT_COMMIT}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor={HELM_K8S_MAJOR}",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={HELM_K8S_MINOR}",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor={HELM_K8S_MAJOR}",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={HELM_K8S_MINOR}",
    ),
)

CNI_PLUGINS = GoTool(
    name="cni-plugins",
    module="github.com/containernetworking/plugins",
    version=CNI_PLUGINS_VERSION,
    binaries=("ptp", "bridge", "host-local", "loopback"),
    go_mod=lambda: (
        "module stockade.local/toolchain/cni-plugins\n\ngo 1.26\n\n"
        f"require github.com/containernetworking/plugins {CNI_PLUGINS_VERSION}\n"
    ),
    packages=(
        "github.com/containernetworking/plugins/plugins/main/ptp",
        "github.com/containernetworking/plugins/plugins/main/bridge",
        "github.com/containernetworking/plugins/plugins/ipam/host-local",
        "github.com/containernetworking/plugins/plugins/main/loopback",
    ),
    # The version the plugins' release workflow stamps (build_linux.sh -ldflags '... -X ...').
    ldflags=(
        "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion="
        f"{CNI_PLUGINS_VERSION}",
    ),
)

# stockade's chained CNI plugin: its Go module (cni/ at the repository root, with go.mod and
# go.sum pinning github.com/containernetworking/cni) is copied into the build directory; its
# "version" is a digest of those sources, so an edit rebuilds it.
CNI_SOURCE_DIR = Path(__file__).resolve().parents[3] / "cni"
CNI_SOURCES = ("go.mod", "go.sum", "main.go")


def _cni_sources() -> dict[str, str]:
    return {
        name: (CNI_SOURCE_DIR / name).read_text()
        for name in CNI_SOURCES
        if (CNI_SOURCE_DIR / name).is_file()
    }


def _sources_version(files: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return f"src-{digest[:16]}"


_STOCKADE_CNI_FILES = _cni_sources()
STOCKADE_CNI = GoTool(
    name="stockade-cni",
    module="github.com/stockade/stockade-cni",
    version=_sources_version(_STOCKADE_CNI_FILES),
    binaries=("stockade-cni",),
    go_mod=lambda: _STOCKADE_CNI_FILES.get("go.mod", ""),
    packages=("github.com/stockade/stockade-cni",),
    extra_files=_STOCKADE_CNI_FILES,
)

TOOLS = (ETCD, KUBERNETES, HELM, CNI_PLUGINS, STOCKADE_CNI)


def cni_bin_dir() -> Path:
    """The directory holding the CNI plugins (what a runtime's CNI_PATH points at)."""
    return CNI_PLUGINS.bin_dir


def build(tool: GoTool) -> None:
    """Build `tool` into its cache directory (atomically: a half-built tool is never used)."""
    if not tool.go_mod():
        raise ToolchainError(f"{tool.name}: no Go module to build (is {CNI_SOURCE_DIR} there?)")
    started = time.monotonic()
    _log(f"building {tool.name} {tool.version} (first time only; cached in {tool.bin_dir})")
    if shutil.which("go") is None:
        raise ToolchainError("`go` is not on PATH; install Go to build the sandbox toolchain")
    tool.bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"stockade-{tool.name}-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(tool.go_mod())
        for rel, text in tool.extra_files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        # Each package is pinned with @version: a bare `go get pkg` resolves the module that
        # provides pkg at @latest and would silently upgrade past the pinned require.
        pinned = [f"{p}@{tool.version}" for p in tool.packages]
        _run(
            ["go", "mod", "tidy"] if tool.extra_files else ["go", "get", *pinned],
            work,
            f"{tool.name}: resolving modules",
        )
        out = work / "out"
        out.mkdir()
        _run(
            [
                "go",
                "build",
                "-trimpath",
                "-ldflags",
                " ".join(("-s", "-w", *tool.ldflags)),
                "-o",
                str(out) + "/",
                *tool.packages,
            ],
            work,
            f"{tool.name}: compiling {', '.join(tool.binaries)}",
        )
        staged = cache_root() / f".{tool.bin_dir.parent.name}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        (staged / "bin").mkdir(parents=True)
        for b in tool.binaries:
            shutil.move(str(out / b), staged / "bin" / b)
        (staged / "stamp").write_text(tool.digest + "\n")
        shutil.rmtree(tool.bin_dir.parent, ignore_errors=True)
        staged.rename(tool.bin_dir.parent)
    _log(f"built {tool.name} {tool.version} in {time.monotonic() - started:.0f}s")


def ensure(tools: tuple[GoTool, ...] = TOOLS) -> None:
    """Build every tool that is missing from the cache or was built from another definition."""
    for tool in tools:
        if not tool.present():
            build(tool)


def main() -> int:
    try:
        ensure()
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for tool in TOOLS:
        for b in tool.binaries:
            print(tool.path(b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
