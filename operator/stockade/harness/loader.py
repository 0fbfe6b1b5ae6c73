"""One node's datapath: both hooks' programs of a Shape, loaded with the node's maps pinned.

The programs of one Shape share every map (they are pinned by name under `pin_root`, so a second
load, or a restarted process, re-adopts them). Callers write tables with `write()` and judge
frames with `run()` (BPF_PROG_TEST_RUN). Used by the `datapath` conformance engine and the
benchmarks; the agent adds attaching on top of the same pieces.
"""

from __future__ import annotations

from pathlib import Path

from stockade.compiler import ir
from stockade.compiler.render import Hook, render_all
from stockade.compiler.shape import Shape
from stockade.datapath import libbpf, maps
from stockade.datapath.clang import Compiler
from stockade.harness import testrun


class NodePrograms:
    """Both programs of `shape`, compiled through `compiler`'s cache and loaded."""

    def __init__(self, shape: Shape, pin_root: Path, compiler: Compiler) -> None:
        self.shape = shape
        self.pin_root = pin_root
        self.objects: dict[Hook, libbpf.BpfObject] = {}
        self.compiles: list[bool] = []  # cache hit per compile, for callers that count them
        self.maps: maps.PinnedMaps | None = None
        try:
            for program in render_all(shape):
                compiled = compiler.compile(program.files, program.filename)
                self.compiles.append(compiled.cache_hit)
                obj = libbpf.BpfObject(compiled.read(), program.program, pin_root)
                self.objects[program.hook] = obj.load()
            self.maps = maps.PinnedMaps.open(pin_root)
            self.writer = maps.TableWriter(self.maps)
        except BaseException:
            self.close()
            raise

    def program(self, hook: Hook) -> libbpf.LoadedProgram:
        return self.objects[hook].program(hook.program)

    def write(self, tables: ir.NodeTables) -> maps.WriteStats:
        return self.writer.write(tables)

    def run(self, hook: Hook, frame: bytes) -> testrun.TcVerdict:
        return testrun.run(self.program(hook).fd, frame).verdict

    def close(self) -> None:
        """Close every fd; the pins stay (the caller owns `pin_root`)."""
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        for obj in self.objects.values():
            obj.close()
        self.objects.clear()
