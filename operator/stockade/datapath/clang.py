"""Compile rendered BPF C with clang, through a content-addressed cache.

The agent calls `Compiler.compile()` with a rendered program's files (the entry file and the
headers it includes). The cache key is the sha256 of every source byte, the clang version and the
flags, so the same Shape compiles once per node and clang version; a hit costs a file read.
The flags are defined here once, with -Werror.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# The only place the flags are written down. The multiarch include directory gives clang the
# kernel UAPI's <asm/types.h> when targeting bpf.
BASE_FLAGS: tuple[str, ...] = (
    "-O2",
    "-g",
    "-target",
    "bpf",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fno-ident",
)
DEFAULT_CACHE_DIR = Path("/var/cache/stockade/bpf")


class CompileError(RuntimeError):
    """clang rejected a program; the message carries clang's diagnostics."""


@dataclass(frozen=True)
class CompiledObject:
    key: str  # the cache key: sha256 of sources, clang version and flags
    path: Path  # the cached ELF object
    cache_hit: bool

    def read(self) -> bytes:
        return self.path.read_bytes()


@cache
def _clang_version(clang: str) -> str:
    out = subprocess.run([clang, "--version"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@cache
def _multiarch_include(clang: str) -> tuple[str, ...]:
    out = subprocess.run([clang, "-print-multiarch"], check=False, capture_output=True, text=True)
    triple = out.stdout.strip()
    path = Path("/usr/include") / triple
    return ("-idirafter", str(path)) if triple and path.is_dir() else ()


class Compiler:
    """clang plus its cache directory. Safe to share; writes are atomic renames."""

    def __init__(self, cache_dir: Path = DEFAULT_CACHE_DIR, clang: str = "clang") -> None:
        self.cache_dir = cache_dir
        self.clang = clang

    @property
    def version(self) -> str:
        return _clang_version(self.clang)

    @property
    def flags(self) -> tuple[str, ...]:
        return BASE_FLAGS + _multiarch_include(self.clang)

    def key(self, files: Mapping[str, str], entry: str) -> str:
        payload = {
            "clang": self.version,
            "flags": list(self.flags),
            "entry": entry,
            "files": sorted(files.items()),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def compile(self, files: Mapping[str, str], entry: str) -> CompiledObject:
        """Compile `files[entry]` (which includes the other files by name) to a BPF object."""
        if entry not in files:
            raise CompileError(f"entry file {entry!r} is not among the sources {sorted(files)}")
        for name in files:
            if "/" in name or name.startswith(".") or not name:
                raise CompileError(f"source file name {name!r} must be a plain file name")
        key = self.key(files, entry)
        target = self.cache_dir / f"{key}.o"
        if target.is_file():
            return CompiledObject(key=key, path=target, cache_hit=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="stockade-clang-") as tmp:
            src = Path(tmp)
            for name, text in files.items():
                (src / name).write_text(text)
            out = src / "out.o"
            cmd = [self.clang, *self.flags, "-I", str(src), "-c", str(src / entry), "-o", str(out)]
            result = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if result.returncode != 0:
                raise CompileError(f"clang failed on {entry}:\n{result.stderr.strip()}")
            fd, partial = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.")
            with os.fdopen(fd, "wb") as fh:
                fh.write(out.read_bytes())
            os.replace(partial, target)
        return CompiledObject(key=key, path=target, cache_hit=False)
