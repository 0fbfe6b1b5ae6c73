"""The Dockerfiles cannot be built here (no Docker); check what they promise: a Debian bookworm
base, pinned clang and libbpf in the agent, a non-root operator, and COPY sources that exist."""

from __future__ import annotations

import re

import pytest

from tests.paths import ROOT

IMAGES = ROOT / "images"


def dockerfile(name: str) -> str:
    return (IMAGES / f"{name}.Dockerfile").read_text()


def args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


@pytest.mark.parametrize("name", ["operator", "agent"])
def test_the_image_builds_from_debian_bookworm_and_copies_files_that_exist(name: str) -> None:
    text = dockerfile(name)
    assert args(text)["DEBIAN_IMAGE"] == "debian:bookworm-slim"
    assert re.findall(r"^FROM \$\{DEBIAN_IMAGE\}", text, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{name}: COPY {path} does not exist"
    assert re.search(r"^ENTRYPOINT \[\"stockade\"\]$", text, re.M)


def test_the_agent_installs_pinned_clang_and_libbpf() -> None:
    text = dockerfile("agent")
    pins = args(text)
    for package, arg in (
        ("clang-14", "CLANG_VERSION"),
        ("clang", "CLANG_META_VERSION"),
        ("libbpf1", "LIBBPF_VERSION"),
        ("libbpf-dev", "LIBBPF_VERSION"),
        ("linux-libc-dev", "LINUX_LIBC_DEV_VERSION"),
    ):
        assert f"{package}=${{{arg}}}" in text, f"{package} is not pinned"
        assert re.match(r"^(\d+:)?[\w.~+-]+$", pins[arg]), f"{arg}={pins[arg]!r}"
    assert pins["CLANG_VERSION"].startswith("1:14.")
    assert pins["LIBBPF_VERSION"].startswith("1:1.1.")


def test_the_operator_runs_as_a_non_root_user_without_a_compiler() -> None:
    text = dockerfile("operator")
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "clang" not in text
    assert "libbpf" not in text
