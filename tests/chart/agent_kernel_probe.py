"""Every kernel operation the node agent performs, run once, each step reported as JSON.

`tests/chart/test_agent_capabilities.py` runs this script in a network namespace of its own
under exactly the capabilities the chart gives the agent (and under each set with one
capability removed), to show which capabilities the agent needs. It drives the agent's own
datapath code (compile, load, pin, map writes, tcx and legacy tc attach), not a copy of it.

Usage: agent_kernel_probe.py PIN_ROOT CACHE_DIR IFNAME
Prints one JSON object: {"steps": [{"step": ..., "ok": bool, "error": str}, ...]}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from stockade.compiler import ir
from stockade.compiler.render import Hook, render_all
from stockade.compiler.shape import Shape
from stockade.datapath import attach, events, libbpf, maps
from stockade.datapath.clang import Compiler


def main() -> int:
    pin_root, cache_dir, ifname = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    steps: list[dict[str, object]] = []
    state: dict[str, object] = {}

    def step(name: str, action: Callable[[], object]) -> bool:
        try:
            action()
        except Exception as exc:
            last = traceback.format_exception_only(exc)[-1].strip()
            steps.append({"step": name, "ok": False, "error": last})
            return False
        steps.append({"step": name, "ok": True, "error": ""})
        return True

    shape = Shape()
    programs = {p.hook: p for p in render_all(shape)}
    compiler = Compiler(cache_dir)
    objects: dict[Hook, libbpf.BpfObject] = {}

    def compile_and_load() -> None:
        for hook, program in programs.items():
            obj = compiler.compile(program.files, program.filename)
            objects[hook] = libbpf.BpfObject(obj.read(), program.program, pin_root).load()

    def write_maps() -> None:
        pinned = maps.PinnedMaps.open(pin_root)
        state["maps"] = pinned
        maps.TableWriter(pinned).write(ir.NodeTables())

    def read_events() -> None:
        pinned = state["maps"]
        assert isinstance(pinned, maps.PinnedMaps)
        reader = events.EventReader(pinned.fd("events"))
        reader.poll(0)
        reader.close()

    ifindex = socket.if_nametoindex(ifname)
    links = pin_root / "links"

    def tcx_attach() -> None:
        for point, hook in (
            (attach.AttachPoint.INGRESS, Hook.FROM_POD),
            (attach.AttachPoint.EGRESS, Hook.TO_POD),
        ):
            prog = objects[hook].program(hook.program)
            attach.attach_tcx(ifindex, point, prog.fd, links / point.name.lower())

    def tcx_update_and_query() -> None:
        for point, hook in (
            (attach.AttachPoint.INGRESS, Hook.FROM_POD),
            (attach.AttachPoint.EGRESS, Hook.TO_POD),
        ):
            prog = objects[hook].program(hook.program)
            attach.attach_tcx(ifindex, point, prog.fd, links / point.name.lower())
            if not attach.tcx_query(ifindex, point):
                raise RuntimeError(f"no program attached at {point.name}")

    def tcx_detach() -> None:
        for point in (attach.AttachPoint.INGRESS, attach.AttachPoint.EGRESS):
            attach.detach_tcx(links / point.name.lower())

    def legacy_attach_detach() -> None:
        prog = objects[Hook.TO_POD].program(Hook.TO_POD.program)
        done = attach.attach_legacy(ifindex, attach.AttachPoint.EGRESS, prog.fd, "stockade")
        attach.detach(done)

    def adopt_pins() -> None:
        for pin in sorted(p for p in pin_root.iterdir() if p.is_file()):
            os.close(libbpf.obj_get(pin))

    if step("compile, load programs and BTF, create and pin maps", compile_and_load):
        step("open pinned maps and write tables", write_maps)
        if "maps" in state:
            step("read the events ring buffer", read_events)
        step("re-open pinned maps by path (adopt after restart)", adopt_pins)
        if step("create and pin tcx links", tcx_attach):
            step("update tcx links atomically and query them", tcx_update_and_query)
            step("detach tcx links", tcx_detach)
        step("attach and detach a legacy clsact filter", legacy_attach_detach)
    for obj in objects.values():
        obj.close()
    if isinstance(state.get("maps"), maps.PinnedMaps):
        state["maps"].close()  # type: ignore[union-attr]
    print(json.dumps({"steps": steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
