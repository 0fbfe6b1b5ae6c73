"""The one netlink answer CNI ADD reads (`stockade.datapath.iface.peer_ifindex`): the peer's
ifindex from an RTM_NEWLINK, a named error from NLMSG_ERROR, and no peer for a non-veth."""

from __future__ import annotations

import errno
import struct

import pytest

from stockade.datapath import iface


def _answer(kind: int, body: bytes) -> bytes:
    return iface._NLMSG.pack(iface._NLMSG.size + len(body), kind, 0, 1, 0) + body


def _link(*attrs: tuple[int, bytes]) -> bytes:
    body = iface._IFINFOMSG.pack(0, 0, 1, 7, 0, 0)
    for kind, value in attrs:
        attr = iface._RTATTR.pack(iface._RTATTR.size + len(value), kind) + value
        body += attr + b"\0" * (-len(attr) % 4)
    return _answer(iface.RTM_NEWLINK, body)


def test_the_peer_of_a_veth_is_its_ifla_link_after_the_attributes_before_it() -> None:
    data = _link((iface.IFLA_IFNAME, b"eth0\0"), (iface.IFLA_LINK, struct.pack("=I", 42)))
    assert iface._link_of_reply(data, "eth0") == 42


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_answer(iface.NLMSG_ERROR, struct.pack("=i", -errno.ENODEV)), "No such device"),
        (_link((iface.IFLA_IFNAME, b"lo\0")), "is no veth"),
        (_link((iface.IFLA_LINK, struct.pack("=I", 0))), "is no veth"),
        (b"\0" * 4, "short netlink answer"),
    ],
    ids=["no-such-interface", "no-ifla-link", "link-zero", "truncated"],
)
def test_an_answer_without_a_peer_names_why(data: bytes, message: str) -> None:
    with pytest.raises(iface.InterfaceNotFoundError, match=message):
        iface._link_of_reply(data, "eth0")
