"""The scale phase's pod sender (bench/convergence.py): pod objects and their statuses sent to
the API server as fast as it takes them, so that the operator's intake, not the bench, is what
`pod_events_per_s` measures.

The Kubernetes client builds and validates a model of every request and answer, which at a few
hundred pods a second is most of a CPU under one interpreter lock. Here each of `processes`
processes keeps `threads` connections and sends the JSON as it is, reading back only the status
code: the work per pod is the API server's.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from kubernetes import config

# A create is retried while its namespace's ServiceAccount is missing (the controller manager
# has not caught up with a new namespace yet), as the sandbox's own `create_pod` does.
from stockade.sandbox.node.registration import SERVICE_ACCOUNT_WAIT, missing_service_account

# namespace, name, body of the create, body of the status patch
PodJob = tuple[str, str, dict[str, Any], dict[str, Any]]

HTTP_CREATED = 201
HTTP_OK = 200


class SendError(RuntimeError):
    pass


def send_pods(
    kubeconfig: str, jobs: list[PodJob], processes: int = 4, threads: int = 8
) -> tuple[float, float]:
    """Create every pod of `jobs` and then patch its status, from `processes` processes of
    `threads` connections each: the wall-clock times of the first request and of the last
    answer (the processes' start-up left out). Raises SendError naming the first pod the
    server refused."""
    chunks = [jobs[i::processes] for i in range(processes) if jobs[i::processes]]
    # spawn, not fork: the caller holds threads (the Kubernetes client's pools, the bench's)
    with multiprocessing.get_context("spawn").Pool(len(chunks)) as pool:
        done = pool.starmap(_send_chunk, [(kubeconfig, c, threads) for c in chunks])
    for problem, _, _ in done:
        if problem:
            raise SendError(problem)
    return min(first for _, first, _ in done), max(last for _, _, last in done)


def _send_chunk(kubeconfig: str, jobs: list[PodJob], threads: int) -> tuple[str, float, float]:
    """One process's share: "" when every pod went in, else what the server said; the times
    of its first request and its last answer."""
    client = config.new_client_from_config(config_file=kubeconfig)
    conf = client.configuration
    http = urllib3.PoolManager(
        num_pools=1,
        maxsize=threads,
        cert_reqs="CERT_REQUIRED",
        ca_certs=conf.ssl_ca_cert,
        cert_file=conf.cert_file,
        key_file=conf.key_file,
    )
    base = conf.host.rstrip("/")

    def one(job: PodJob) -> str:
        ns, name, body, status = job
        url = f"{base}/api/v1/namespaces/{ns}/pods"
        deadline = time.monotonic() + SERVICE_ACCOUNT_WAIT
        while True:
            got = http.request(
                "POST", url, body=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            if got.status == HTTP_CREATED:
                break
            text = got.data.decode(errors="replace")
            if not missing_service_account(got.status, text) or time.monotonic() > deadline:
                return f"create pod {ns}/{name}: HTTP {got.status}: {text[:300]}"
            time.sleep(0.1)
        got = http.request(
            "PATCH",
            f"{url}/{name}/status",
            body=json.dumps(status),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if got.status != HTTP_OK:
            text = got.data.decode(errors="replace")
            return f"patch pod {ns}/{name} status: HTTP {got.status}: {text[:300]}"
        return ""

    first = time.time()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problem = next((p for p in pool.map(one, jobs) if p), "")
    return problem, first, time.time()
