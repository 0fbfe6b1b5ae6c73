"""The runtime/bench boundary as a user meets it: the `bench` extra holds what only the bench
needs, and the CLI, run where the bench (or its extra) is not installed, still runs the operator
and the agent and says what to install for a bench command.

The installations are simulated in a fresh interpreter that refuses to import the bench's modules.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import tomllib
from collections.abc import Callable

import pytest

from stockade import cli
from stockade.conformance import command as conformance_command
from tests.paths import ROOT

BENCH_EXTRA_ONLY = ("cryptography",)
NO_BENCH = ("stockade.sandbox", "stockade.conformance", "stockade.harness", "cryptography")
INSTALLATIONS = [BENCH_EXTRA_ONLY, NO_BENCH]
INSTALLATION_IDS = ["without-the-bench-extra", "as-in-the-images"]
CASE_FILE = ROOT / "tests" / "conformance" / "data" / "stockade-extensions.yaml"

# A fresh `stockade` whose imports of the modules named in argv[1] fail as if not installed.
STOCKADE_WITHOUT = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == m or name.startswith(m + ".") for m in sys.argv[1].split(",")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
from stockade import cli
raise SystemExit(cli.main(sys.argv[2:]))
"""


def stockade_without(missing: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", STOCKADE_WITHOUT, ",".join(missing), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_names_the_modules_the_import_contract_keeps_out_of_the_runtime() -> None:
    contracts = configparser.ConfigParser()
    contracts.read(ROOT / ".importlinter")
    forbidden = contracts["importlinter:contract:bench"]["forbidden_modules"].split()
    assert tuple(forbidden) == cli.BENCH_MODULES


def test_what_only_the_bench_needs_is_in_the_bench_extra_which_dev_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for module in BENCH_EXTRA_ONLY:
        assert module not in core
        assert any(spec.startswith(module) for spec in extras["bench"])
    assert "stockade[bench]" in extras["dev"]


@pytest.mark.parametrize("missing", INSTALLATIONS, ids=INSTALLATION_IDS)
@pytest.mark.parametrize(
    "command",
    [["sandbox", "--state-dir", "/nonexistent", "up", "--nodes", "2"], ["demo", "--help"]],
    ids=["sandbox-up", "demo-help"],
)
def test_a_bench_command_without_the_bench_says_what_to_install(
    missing: tuple[str, ...], command: list[str]
) -> None:
    result = stockade_without(missing, *command)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"stockade: error: `stockade {command[0]}` is part of")
    assert "pip install -e '.[bench]'" in result.stderr
    assert repr(missing[0]) in result.stderr
    assert "Traceback" not in result.stderr


def test_in_the_images_the_conformance_runner_says_it_is_not_installed() -> None:
    result = stockade_without(NO_BENCH, "conformance", "run", "cases.yaml", "--engine", "cluster")
    assert result.returncode == 1
    assert "no module 'stockade.conformance'" in result.stderr


def engine_needing(module: str) -> Callable[..., object]:
    def create_engine(*args: object) -> object:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    return create_engine


def test_a_bench_command_that_meets_a_missing_bench_module_as_it_runs_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(conformance_command, "create_engine", engine_needing("cryptography"))
    assert cli.main(["conformance", "run", str(CASE_FILE), "--engine", "e2e"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("stockade: error: `stockade conformance` is part of")
    assert "no module 'cryptography'" in error
    assert "pip install -e '.[bench]'" in error


def test_a_missing_module_outside_the_bench_is_not_mistaken_for_the_bench(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conformance_command, "create_engine", engine_needing("kopf"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["conformance", "run", str(CASE_FILE), "--engine", "e2e"])


@pytest.mark.parametrize("missing", INSTALLATIONS, ids=INSTALLATION_IDS)
def test_the_operator_and_the_agent_run_without_the_bench(missing: tuple[str, ...]) -> None:
    listing = stockade_without(missing, "--help")
    assert listing.returncode == 0, listing.stderr
    assert "(not installed: part of the bench)" in listing.stdout
    for command in ("operator", "agent"):
        result = stockade_without(missing, command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: stockade {command}")
