"""One node's datapath: both hooks' programs of a Shape, loaded with the node's maps pinned.

The programs of one Shape share every map (they are pinned by name under `pin_root`, so a second
load, or a restarted process, re-adopts them). Callers write tables with `write()` and judge
frames with `run()` (BPF_PROG_TEST_RUN); `reset()` brings the maps back to their state right
after loading, so that one load can serve many independent runs. Used by the `datapath`
conformance engine and the benchmarks; the agent adds attaching on top of the same pieces.
"""

from __future__ import annotations

import functools
from pathlib import Path

from stockade.compiler import abi, ir
from stockade.compiler.render import Hook, render_all
from stockade.compiler.shape import Shape
from stockade.datapath import clock, libbpf, maps, packets
from stockade.datapath.clang import Compiler
from stockade.harness import testrun


@functools.cache
def conntrack_clock() -> clock.TickClock:
    """The conntrack clock, measured once per process."""
    return clock.measure()


def bind_sender(pinned: maps.PinnedMaps | None, writer: maps.TableWriter, frame: bytes) -> None:
    """Bind the device of a test run (the loopback) to the endpoint that owns the frame's source
    address, as the agent binds a pod's interface, or unbind it when no endpoint does: a test
    run then judges the frame as if the pod with that address had sent it."""
    assert pinned is not None, "bind_sender() after close()"
    bindings = maps.Bindings(pinned)
    source = packets.source_address(frame)
    value = writer.current("endpoints").get(ir.to_v6(source).packed) if source else None
    if value is None:
        bindings.unbind(maps.LOOPBACK_IFINDEX)
    else:
        bindings.bind(maps.LOOPBACK_IFINDEX, abi.ENDPOINT_VALUE.unpack(value)[0])


class NodePrograms:
    """Both programs of `shape`, compiled through `compiler`'s cache and loaded."""

    def __init__(self, shape: Shape, pin_root: Path, compiler: Compiler) -> None:
        self.shape = shape
        self.pin_root = pin_root
        self.objects: dict[Hook, libbpf.BpfObject] = {}
        self.compiles: list[bool] = []  # cache hit per compile, for callers that count them
        self.maps: maps.PinnedMaps | None = None
        self._events: libbpf.RingBuffer | None = None
        self._rule_ids: set[int] = {ir.RULE_NONE}  # counters that may have counted something
        try:
            for program in render_all(shape):
                compiled = compiler.compile(program.files, program.filename)
                self.compiles.append(compiled.cache_hit)
                obj = libbpf.BpfObject(compiled.read(), program.program, pin_root)
                self.objects[program.hook] = obj.load()
            self.maps = maps.PinnedMaps.open(pin_root)
            self.writer = maps.TableWriter(self.maps)
            maps.write_clock(self.maps, conntrack_clock())  # as the agent does
            self._config = self._read_config()  # as loaded, for reset()
            self._rules_max = libbpf.map_info(self.maps.fd("counters")).max_entries
        except BaseException:
            self.close()
            raise

    def program(self, hook: Hook) -> libbpf.LoadedProgram:
        return self.objects[hook].program(hook.program)

    def write(self, tables: ir.NodeTables) -> maps.WriteStats:
        self._rule_ids.update(tables.rules)
        return self.writer.write(tables)

    def run(self, hook: Hook, frame: bytes) -> testrun.TcVerdict:
        if hook is Hook.FROM_POD:
            bind_sender(self.maps, self.writer, frame)
        return testrun.run(self.program(hook).fd, frame).verdict

    def reset(self) -> None:
        """Back to the state right after loading: empty tables (stale entries deleted through
        the writer), no conntrack entries, the config (and its epoch) as loaded, zero counters
        (lost events too) and an empty event ring."""
        assert self.maps is not None, "reset() after close()"
        self.writer.write(ir.NodeTables())
        maps.flush_conntrack(self.maps)
        libbpf.map_update(self.maps.fd("config"), abi.CONFIG_KEY, self._config)
        counters = self.maps.fd("counters")
        zero = bytes(abi.RULE_COUNTER.size * libbpf.num_possible_cpus())
        for rule_id in sorted(self._rule_ids):
            if rule_id < self._rules_max:  # the programs count no rule beyond the array
                libbpf.map_update(counters, abi.U32.pack(rule_id), zero)
        self._rule_ids = {ir.RULE_NONE}
        lost = bytes(abi.U64.size * libbpf.num_possible_cpus())
        libbpf.map_update(self.maps.fd("events_lost"), abi.U32.pack(0), lost)
        if self._events is None:  # only once asked to reset: a caller may read the events
            self._events = libbpf.RingBuffer(self.maps.fd("events"))
        self._events.poll(0)

    def _read_config(self) -> bytes:
        assert self.maps is not None
        raw = libbpf.map_lookup(self.maps.fd("config"), abi.CONFIG_KEY, abi.CONFIG.size)
        return raw if raw is not None else bytes(abi.CONFIG.size)

    def close(self) -> None:
        """Close every fd; the pins stay (the caller owns `pin_root`)."""
        if self._events is not None:
            self._events.close()
            self._events = None
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        for obj in self.objects.values():
            obj.close()
        self.objects.clear()
