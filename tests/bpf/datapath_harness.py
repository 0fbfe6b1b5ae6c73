"""The datapath under test: both programs of a Shape, compiled and loaded with their maps pinned
under a private pin root, plus the table writer and event reader the agent uses.

Used by tests/bpf/test_datapath_*.py (cilium's set-up-maps / run / check-verdict pattern).
Everything it creates (pins, objects, fds) is removed by `close()`, also when a test fails.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stockade.compiler import ir
from stockade.compiler.render import Hook, RenderedProgram, render_all
from stockade.compiler.shape import Shape
from stockade.datapath import events, libbpf, maps
from stockade.datapath.clang import Compiler
from stockade.harness import testrun
from stockade.harness.loader import bind_sender, conntrack_clock

CACHE_DIR = Path("/tmp/stockade-test-bpf-cache")
BPFFS = Path("/sys/fs/bpf")


def compiler() -> Compiler:
    return Compiler(CACHE_DIR)


def private_pin_root() -> Path:
    root = BPFFS / f"stockade-test-{uuid.uuid4().hex[:12]}"
    root.mkdir()
    return root


def load_object(program: RenderedProgram, pin_root: Path) -> libbpf.BpfObject:
    obj = compiler().compile(program.files, program.filename)
    return libbpf.BpfObject(obj.read(), program.program, pin_root).load()


class Datapath:
    """Both hooks' programs sharing one set of pinned maps."""

    def __init__(self, shape: Shape, pin_root: Path) -> None:
        self.shape = shape
        self.pin_root = pin_root
        self.objects: dict[Hook, libbpf.BpfObject] = {}
        self.maps: maps.PinnedMaps | None = None
        self.reader: events.EventReader | None = None
        for program in render_all(shape):
            self.objects[program.hook] = load_object(program, pin_root)
        self.maps = maps.PinnedMaps.open(pin_root)
        self.writer = maps.TableWriter(self.maps)
        maps.write_clock(self.maps, conntrack_clock())  # as the agent does
        if shape.drop_events or shape.audit_events:
            self.reader = events.EventReader(self.maps.fd("events"))

    def program(self, hook: Hook) -> libbpf.LoadedProgram:
        return self.objects[hook].program(hook.program)

    def hook_for(self, direction: ir.Direction) -> Hook:
        return Hook.FROM_POD if direction is ir.Direction.EGRESS else Hook.TO_POD

    def write(self, tables: ir.NodeTables) -> maps.WriteStats:
        return self.writer.write(tables)

    def run(
        self, frame: bytes, direction: ir.Direction, forwarded: bool = False
    ) -> testrun.TcVerdict:
        """`forwarded`: the frame arrived on an interface (see `testrun.run`)."""
        if direction is ir.Direction.EGRESS:
            bind_sender(self.maps, self.writer, frame)
        fd = self.program(self.hook_for(direction)).fd
        return testrun.run(fd, frame, forwarded=forwarded).verdict

    def events(self) -> list[events.Event]:
        assert self.reader is not None
        return self.reader.poll(0)

    def close(self) -> None:
        if self.reader:
            self.reader.close()
        if self.maps:
            self.maps.close()
        for obj in self.objects.values():
            obj.close()
        self.objects.clear()


@contextmanager
def datapath(shape: Shape | None = None) -> Iterator[Datapath]:
    root = private_pin_root()
    dp: Datapath | None = None
    try:
        dp = Datapath(shape or Shape(), root)
        yield dp
    finally:
        if dp:
            dp.close()
        shutil.rmtree(root)
