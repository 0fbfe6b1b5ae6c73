"""The sandbox's key material is private from the moment its file exists: no file holding a
private key is ever readable by others, not even between its write and a later chmod."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.sandbox.controlplane import pki
from stockade.sandbox.controlplane.pki import write_pki

PRIVATE = ("ca_key", "serving_key", "admin_key", "sa_signing_key")
PUBLIC = ("ca_cert", "serving_cert", "admin_cert", "sa_public_key")


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A permissive umask and every later chmod ignored: what is left is the mode each file
    was created with."""
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    monkeypatch.setattr(os, "fchmod", lambda *args, **kwargs: None)
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("name", PRIVATE)
def test_a_private_key_file_is_created_owner_only(
    tmp_path: Path, no_chmod: None, name: str
) -> None:
    paths = write_pki(tmp_path, "10.96.0.1")
    assert mode(getattr(paths, name)) == 0o600


@pytest.mark.parametrize("name", PUBLIC)
def test_a_certificate_file_is_world_readable(tmp_path: Path, name: str) -> None:
    paths = write_pki(tmp_path, "10.96.0.1")
    assert mode(getattr(paths, name)) == 0o644


def test_writing_again_replaces_the_files_and_keeps_keys_private(tmp_path: Path) -> None:
    first = write_pki(tmp_path, "10.96.0.1")
    before = first.ca_key.read_bytes()
    second = write_pki(tmp_path, "10.96.0.1")
    assert second.ca_key.read_bytes() != before
    assert mode(second.ca_key) == 0o600


def test_a_private_file_is_created_owner_only_even_where_it_existed_open_to_all(
    tmp_path: Path, no_chmod: None
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    pki.write_private(path, b"new")
    assert (mode(path), path.read_bytes()) == (0o600, b"new")
