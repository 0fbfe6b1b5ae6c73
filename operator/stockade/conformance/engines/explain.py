"""The `explain` engine: conformance cases answered by `stockade explain` on the whole stack.

The cluster is the `e2e` engine's (a sandbox with the operator and an agent per node, the
model's pods, policies sent through the API server, the reset between cases); only the probes
differ. Each check is answered by `stockade.inspect.explain` as a user runs it: the reference
evaluator on the live cluster read from the API server, and the datapath's verdict from the
agents of the source's and the destination's nodes (test runs of their loaded programs, at the
agents' HTTP endpoints the sandbox recorded). A check is allowed or denied as explain says, and
an error when the datapath disagrees with the reference (the detail names the disagreement), so
a case passes only when explain gives the expected verdict on every check and the datapath
agrees with it. No traffic is sent for the checks.

`stockade conformance run FILE --engine explain`; `tests/e2e/test_inspect_commands.py` runs
a sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from stockade.conformance.casefile import Check
from stockade.conformance.engine import Observed, Outcome
from stockade.conformance.engines.e2e import E2EEngine, from_options
from stockade.inspect import explain, live
from stockade.inspect.agents import DirectAgents
from stockade.model.policy import Protocol
from stockade.sandbox import session

ECHO_REQUEST = {Protocol.ICMP: 8, Protocol.ICMPV6: 128}


class ExplainEngine(E2EEngine):
    name = "explain"

    def _agents(self) -> DirectAgents:
        sandbox = self._sandbox()
        state = session.SandboxState.load(sandbox.state_dir)
        if state is None or state.stack is None or not state.stack.agent_ports:
            raise RuntimeError(f"the sandbox in {sandbox.state_dir} recorded no agent endpoints")
        return DirectAgents(state.stack.agent_urls())

    def _probe_once(self, checks: Sequence[Check]) -> list[Observed]:
        assert self.addresses is not None
        agents = self._agents()
        current = live.read(self._sandbox().api)
        out = []
        for check in checks:
            src = explain.resolve(current, str(self.addresses.pod_ip(check.src)))
            dst = explain.resolve(current, str(self.addresses.pod_ip(check.dst)))
            port = check.port if check.port is not None else ECHO_REQUEST[check.protocol]
            flow = explain.flow_of(src, dst, check.protocol, port, 0)
            result = explain.explain(current, agents, src, dst, flow)
            if not result.agree:
                problems = [p for hop in result.hops for p in hop.problems]
                out.append(Observed(check, Outcome.ERROR, "; ".join(problems)))
                continue
            seen = Outcome.CONNECTED if result.decision.allowed else Outcome.TIMEOUT
            out.append(Observed(check, seen, result.decision.reason))
        return out


def engine_from_options(ip_family: int) -> ExplainEngine:
    """As the CLI builds it: a sandbox of its own, or `$STOCKADE_E2E_SANDBOX`'s."""
    base = from_options(ip_family)
    return ExplainEngine(base.family, sandbox_dir=base.sandbox_dir)
