"""A real Kubernetes control plane for the sandbox: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler on loopback.

Like controller-runtime's envtest, but with TLS serving, client-certificate authentication, RBAC
authorization and ServiceAccount token signing turned on, so that permissions are really checked
and tests can mint ServiceAccount tokens (TokenRequest). The controller manager runs the
controllers the sandbox needs (`CONTROLLERS`: EndpointSlices, namespace deletion, garbage
collection, the workload controllers, `default` ServiceAccounts), each with its own ServiceAccount
credentials; the scheduler binds Pods that name no node. Each component has its own client
certificate and kubeconfig (pki.COMPONENT_USERS). Services get ClusterIPs from a dual-stack
service range (SERVICE_CIDRS).

Called by the test fixtures (`tests/fixtures/controlplane.py`, one control plane per test session)
and by `stockade sandbox up` (session.py), which starts it detached and adopts it again later
from its `ControlPlaneRecord`.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import kubernetes.client
import yaml

from stockade.sandbox.controlplane.pki import COMPONENT_USERS, PkiPaths, write_pki, write_private
from stockade.sandbox.processes import Child, ProcessError, ProcessRecord, log_tail
from stockade.sandbox.toolchain import ETCD, KUBERNETES, ensure

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR_V6 = "fd00:10:96::/112"
SERVICE_CIDRS = (SERVICE_CIDR, SERVICE_CIDR_V6)  # IPv4 first: single-stack Services get IPv4
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR
# kube-controller-manager --controllers: only what the sandbox needs (no node lifecycle, IPAM,
# certificates or cloud controllers: the sandbox kubelet stand-in writes Nodes itself).
CONTROLLERS = (
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "replicaset-controller",
    "deployment-controller",
    "daemonset-controller",
    "job-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "service-cidr-controller",
)
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTEXT = "stockade-sandbox"
START_TIMEOUT = 120.0


class ControlPlaneError(ProcessError):
    """The control plane could not start or is unhealthy; the message has the log tail."""


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ControlPlaneRecord:
    """What a running control plane needs to be found again: saved by `stockade sandbox up`."""

    workdir: Path
    server: str
    etcd_url: str
    processes: tuple[ProcessRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "server": self.server,
            "etcd_url": self.etcd_url,
            "processes": [p.to_json() for p in self.processes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlPlaneRecord:
        return cls(
            workdir=Path(data["workdir"]),
            server=str(data["server"]),
            etcd_url=str(data["etcd_url"]),
            processes=tuple(ProcessRecord.from_json(p) for p in data["processes"]),
        )


def kubectl(
    kubeconfig: Path, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the pinned kubectl against `kubeconfig`; raise ControlPlaneError if it fails and
    `check` is set."""
    cmd = [str(KUBERNETES.path("kubectl")), "--kubeconfig", str(kubeconfig), *args]
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ControlPlaneError(
            f"kubectl {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def write_kubeconfig(
    path: Path, server: str, ca_cert: Path, cert: Path, key: Path, user: str
) -> None:
    """Write a kubeconfig (readable by its owner only) for `user` at `server`, with the CA, client
    certificate and key embedded, so the file stands alone."""

    def b64(source: Path) -> str:
        return base64.b64encode(source.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            }
        ],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user}}],
        "current-context": CONTEXT,
    }
    write_private(path, yaml.safe_dump(config, sort_keys=False).encode())


def controller_manager_argv(
    binary: Path, workdir: Path, pki: PkiPaths, kubeconfig: Path, port: int
) -> list[str]:
    """kube-controller-manager's command line: its own kubeconfig, no leader election, secure
    serving (/healthz) on 127.0.0.1:`port`, one ServiceAccount per controller."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={workdir / 'kube-controller-manager-certs'}",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-account-private-key-file={pki.sa_signing_key}",
        f"--root-ca-file={pki.ca_cert}",
        "--use-service-account-credentials=true",
        "--profiling=false",
    ]


def scheduler_config(kubeconfig: Path) -> dict[str, Any]:
    """The KubeSchedulerConfiguration: its kubeconfig, no leader election (one scheduler)."""
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "leaderElection": {"leaderElect": False},
    }


def scheduler_argv(binary: Path, workdir: Path, config: Path, port: int) -> list[str]:
    """kube-scheduler's command line: its configuration file and secure serving (/healthz) on
    127.0.0.1:`port`."""
    return [
        str(binary),
        f"--config={config}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={workdir / 'kube-scheduler-certs'}",
        "--profiling=false",
    ]


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler in `workdir`
    (certificates, data, logs, kubeconfigs all live there)."""

    def __init__(
        self, workdir: Path, *, detach: bool = False, progress: Progress | None = None
    ) -> None:
        self.workdir = workdir
        self.detach = detach
        self._progress = progress or _quiet
        self._children: list[Child] = []
        self._server = ""
        self._etcd_url = ""
        self.start_seconds = 0.0

    # -- identity ---------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        if not self._server:
            raise ControlPlaneError("the control plane has not been started")
        return self._server

    @property
    def pki(self) -> PkiPaths:
        return PkiPaths.in_dir(self.workdir / "pki")

    @property
    def record(self) -> ControlPlaneRecord:
        return ControlPlaneRecord(
            self.workdir, self.server, self._etcd_url, tuple(c.record for c in self._children)
        )

    @classmethod
    def adopt(cls, record: ControlPlaneRecord) -> ControlPlane:
        """A handle on a control plane that an earlier process started (detached)."""
        plane = cls(record.workdir, detach=True)
        plane._server = record.server
        plane._etcd_url = record.etcd_url
        plane._children = [Child(p) for p in record.processes]
        return plane

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd, kube-apiserver, then the controller manager and the scheduler; return
        once each is healthy."""
        started = time.monotonic()
        if not (ETCD.present() and KUBERNETES.present()):
            self._progress("building the pinned etcd and Kubernetes binaries (first run only)")
        ensure((ETCD, KUBERNETES))
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_pki(self.workdir / "pki", SERVICE_IP)
        try:
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self._start_controllers()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        self._progress(f"control plane ready at {self._server} in {self.start_seconds:.1f}s")

    def stop(self) -> None:
        """Stop every component, the last started first (SIGTERM, then SIGKILL). Idempotent."""
        for child in reversed(self._children):
            child.stop()
        self._children = []

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child.spawn(name, argv, self.workdir / f"{name}.log", detach=self.detach)
        self._children.append(child)
        return child

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self._etcd_url = f"http://127.0.0.1:{client}"
        self._progress(f"starting etcd on 127.0.0.1:{client}")
        child = self._spawn(
            "etcd",
            [
                str(ETCD.path("etcd")),
                "--name=sandbox",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self._etcd_url}",
                f"--advertise-client-urls={self._etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=sandbox=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # throwaway data: durability buys nothing here
                "--log-level=warn",
            ],
        )
        self._wait(child, lambda: self._http_ok(f"{self._etcd_url}/health", None))

    def _start_apiserver(self) -> None:
        port = free_port()
        self._server = f"https://127.0.0.1:{port}"
        self._progress(f"starting kube-apiserver on 127.0.0.1:{port}")
        pki = self.pki
        child = self._spawn(
            "kube-apiserver",
            [
                str(KUBERNETES.path("kube-apiserver")),
                f"--etcd-servers={self._etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.sa_public_key}",
                f"--service-account-signing-key-file={pki.sa_signing_key}",
                f"--service-cluster-ip-range={','.join(SERVICE_CIDRS)}",
                "--allow-privileged=true",
                # The `kubernetes` Service cannot point at a loopback address; nothing needs it.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )
        context = self._tls_context()
        self._wait(
            child,
            lambda: all(self._http_ok(f"{self._server}/{p}", context) for p in ("livez", "readyz")),
        )

    def _component_kubeconfig(self, name: str) -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        client = self.pki.component(name)
        write_kubeconfig(
            path, self.server, self.pki.ca_cert, client.cert, client.key, COMPONENT_USERS[name]
        )
        return path

    def _start_controllers(self) -> None:
        """Start kube-controller-manager and kube-scheduler together, then wait for both."""
        cm_port, sched_port = free_port(), free_port()
        self._progress(
            f"starting kube-controller-manager (127.0.0.1:{cm_port}) and "
            f"kube-scheduler (127.0.0.1:{sched_port})"
        )
        cm = self._spawn(
            "kube-controller-manager",
            controller_manager_argv(
                KUBERNETES.path("kube-controller-manager"),
                self.workdir,
                self.pki,
                self._component_kubeconfig("kube-controller-manager"),
                cm_port,
            ),
        )
        config = self.workdir / "kube-scheduler.yaml"
        config.write_text(
            yaml.safe_dump(scheduler_config(self._component_kubeconfig("kube-scheduler")))
        )
        scheduler = self._spawn(
            "kube-scheduler",
            scheduler_argv(KUBERNETES.path("kube-scheduler"), self.workdir, config, sched_port),
        )
        # Both serve a certificate of their own making: /healthz is checked, not who serves it.
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        self._wait(cm, lambda: self._http_ok(f"https://127.0.0.1:{cm_port}/healthz", insecure))
        self._wait(
            scheduler, lambda: self._http_ok(f"https://127.0.0.1:{sched_port}/healthz", insecure)
        )

    def _wait(self, child: Child, healthy: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not child.running():
                raise ControlPlaneError(
                    f"{child.record.name} exited during start-up; last lines of "
                    f"{child.record.log}:\n{log_tail(child.record.log)}"
                )
            if healthy():
                return
            time.sleep(0.1)
        raise ControlPlaneError(
            f"{child.record.name} was not healthy after {START_TIMEOUT:.0f}s; last lines of "
            f"{child.record.log}:\n{log_tail(child.record.log)}"
        )

    # -- health -----------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    @staticmethod
    def _http_ok(url: str, context: ssl.SSLContext | None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def health(self) -> dict[str, bool]:
        """Each component's liveness: processes running, etcd /health, API server /readyz (the
        controller manager and scheduler count as their process running)."""
        result = {c.record.name: c.running() for c in self._children}
        result["etcd /health"] = self._http_ok(f"{self._etcd_url}/health", None)
        result["kube-apiserver /readyz"] = self._http_ok(
            f"{self.server}/readyz", self._tls_context()
        )
        return result

    # -- clients ----------------------------------------------------------------------------

    def _write_kubeconfig(self) -> None:
        pki = self.pki
        admin = "stockade-admin"
        write_kubeconfig(
            self.kubeconfig, self.server, pki.ca_cert, pki.admin_cert, pki.admin_key, admin
        )

    def api_client(self, token: str | None = None) -> Any:
        """A `kubernetes.client.ApiClient`: cluster admin, or the bearer of `token` (for example
        a ServiceAccount token from TokenRequest). The caller closes it."""
        config = kubernetes.client.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self.pki.ca_cert)
        if token is None:
            config.cert_file = str(self.pki.admin_cert)
            config.key_file = str(self.pki.admin_key)
        else:
            config.api_key = {"authorization": token}
            config.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(config)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return kubectl(self.kubeconfig, *args, input=input, check=check)


def main() -> int:
    """`python -m stockade.sandbox.controlplane.server DIR`: start one, print its record, and
    wait for ^C."""
    plane = ControlPlane(Path(sys.argv[1]), progress=lambda m: print(m, file=sys.stderr))
    with plane:
        print(json.dumps(plane.record.to_json(), indent=2))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
