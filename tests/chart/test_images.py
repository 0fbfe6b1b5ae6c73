"""The Dockerfiles cannot be built here (no Docker); check what they promise: a Debian bookworm
base, pinned clang and libbpf in the agent, a non-root operator, COPY sources that exist, and
only the runtime of the package (the side of .importlinter's runtime/bench contract that the
images carry)."""

from __future__ import annotations

import configparser
import re

import pytest

from tests.paths import ROOT

IMAGES = ROOT / "images"
PREFIX = "operator/stockade"
PACKAGE = ROOT / PREFIX
# What every installation carries besides the two sides: the package's root and the command line,
# which stands in for a bench command when the bench is not installed.
SHARED = ("__init__.py", "py.typed", "cli.py")


def dockerfile(name: str) -> str:
    return (IMAGES / f"{name}.Dockerfile").read_text()


def args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def copied(text: str) -> set[str]:
    """Every COPY source of the build (not `--from` another stage)."""
    return {
        path
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M)
        for path in source.split()
    }


def sides() -> tuple[list[str], list[str]]:
    """The runtime's and the bench's top-level entries of the package as .importlinter's
    runtime/bench contract names them (`stockade.runtime` is runtime.py, `stockade.model` is
    model/)."""
    contracts = configparser.ConfigParser()
    contracts.read(ROOT / ".importlinter")
    contract = contracts["importlinter:contract:bench"]

    def entries(modules: str) -> list[str]:
        names = [m.removeprefix("stockade.") for m in modules.split() if m.startswith("stockade.")]
        return [f"{n}/" if (PACKAGE / n).is_dir() else f"{n}.py" for n in names]

    return entries(contract["source_modules"]), entries(contract["forbidden_modules"])


def test_every_part_of_the_package_is_on_one_side_of_the_runtime_bench_boundary() -> None:
    runtime, bench = sides()
    assert not set(runtime) & set(bench)
    present = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()} - {"__pycache__/"}
    assert present == {*runtime, *bench, *SHARED}


@pytest.mark.parametrize("name", ["operator", "agent"])
def test_the_image_installs_the_runtime_and_leaves_the_bench_out(name: str) -> None:
    text = dockerfile(name)
    runtime, _ = sides()
    package = {p.removeprefix(f"{PREFIX}/") for p in copied(text) if p.startswith("operator/")}
    assert package == {*runtime, *SHARED}
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("[" not in line for line in installs), "the image installs an extra"


@pytest.mark.parametrize("name", ["operator", "agent"])
def test_the_image_builds_from_debian_bookworm_and_copies_files_that_exist(name: str) -> None:
    text = dockerfile(name)
    assert args(text)["DEBIAN_IMAGE"] == "debian:bookworm-slim"
    assert re.findall(r"^FROM \$\{DEBIAN_IMAGE\}", text, re.M)
    for path in copied(text):
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
