"""A kubelet stand-in for one sandbox node, run as its own process:

    python -m stockade.sandbox.node.kubelet --kubeconfig K --node NAME --state-dir D \
        --topology T [--cni-bin DIR]

It lists and watches the Pods bound to its node (field selector `spec.nodeName=NAME`, listing
again when the watch expires) and runs each new one as a kubelet with a CNI runtime would: it
creates the pod's namespace (`pod_netns_name`), runs CNI ADD (`stockade.sandbox.node.cni`), starts
the pod's containers (`podspec.IMAGES`: one podagent echo helper serving every declared port,
or the cluster DNS process) and writes the Pod's status through the status subresource.
Host-network pods run in the node namespace with the node's addresses, without CNI. When a Pod
is being deleted (or is gone) it stops the containers, runs CNI DEL, removes the namespace and,
for a graceful delete, removes the object (grace 0, uid precondition) as kubelet does.

On start it reconciles what an earlier run left (the CNI cache of its node): a pod that still
exists and passes CNI CHECK keeps its namespace and addresses (its containers are started again:
they end with the process that ran them); cached sandboxes of pods that are gone are torn down
with DEL. SIGTERM (`stockade sandbox down`) tears every pod down with DEL, then exits.

Pods that `stockade.sandbox.node.registration.register_pod` wires itself carry
`podspec.DIRECT_ANNOTATION` and are left alone. Started by `stockade.sandbox.node.supervise` (for
`stockade sandbox up`) and by the node tests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch
from kubernetes.client.exceptions import ApiException

from stockade.sandbox import netns
from stockade.sandbox.node import podspec
from stockade.sandbox.node.cni import CniError, PodRef, RuntimeConf, parse_result, pod_args
from stockade.sandbox.node.cni import plugin_dir as default_plugin_dir
from stockade.sandbox.node.network import NodeCni
from stockade.sandbox.processes import Child
from stockade.sandbox.topology import POD_IFNAME, PREFIX, NodeNet, Topology
from stockade.sandbox.workloads.traffic import Agent, AgentError

log = logging.getLogger("stockade.sandbox.node.registration")

NODES_DIR = "nodes"  # below the sandbox state directory: one CNI state directory per node
DNS_MODULE = "stockade.sandbox.cluster.dns"
WATCH_TIMEOUT_S = 60
MERGE_PATCH = "application/merge-patch+json"
HTTP_NOT_FOUND, HTTP_CONFLICT, HTTP_GONE = 404, 409, 410
POD_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv4.ping_group_range": "0 2147483647",
}


def pod_netns_name(run_id: str, uid: str) -> str:
    """The namespace of a kubelet-run pod: `stk-<run id>-pod-<first 12 hex of the uid>`."""
    return f"{PREFIX}-{run_id}-pod-{uid.replace('-', '')[:12]}"


def module_available(name: str) -> bool:
    """Whether module `name` can be imported (also False when its package is missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def node_state_dir(state_dir: Path, node: str) -> Path:
    """The node's CNI state (conflist, result cache, host-local data) below `state_dir`."""
    return state_dir / NODES_DIR / node


@dataclass
class RunningPod:
    """A pod this kubelet runs: where, with which addresses, and its processes."""

    uid: str
    key: str
    netns: str
    host_network: bool
    ips: tuple[str, ...]
    agent: Agent | None = None
    others: list[Child] = field(default_factory=list)

    def stop_processes(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        for child in self.others:
            child.stop(grace=5.0)
        self.others.clear()


def _meta(pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod.get("metadata") or {}
    return meta if isinstance(meta, dict) else {}


def _key(pod: dict[str, Any]) -> str:
    return f"{_meta(pod).get('namespace')}/{_meta(pod).get('name')}"


class Kubelet:
    """The pods of one node. `handle` is called with list/watch results, from one thread."""

    def __init__(
        self, api: Any, topology: Topology, node: NodeNet, cni: NodeCni, kubeconfig: Path
    ) -> None:
        self.api = api
        self.core = kubernetes.client.CoreV1Api(api)
        self.topology = topology
        self.node = node
        self.cni = cni
        self.kubeconfig = kubeconfig
        self.pods: dict[str, RunningPod] = {}
        self.failed: set[str] = set()  # uids whose start failed: tried again at the next list
        self._adoptable = self._cached_sandboxes()

    # -- reconciling ------------------------------------------------------------------------------
    def _cached_sandboxes(self) -> dict[str, RuntimeConf]:
        network = self.cni.network().name
        return {
            e.container_id: e.runtime_conf()
            for e in self.cni.runtime.cached_entries()
            if e.network == network
        }

    def resync(self, pods: Sequence[dict[str, Any]]) -> None:
        """A full list: run what is new, tear down what is gone (also cached orphans)."""
        self.failed.clear()
        listed = {str(_meta(p).get("uid")) for p in pods}
        for uid in [u for u in self.pods if u not in listed]:
            self.teardown(uid)
        for uid, rt in list(self._adoptable.items()):
            if uid not in listed:
                log.info("tearing down the sandbox of pod %s, which is gone", rt.pod or uid)
                self._adoptable.pop(uid)
                self._unwire(rt)
        for pod in pods:
            self.handle("SYNC", pod)

    def handle(self, event: str, pod: dict[str, Any]) -> None:
        meta = _meta(pod)
        uid = str(meta.get("uid") or "")
        if not uid or (meta.get("annotations") or {}).get(podspec.DIRECT_ANNOTATION):
            return
        if event == "DELETED":
            self.teardown(uid)
            return
        if meta.get("deletionTimestamp"):
            self.teardown(uid)
            self._remove_object(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if uid in self.pods or uid in self.failed or phase in ("Succeeded", "Failed"):
            return
        try:
            self.start(pod)
        except Exception as exc:
            self.teardown(uid)  # whatever part of it started
            self.failed.add(uid)
            log.error(
                "pod %s could not start (tried again at the next full list): %s", _key(pod), exc
            )
            self._patch_status(
                pod, podspec.pending_status("FailedCreatePodSandBox", str(exc), podspec.now())
            )

    # -- starting ---------------------------------------------------------------------------------
    def _runtime_conf(self, pod: dict[str, Any]) -> RuntimeConf:
        meta = _meta(pod)
        uid = str(meta["uid"])
        ref = PodRef(str(meta.get("namespace")), str(meta.get("name")), uid)
        netns_name = pod_netns_name(self.topology.run_id, uid)
        return RuntimeConf(uid, netns_name, POD_IFNAME, pod_args(ref, uid), str(ref))

    def _wire(self, pod: dict[str, Any]) -> tuple[str, ...]:
        """The pod's namespace wired by CNI (adopted when an earlier run wired it); its IPs."""
        rt = self._runtime_conf(pod)
        adopted = self._adoptable.pop(rt.container_id, None)
        if adopted is not None and netns.exists(rt.netns):
            cached = self.cni.runtime.cached(self.cni.network().name, rt)
            try:
                self.cni.runtime.check(self.cni.network(), rt)
            except CniError as exc:
                log.warning("pod %s: CNI CHECK failed, wiring it again: %s", rt.pod, exc)
            else:
                if cached is not None:
                    log.info("pod %s: adopting its namespace %s", rt.pod, rt.netns)
                    return parse_result(cached).ips
        if adopted is not None or netns.exists(rt.netns):
            self._unwire(rt)
        netns.create(rt.netns, POD_SYSCTLS)
        try:
            result = self.cni.add(rt)
        except BaseException:
            self._unwire(rt)
            raise
        return parse_result(result).ips

    def start(self, pod: dict[str, Any]) -> None:
        meta, spec = _meta(pod), pod.get("spec") or {}
        uid, key = str(meta["uid"]), _key(pod)
        found = podspec.containers(pod)
        host_network = bool(spec.get("hostNetwork"))
        ips: tuple[str, ...]
        if host_network:
            where, ips = self.node.netns, (self.node.ip_v4, self.node.ip_v6)
        else:
            ips = self._wire(pod)
            where = pod_netns_name(self.topology.run_id, uid)
        running = RunningPod(uid, key, where, host_network, ips)
        self.pods[uid] = running
        states = self._run_containers(running, found)
        # A pod adopted after a restart keeps the start time an earlier run wrote.
        started = str((pod.get("status") or {}).get("startTime") or podspec.now())
        status = podspec.pod_status(uid, ips, (self.node.ip_v4, self.node.ip_v6), states, started)
        self._patch_status(pod, status)
        log.info("pod %s running in %s with %s", key, where, ", ".join(ips))

    def _run_containers(
        self, pod: RunningPod, found: Sequence[podspec.Container]
    ) -> list[podspec.ContainerState]:
        states: dict[str, podspec.ContainerState] = {}
        echo = [c for c in found if c.kind == "echo"]
        pod.agent = Agent(pod.netns, pod.key)
        try:
            pod.agent.wait_ready()
            ports = podspec.echo_ports(echo)
            futures = [
                (
                    port,
                    proto,
                    pod.agent.request("serve", proto=proto.lower(), port=port, hosts=list(pod.ips)),
                )
                for port, proto in ports
            ]
            failures = []
            for port, proto, fut in futures:
                reply = fut.result(timeout=30)
                if not reply.get("ok"):
                    failures.append(f"{proto}/{port}: {reply.get('error')}")
            for c in echo:
                mine = [f for f in failures if any(f.startswith(f"{p}/{n}:") for n, p in c.ports)]
                states[c.name] = podspec.ContainerState(
                    c.name,
                    c.image,
                    not mine,
                    "" if not mine else "RunContainerError",
                    "; ".join(mine),
                )
        except AgentError as exc:
            for c in echo:
                states[c.name] = podspec.ContainerState(
                    c.name, c.image, False, "RunContainerError", str(exc)
                )
        for c in found:
            if c.kind == "dns":
                states[c.name] = self._run_dns(pod, c)
        return [states[c.name] for c in found]

    def _run_dns(self, pod: RunningPod, c: podspec.Container) -> podspec.ContainerState:
        if not module_available(DNS_MODULE):
            message = f"image {c.image} needs {DNS_MODULE}, which this installation lacks"
            log.error("pod %s container %s: %s", pod.key, c.name, message)
            return podspec.ContainerState(c.name, c.image, False, "RunContainerError", message)
        argv = [
            sys.executable,
            "-u",
            "-m",
            DNS_MODULE,
            "--kubeconfig",
            str(self.kubeconfig),
            "--netns",
            pod.netns,
        ]
        logfile = self.cni.root / "logs" / f"{c.name}-{pod.uid}.log"
        pod.others.append(Child.spawn(f"{pod.key}/{c.name}", argv, logfile, detach=False))
        return podspec.ContainerState(c.name, c.image, True)

    # -- stopping ---------------------------------------------------------------------------------
    def _unwire(self, rt: RuntimeConf) -> None:
        """CNI DEL (errors logged: the namespace goes anyway), then the namespace."""
        try:
            self.cni.delete(rt)
        except CniError as exc:
            log.error("pod %s: %s", rt.pod or rt.container_id, exc)
        netns.remove(rt.netns)

    def teardown(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        self.failed.discard(uid)
        if pod is None:
            return
        pod.stop_processes()
        if not pod.host_network:
            rt = RuntimeConf(uid, pod.netns, POD_IFNAME, (), pod.key)
            self._unwire(rt)
        log.info("pod %s stopped and unwired", pod.key)

    def shutdown(self) -> None:
        for uid in list(self.pods):
            self.teardown(uid)
        for rt in self._cached_sandboxes().values():
            self._unwire(rt)

    # -- API --------------------------------------------------------------------------------------
    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = _meta(pod)
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}, _content_type=MERGE_PATCH
            )
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise

    def _remove_object(self, pod: dict[str, Any]) -> None:
        meta = _meta(pod)
        body = kubernetes.client.V1DeleteOptions(
            grace_period_seconds=0,
            preconditions=kubernetes.client.V1Preconditions(uid=str(meta["uid"])),
        )
        try:
            self.core.delete_namespaced_pod(
                meta["name"], meta["namespace"], grace_period_seconds=0, body=body
            )
        except ApiException as exc:
            if exc.status not in (HTTP_NOT_FOUND, HTTP_CONFLICT):
                raise


# -- the process ----------------------------------------------------------------------------------


def _list(core: Any, node: str) -> tuple[list[dict[str, Any]], str]:
    resp = core.list_pod_for_all_namespaces(
        field_selector=f"spec.nodeName={node}", _preload_content=False
    )
    data = json.loads(resp.data)
    return list(data.get("items") or []), str(data["metadata"]["resourceVersion"])


def _new_watch() -> Any:
    return kubernetes.watch.Watch()  # type: ignore[no-untyped-call]


def watch_pods(
    core: Any,
    node: str,
    events: queue.Queue[tuple[str, Any]],
    stop: threading.Event,
    new_watch: Callable[[], Any] = _new_watch,
) -> None:
    """List, then watch from the list's version; list again when the watch expires (410) or
    fails. Puts ("LIST", pods) and (event type, pod) on `events` until `stop` is set."""
    while not stop.is_set():
        try:
            pods, version = _list(core, node)
            events.put(("LIST", pods))
            while not stop.is_set():
                watch = new_watch()
                for event in watch.stream(
                    core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={node}",
                    resource_version=version,
                    timeout_seconds=WATCH_TIMEOUT_S,
                    allow_watch_bookmarks=True,  # keeps `version` fresh: fewer expired watches
                ):
                    obj = event["raw_object"]
                    version = str(_meta(obj).get("resourceVersion") or version)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        events.put((event["type"], obj))
                    if stop.is_set():
                        watch.stop()
        except ApiException as exc:
            if exc.status != HTTP_GONE:
                log.warning("watching pods failed (%s); listing again", exc.status)
                stop.wait(1.0)
        except Exception as exc:  # the API server restarting, a dropped connection
            log.warning("watching pods failed (%s); listing again", exc)
            stop.wait(1.0)


def run(args: argparse.Namespace) -> int:
    topology = Topology.load(args.topology)
    node = topology.node(args.node)
    cni = NodeCni(node_state_dir(args.state_dir, node.name), node, default_plugin_dir(args.cni_bin))
    cni.install(topology.mode, f"{topology.ifname_prefix}br")
    stop = threading.Event()
    me = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != me:
            # A forked helper (pyroute2 forks to create namespaces, and stops it with SIGTERM)
            # must die as if untouched.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("signal %d: tearing every pod down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    new_client: Any = kubernetes.config.new_client_from_config
    with new_client(config_file=str(args.kubeconfig)) as api:
        kubelet = Kubelet(api, topology, node, cni, args.kubeconfig)
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        core = kubernetes.client.CoreV1Api(api)
        watcher = threading.Thread(
            target=watch_pods, args=(core, node.name, events, stop), daemon=True
        )
        watcher.start()
        log.info("kubelet for %s (netns %s) watching its pods", node.name, node.netns)
        try:
            while not stop.is_set():
                try:
                    kind, obj = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    if kind == "LIST":
                        kubelet.resync(obj)
                    else:
                        kubelet.handle(kind, obj)
                except Exception:  # one pod's trouble (an API error) must not stop the node
                    log.exception(
                        "handling %s %s failed", kind, "pods" if kind == "LIST" else _key(obj)
                    )
        finally:
            kubelet.shutdown()
    log.info("kubelet for %s stopped", node.name)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stockade.sandbox.node.kubelet", description=__doc__.split("\n")[0]
    )
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--node", required=True, help="the node's name (as in the topology)")
    p.add_argument(
        "--state-dir", type=Path, required=True, help="the sandbox run's state directory"
    )
    p.add_argument("--topology", type=Path, required=True, help="the run's topology record")
    p.add_argument("--cni-bin", type=Path, default=None, help="CNI plugin directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
