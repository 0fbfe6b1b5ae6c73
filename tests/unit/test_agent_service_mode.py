"""The agent's --service-mode against what the kernel supports, and the Shape it runs."""

from __future__ import annotations

import pytest

from stockade.agent.config import AgentConfig
from stockade.agent.services import (
    FALLBACK,
    NETFILTER,
    ServiceModeError,
    effective_shape,
    resolve_mode,
)
from stockade.compiler.shape import Shape


@pytest.mark.parametrize(
    ("setting", "supported", "mode"),
    [
        ("auto", True, NETFILTER),
        ("auto", False, FALLBACK),
        ("netfilter", True, NETFILTER),
        ("fallback", True, FALLBACK),
        ("fallback", False, FALLBACK),
    ],
)
def test_the_mode_follows_the_setting_and_the_kernel(
    setting: str, supported: bool, mode: str
) -> None:
    assert resolve_mode(setting, supported) == mode


def test_forcing_netfilter_on_a_kernel_without_it_is_an_error_naming_the_setting() -> None:
    with pytest.raises(ServiceModeError, match="--service-mode netfilter"):
        resolve_mode("netfilter", False)


def test_fallback_runs_the_published_shape_without_services_and_netfilter_as_published() -> None:
    shape = Shape(services=True)
    assert effective_shape(shape, FALLBACK) == Shape(services=False, service_fallback=True)
    assert effective_shape(shape, NETFILTER) is shape


def test_an_unknown_setting_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--service-mode: expected auto, netfilter or fallback"):
        AgentConfig(node="n1", service_mode="sometimes")
