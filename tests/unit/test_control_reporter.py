"""The status reporter looks again only at the policies whose inputs changed (#17): a pass that
follows one change does not rebuild every policy's status to compare it. What it writes and
posts is what a reporter that looks at every policy writes and posts: a status whose write
failed is written on the next pass, an agent's report moves only the policies with endpoints on
its node, and a replica that becomes the leader posts the Events it did not post before."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
from kubernetes.client import ApiClient

from stockade.control import reporter as reporter_module
from stockade.control.policies import PolicyRecord
from stockade.control.reporter import StatusReporter
from stockade.control.store import View
from stockade.model.kinds import PolicyKind
from stockade.model.parse import parse_policy
from stockade.model.policy import Policy


def _policy(name: str, app: str, api_version: str = "stockade.io/v1alpha1") -> Policy:
    return parse_policy(
        {
            "apiVersion": api_version,
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "a"},
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "ingress": [{}]},
        }
    )


def _record(policy: Policy, status: dict[str, Any] | None = None) -> PolicyRecord:
    return PolicyRecord(
        policy.kind,
        policy.namespace,
        policy.name,
        f"uid-{policy.name}",
        1,
        policy,
        (),
        status or {},
    )


class Reporter(StatusReporter):
    """A StatusReporter whose writes and Events are recorded, and whose writes can fail."""

    def __init__(self, leader: list[bool]) -> None:
        super().__init__(ApiClient(), lambda: leader[0])
        self.written: list[str] = []
        self.posted: list[tuple[str, str]] = []
        self.fail = False

    def _write_status(self, record: PolicyRecord, status: dict[str, Any]) -> bool:
        if self.fail:
            raise RuntimeError("the API server refused")
        self.written.append(record.name)
        return True


@pytest.fixture
def looked_at(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The policies whose status the reporter builds, pass by pass."""
    seen: list[str] = []
    desired = reporter_module.desired_status

    def counting(record: PolicyRecord, *args: Any) -> dict[str, Any]:
        seen.append(record.name)
        return desired(record, *args)

    monkeypatch.setattr(reporter_module, "desired_status", counting)
    return seen


def test_only_policies_whose_inputs_changed_are_looked_at_again(
    looked_at: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporter_module, "post_event", lambda api, record, kind, reason, msg: None)
    web, db = _policy("web", "web"), _policy("db", "db")
    records = {_record(p).key: _record(p) for p in (web, db)}
    selected = {web.subject: {"n0": 2}, db.subject: {"n1": 1}}
    reports: dict[str, Any] = {"n0": {"appliedGeneration": 1}, "n1": {"appliedGeneration": 1}}
    reporter = Reporter([True])
    reporter.carried(View(MappingProxyType(records), MappingProxyType(reports)), {"n0": 2, "n1": 2})

    def report() -> None:
        reporter.report(View(MappingProxyType(records), MappingProxyType(reports)), {}, selected)

    report()  # both Pending: written
    assert sorted(reporter.written) == ["db", "web"] and sorted(looked_at) == ["db", "web"]
    report()  # nothing changed: the writes are remembered, neither needs more
    report()
    assert sorted(reporter.written) == ["db", "web"]
    looked_at.clear()
    report()
    assert looked_at == []
    reports["n0"] = {"appliedGeneration": 2}  # web's node applied its generation
    report()
    assert looked_at == ["web"] and reporter.written[-1] == "web"
    looked_at.clear()
    reporter.fail = True  # db's node applies, but the write fails: it is tried again
    reports["n1"] = {"appliedGeneration": 2}
    with pytest.raises(RuntimeError):
        report()
    reporter.fail = False
    report()
    # web once more after its write (settled when nothing more is due), db again after the
    # failure
    assert looked_at == ["db", "web", "db"] and reporter.written[-1] == "db"
    # the API server's copy catches up with what was written: looked at once, nothing to write
    for key, record in records.items():
        records[key] = _record(record.policy, reporter._written[key])  # type: ignore[arg-type]
    looked_at.clear()
    count = len(reporter.written)
    report()
    report()
    assert sorted(looked_at) == ["db", "web"] and len(reporter.written) == count


def test_a_replica_that_becomes_the_leader_posts_what_it_did_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The standard NetworkPolicy has no status: its Programmed Event comes from the leader."""
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        reporter_module,
        "post_event",
        lambda api, record, kind, reason, msg: posted.append((record.name, reason)),
    )
    netpol = _policy("web", "web", "networking.k8s.io/v1")
    assert netpol.kind is PolicyKind.NETWORK_POLICY
    records = {_record(netpol).key: _record(netpol)}
    leader = [False]
    reporter = Reporter(leader)
    view = View(MappingProxyType(records), MappingProxyType({"n0": {"appliedGeneration": 3}}))
    reporter.carried(view, {"n0": 3})
    reporter.report(view, {}, {netpol.subject: {"n0": 1}})
    assert posted == []
    leader[0] = True
    reporter.report(view, {}, {netpol.subject: {"n0": 1}})
    assert posted == [("web", "Programmed")]
    reporter.report(view, {}, {netpol.subject: {"n0": 1}})
    assert posted == [("web", "Programmed")]
