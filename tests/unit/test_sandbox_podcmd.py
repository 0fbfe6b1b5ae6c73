"""`stockade sandbox exec` and `probe` read their arguments as kubectl users expect (COMMAND after
`--`, protocol in any case, bad ports and timeouts named), tell Service names from other
targets, read DNS replies with compressed names, and exit with a distinct status per outcome."""

from __future__ import annotations

import struct

import pytest

from stockade import cli
from stockade.sandbox.cluster import podcmd
from stockade.sandbox.cluster.dnswire import HEADER, RType
from stockade.sandbox.cluster.pods import kubelet_netns, parse_reply
from stockade.sandbox.workloads.traffic import Outcome


def test_exec_takes_the_command_after_double_dash_with_its_own_options() -> None:
    args = cli.build_parser().parse_args(
        ["sandbox", "exec", "-n", "shop", "web", "--", "ip", "-o", "addr"]
    )
    assert (args.namespace, args.pod, args.command) == ("shop", "web", ["ip", "-o", "addr"])


def test_probe_parses_target_port_protocol_and_timeout() -> None:
    args = cli.build_parser().parse_args(
        ["sandbox", "probe", "web", "db.shop", "5432", "--protocol", "udp", "--timeout", "0.5"]
    )
    assert (args.namespace, args.pod, args.target, args.port) == ("default", "web", "db.shop", 5432)
    assert (args.protocol, args.timeout) == ("UDP", 0.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["web", "10.0.0.1", "70000"], "PORT must be within 1..65535"),
        (["web", "10.0.0.1", "http"], "PORT must be a number"),
        (["web", "10.0.0.1", "80", "--timeout", "0"], "--timeout must be within"),
        (["web", "10.0.0.1", "80", "--protocol", "icmp"], "invalid choice"),
    ],
    ids=["port-range", "port-name", "timeout", "protocol"],
)
def test_bad_probe_arguments_are_usage_errors_naming_the_field(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["sandbox", "probe", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("web.shop", "web.shop.svc.cluster.local"),
        ("web.shop.svc", "web.shop.svc.cluster.local"),
        ("Web.Shop.svc.cluster.local.", "web.shop.svc.cluster.local"),
        ("web", None),
        ("web.shop.pod", None),
        ("web.shop.svc.cluster.example", None),
        ("web..svc", None),
    ],
)
def test_service_names_are_completed_and_others_are_not_service_names(
    target: str, expected: str | None
) -> None:
    assert podcmd.service_name(target) == expected


def test_every_probe_outcome_has_its_own_exit_status_and_only_connected_is_zero() -> None:
    assert set(podcmd.PROBE_EXIT) == set(Outcome)
    codes = list(podcmd.PROBE_EXIT.values())
    assert len(set(codes)) == len(codes)
    assert [o for o, code in podcmd.PROBE_EXIT.items() if code == 0] == [Outcome.CONNECTED]
    assert not {1, 2} & set(codes)  # 1: could not probe, 2: usage


def test_a_reply_with_compressed_names_is_read_and_other_types_ignored() -> None:
    question = b"\x03web\x04shop\x03svc\x07cluster\x05local\x00" + struct.pack("!HH", 1, 1)
    a = b"\xc0\x0c" + struct.pack("!HHIH", RType.A, 1, 5, 4) + bytes([10, 96, 0, 7])
    cname = b"\xc0\x0c" + struct.pack("!HHIH", RType.CNAME, 1, 5, 2) + b"\xc0\x0c"
    reply = HEADER.pack(9, 0x8500, 1, 2, 0, 0) + question + cname + a
    assert parse_reply(reply, 9, RType.A) == (0, False, ["10.96.0.7"])
    with pytest.raises(ValueError, match="not a reply"):
        parse_reply(reply, 10, RType.A)
    with pytest.raises(ValueError, match=r"truncated|past the end"):
        parse_reply(reply[:-3], 9, RType.A)


def test_kubelet_pods_are_named_after_their_uid() -> None:
    uid = "0f3c2a9e-1b2c-4d5e-8f90-123456789abc"
    assert kubelet_netns("ab1cd", uid) == "stk-ab1cd-pod-0f3c2a9e1b2c"
