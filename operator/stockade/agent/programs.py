"""The node's two tc programs for a Shape: rendered, compiled through the cache, loaded once and
pinned, so that a restarted agent adopts them instead of loading (and attaching) new ones.

`stockade.agent.sync` calls `Programs.ensure(shape)` on every sync; only a new Shape renders,
compiles (a cache hit costs a file read) and loads anything. Programs are pinned under
`<pin root>/programs/<digest>/<program name>`, where the digest covers both compile-cache keys
(sources, clang version and flags): the same digest is the same bytes. Maps are pinned by name
under the pin root by libbpf on the first load and shared by every later load; a Shape that
changes a pinned map's size or layout migrates it (`stockade.agent.migrate`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from stockade.agent import migrate
from stockade.agent.migrate import Migration
from stockade.compiler.render import Hook, render_all
from stockade.compiler.shape import Shape
from stockade.datapath import libbpf, maps
from stockade.datapath.clang import Compiler

log = logging.getLogger(__name__)

PROGRAMS_DIR = "programs"


@dataclass(frozen=True)
class Program:
    hook: Hook
    fd: int  # owned by Programs
    id: int


@dataclass
class ProgramStats:
    renders: int = 0
    compile_misses: int = 0  # clang ran
    compile_hits: int = 0  # the cache had the object
    loads: int = 0  # objects loaded into the kernel
    adoptions: int = 0  # pinned programs reused as they were
    migrations: int = 0  # new Shapes that changed pinned maps' sizes or layouts
    last_compile_seconds: float = 0.0
    last_load_seconds: float = 0.0


class Programs:
    """The programs currently in force; one per agent."""

    def __init__(self, compiler: Compiler, pin_root: Path) -> None:
        self.compiler = compiler
        self.pin_root = pin_root
        self.shape: Shape | None = None
        self.digest = ""
        self.programs: dict[Hook, Program] = {}
        self.stats = ProgramStats()
        # Set by `ensure` when the new programs came with new maps: the agent writes the
        # tables, moves the links, then calls `migration.settle()` (stockade.agent.sync).
        self.migration: Migration | None = None

    def _dir(self, digest: str) -> Path:
        return self.pin_root / PROGRAMS_DIR / digest

    def ensure(self, shape: Shape) -> bool:
        """Make the programs of `shape` current; True when they changed."""
        if shape == self.shape and self.programs:
            return False
        began = time.monotonic()
        rendered = render_all(shape)
        self.stats.renders += 1
        objects = {}
        for program in rendered:
            obj = self.compiler.compile(program.files, program.filename)
            if obj.cache_hit:
                self.stats.compile_hits += 1
            else:
                self.stats.compile_misses += 1
            objects[program.hook] = (program, obj)
        digest = hashlib.sha256("".join(o.key for _, o in objects.values()).encode()).hexdigest()
        self.stats.last_compile_seconds = time.monotonic() - began
        if digest == self.digest and self.programs:
            self.shape = shape
            return False
        began = time.monotonic()
        pin_dir = self._dir(digest)
        self._recover()
        loaded: dict[Hook, Program] = {}
        migration: Migration | None = None
        load_root = self.pin_root
        try:
            if maps.ensure_pending_hint(self.pin_root):
                log.info("made %s, counting the pending interfaces", maps.PENDING_HINT)
            if not all((pin_dir / p.program).exists() for p, _ in objects.values()):
                stale = migrate.plan(self.pin_root, shape)
                if stale:
                    migration = Migration(self.pin_root, digest, stale)
                    load_root = migration.stage(shape)
            for hook, (program, obj) in objects.items():
                pin = pin_dir / program.program
                if not pin.exists():
                    self._load_and_pin(obj.read(), program.program, pin, load_root)
                    self.stats.loads += 1
                else:
                    self.stats.adoptions += 1
                fd = libbpf.obj_get(pin)
                loaded[hook] = Program(hook, fd, libbpf.prog_info(fd).id)
            if migration is not None:
                migration.copy()
                migration.swap()
        except BaseException:
            for p in loaded.values():
                os.close(p.fd)
            if migration is not None and not migration.swapped:
                migration.abort()
                shutil.rmtree(pin_dir, ignore_errors=True)  # bound to maps that are not in force
            raise
        if migration is not None:
            self.stats.migrations += 1
            log.info(
                "pinned maps migrated to shape %s: %s", shape.digest()[:12], migration.describe()
            )
        self.migration = migration
        self.stats.last_load_seconds = time.monotonic() - began
        self._close()
        self.programs, self.shape, self.digest = loaded, shape, digest
        log.info("programs %s in force (shape %s)", digest[:12], shape.digest()[:12])
        return True

    def _recover(self) -> None:
        """A migration cut short (the agent stopped before the swap) left staged maps and the
        programs loaded against them: drop both, so the next load starts again."""
        staged = self.pin_root / migrate.MIGRATE_DIR
        if not staged.is_dir():
            return
        for path in staged.iterdir():
            if path.name != self.digest:
                shutil.rmtree(self._dir(path.name), ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)

    def _load_and_pin(self, data: bytes, name: str, pin: Path, maps_root: Path) -> None:
        pin.parent.mkdir(parents=True, exist_ok=True)
        with libbpf.BpfObject(data, name, maps_root).load() as obj:
            libbpf.obj_pin_whole(obj.program(name).fd, pin)

    def retire(self) -> list[str]:
        """Unpin programs of other digests (after the links moved to the current ones)."""
        root = self.pin_root / PROGRAMS_DIR
        removed = []
        if root.is_dir():
            for path in root.iterdir():
                if path.name != self.digest:
                    shutil.rmtree(path)
                    removed.append(path.name)
        return removed

    def _close(self) -> None:
        for p in self.programs.values():
            os.close(p.fd)
        self.programs = {}

    def close(self) -> None:
        """Close the fds; the pins (and the programs in force) stay."""
        self._close()
