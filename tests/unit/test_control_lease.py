"""The lease protocol's rounds on a fake Lease API and a fake clock: who leads, and when the
operator is told to start over as a new leader."""

from __future__ import annotations

import copy

import pytest
from kubernetes.client import V1Lease
from kubernetes.client.exceptions import ApiException

from stockade.control import lease as lease_module
from stockade.control.lease import LeaseElector

DURATION = 3.0  # the replica counts itself leader for 2 s after a renewal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeLeases:
    """One Lease with optimistic concurrency; `slow` seconds pass on `clock` during a replace."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lease: V1Lease | None = None
        self.version = 0
        self.slow = 0.0

    def read_namespaced_lease(self, name: str, namespace: str) -> V1Lease:
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def _store(self, body: V1Lease) -> V1Lease:
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = copy.deepcopy(body)
        return body

    def create_namespaced_lease(self, namespace: str, body: V1Lease) -> V1Lease:
        if self.lease is not None:
            raise ApiException(status=409)
        return self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: V1Lease) -> V1Lease:
        self.clock.now += self.slow
        assert self.lease is not None
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409)
        return self._store(body)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(lease_module, "time", fake)
    return fake


def elector(leases: FakeLeases, identity: str, started: list[str]) -> LeaseElector:
    out = LeaseElector(
        None,  # type: ignore[arg-type]
        namespace="default",
        name="stockade",
        identity=identity,
        duration=DURATION,
        renew_period=0.5,
        on_started=lambda: started.append(identity),
    )
    out._api = leases  # type: ignore[assignment]
    return out


def test_the_first_round_acquires_and_starts_once(clock: Clock) -> None:
    leases, started = FakeLeases(clock), list[str]()
    one = elector(leases, "one", started)
    for _ in range(5):
        one.round()
        clock.now += 0.5
    assert one.is_leader and started == ["one"]


def test_a_renewal_slower_than_the_window_starts_the_leader_over(clock: Clock) -> None:
    # Between the last renewal and the slow one's end, is_leader answered False, so a pass then
    # did nothing: the replica must be told to start over once it leads again.
    leases, started = FakeLeases(clock), list[str]()
    one = elector(leases, "one", started)
    one.round()
    clock.now += 0.5
    leases.slow = 2.5
    one.round()
    leases.slow = 0.0
    clock.now += 0.5
    one.round()
    assert one.is_leader and started == ["one", "one"]


def test_a_held_lease_is_taken_over_only_after_it_stayed_unchanged_for_its_duration(
    clock: Clock,
) -> None:
    leases, started = FakeLeases(clock), list[str]()
    one, two = elector(leases, "one", started), elector(leases, "two", started)
    one.round()
    two.round()
    clock.now += DURATION  # one stops renewing; two has seen the same record for DURATION
    assert not one.is_leader
    two.round()
    assert not two.is_leader, "the record must stay unchanged for longer than the duration"
    clock.now += 0.1
    two.round()
    assert two.is_leader and started == ["one", "two"]
    one.round()  # one comes back: the lease is two's now
    assert not one.is_leader and started == ["one", "two"]


def test_a_released_lease_is_taken_at_once(clock: Clock) -> None:
    leases, started = FakeLeases(clock), list[str]()
    one, two = elector(leases, "one", started), elector(leases, "two", started)
    one.round()
    two.round()
    one.release()
    two.round()
    assert two.is_leader and not one.is_leader and started == ["one", "two"]
    assert leases.lease is not None and leases.lease.spec.lease_transitions == 1
