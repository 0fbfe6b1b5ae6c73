"""How `stockade observe`, `usage` and `explain` reach each node's agent.

Both ways answer the agent's JSON routes (`/flows`, `/usage`, `/trace`, served beside
`/metrics` by `stockade.agent.app`):

- `ProxyAgents`: through the API server, `GET /api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/
  <route>` to each agent pod (found by the chart's labels): the caller needs `get` on
  `pods/proxy` in the agents' namespace, and nothing reaches a node but through the API server.
- `DirectAgents`: at URLs given as `--agent NODE=URL` (the sandbox's agents are processes on
  this machine, not pods).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes.client

AGENT_SELECTOR = "app.kubernetes.io/name=stockade,app.kubernetes.io/component=agent"
DEFAULT_NAMESPACE = "stockade-system"  # where docs/install.md installs the chart
DEFAULT_PORT = 9471  # the chart's agent.metrics.port
TIMEOUT = 10.0


class AgentError(RuntimeError):
    """An agent could not be asked; the message names the node."""


class Agents(Protocol):
    def nodes(self) -> list[str]: ...

    def get(self, node: str, route: str, query: Mapping[str, object]) -> Any: ...


def _query(query: Mapping[str, object]) -> str:
    return urllib.parse.urlencode({k: str(v) for k, v in query.items() if v is not None})


@dataclass
class DirectAgents:
    urls: Mapping[str, str]  # node -> base URL of the agent's HTTP endpoint

    def nodes(self) -> list[str]:
        return sorted(self.urls)

    def get(self, node: str, route: str, query: Mapping[str, object]) -> Any:
        base = self.urls.get(node)
        if base is None:
            raise AgentError(f"node {node}: no agent URL given (--agent {node}=URL)")
        url = f"{base.rstrip('/')}/{route.lstrip('/')}?{_query(query)}"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
                return json.loads(answer.read())
        except OSError as exc:
            raise AgentError(f"node {node}: agent at {base}: {exc}") from exc


class ProxyAgents:
    """Agent pods, reached through the API server's pods/proxy subresource."""

    def __init__(
        self,
        api: Any,
        namespace: str = DEFAULT_NAMESPACE,
        port: int = DEFAULT_PORT,
        selector: str = AGENT_SELECTOR,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.port = port
        self._pods: dict[str, str] = {}
        listed = kubernetes.client.CoreV1Api(api).list_namespaced_pod(
            namespace, label_selector=selector
        )
        for pod in api.sanitize_for_serialization(listed)["items"]:
            node = (pod.get("spec") or {}).get("nodeName")
            if node and (pod.get("status") or {}).get("phase") == "Running":
                self._pods[str(node)] = str(pod["metadata"]["name"])

    def nodes(self) -> list[str]:
        return sorted(self._pods)

    def get(self, node: str, route: str, query: Mapping[str, object]) -> Any:
        pod = self._pods.get(node)
        if pod is None:
            raise AgentError(f"node {node}: no running agent pod in namespace {self.namespace}")
        path = (
            f"/api/v1/namespaces/{self.namespace}/pods/{pod}:{self.port}/proxy/{route.lstrip('/')}"
        )
        method, url, headers, body, post = self.api.param_serialize(
            "GET",
            path,
            query_params=[(k, str(v)) for k, v in query.items() if v is not None],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            answer = self.api.call_api(method, url, headers, body, post, _request_timeout=TIMEOUT)
            data = answer.read()
        except (OSError, kubernetes.client.exceptions.OpenApiException) as exc:
            raise AgentError(f"node {node}: agent pod {pod}: {exc}") from exc
        if not 200 <= answer.status < 300:
            text = data.decode(errors="replace")[:300] if data else ""
            raise AgentError(f"node {node}: agent pod {pod}: {answer.status} {text}")
        return json.loads(data)


def parse_agent_urls(values: list[str] | None, setting: str | None = None) -> dict[str, str]:
    """`NODE=URL` options, else the comma-separated `setting` (STOCKADE_AGENTS); ValueError
    names a malformed one."""
    if not values and setting:
        values = [v for v in setting.split(",") if v]
    urls = {}
    for value in values or []:
        node, sep, url = value.partition("=")
        if not sep or not node or not url.startswith(("http://", "https://")):
            raise ValueError(f"--agent: expected NODE=http://HOST:PORT, got {value!r}")
        urls[node] = url
    return urls
