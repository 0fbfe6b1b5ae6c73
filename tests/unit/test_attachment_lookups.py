"""Where an agent looks up pod interfaces: before the apply lock (`Attachments.prefetch`), never
under it for what the prefetch could have looked up. On a bridge a lookup that cannot resolve
waits out its retries (about two seconds for two addresses), and a CNI ADD waits for the lock."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from stockade.agent import attachments
from stockade.agent.attachments import Attachments, Endpoint
from stockade.datapath.iface import HostInterface, InterfaceNotFoundError


class _Bindings:
    def read(self) -> dict[int, int]:
        return {}

    def unbind(self, ifindex: int) -> None:
        raise AssertionError(f"nothing is bound, {ifindex} cannot be unbound")


def test_an_interface_whose_links_are_gone_is_looked_up_before_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = Endpoint(7, (ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("fd00::7")))
    looked_up: list[tuple[str, Endpoint]] = []
    phase = "prefetch"

    def find_interface(
        found: Endpoint, attempts: int = attachments.RESOLVE_ATTEMPTS
    ) -> HostInterface:
        looked_up.append((phase, found))
        raise InterfaceNotFoundError("no neighbours resolve 10.0.0.7")

    monkeypatch.setattr(attachments, "find_interface", find_interface)
    links = Attachments(tmp_path)  # no links pinned under tmp_path: the known interface is dead
    links._found = {endpoint.addresses: HostInterface(41, "veth-gone")}

    links.prefetch([endpoint])
    phase = "reconcile"  # what the sync does under the apply lock
    result = links.reconcile([endpoint], {}, _Bindings())  # type: ignore[arg-type]

    assert looked_up == [("prefetch", endpoint)]
    assert [f.reason for f in result.failures] == ["InterfaceNotFound"]
    assert "no neighbours" in result.failures[0].message


def test_a_live_interface_is_not_looked_up_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = Endpoint(8, (ipaddress.ip_address("10.0.0.8"),))
    monkeypatch.setattr(
        attachments, "find_interface", lambda e: pytest.fail(f"looked up {e} again")
    )
    links = Attachments(tmp_path)
    links._found = {endpoint.addresses: HostInterface(42, "veth-live")}
    monkeypatch.setattr(Attachments, "_alive", lambda self, found: found.ifindex == 42)
    links.prefetch([endpoint])
    assert links._prefetched == {}


def test_an_interface_gone_while_the_sync_waited_for_the_lock_gets_one_look_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod was deleted after the prefetch found its interface alive: reconcile looks once,
    without waiting for a neighbour (the next sync looks again)."""
    endpoint = Endpoint(9, (ipaddress.ip_address("10.0.0.9"),))
    attempts_seen: list[int] = []

    def find_interface(
        found: Endpoint, attempts: int = attachments.RESOLVE_ATTEMPTS
    ) -> HostInterface:
        attempts_seen.append(attempts)
        raise InterfaceNotFoundError("no neighbours resolve 10.0.0.9")

    monkeypatch.setattr(attachments, "find_interface", find_interface)
    links = Attachments(tmp_path)
    links._found = {endpoint.addresses: HostInterface(43, "veth-deleted")}
    alive = True
    monkeypatch.setattr(Attachments, "_alive", lambda self, found: alive)
    links.prefetch([endpoint])
    alive = False  # the pod's DEL removed its veth while the sync waited for the apply lock
    result = links.reconcile([endpoint], {}, _Bindings())  # type: ignore[arg-type]
    assert attempts_seen == [1]
    assert [f.reason for f in result.failures] == ["InterfaceNotFound"]

    links._found = {endpoint.addresses: HostInterface(43, "veth-deleted")}
    links.reconcile([endpoint], {}, _Bindings())  # type: ignore[arg-type]  # no prefetch
    assert attempts_seen == [1, attachments.RESOLVE_ATTEMPTS]
