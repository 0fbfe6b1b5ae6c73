"""The ABI module and the C cannot drift: each program is compiled as rendered, and every struct,
map (type, key, value, size, flags) and constant of `stockade.compiler.abi` is checked against
the object's BTF (read with bpftool) and clang's macro definitions.

BTF describes only the types a global or a function reaches; the programs use `struct event`
and the enums only inside inlined functions, so the probe compiled here is the rendered entry file
included verbatim plus one global per such type.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest

from stockade.compiler import abi
from stockade.compiler.render import Hook, render
from stockade.compiler.shape import Shape
from stockade.datapath.clang import Compiler

# Conntrack, fragment tracking, services, the Service fallback and both kinds of events on, so
# that every map and struct is declared; map sizes that differ from each other, so that each
# map's size names its Shape field.
SHAPE = Shape(
    endpoints_max=1001,
    classes_max=1_000_002,
    policy_max=20_003,
    hosts_max=1004,
    policy_exact_max=1005,
    conntrack_max=1006,
    rules_max=1007,
    fragments_max=1008,
    events_bytes=8192,
    services=True,
    service_prefixes_max=1009,
    service_fallback=True,
    service_verdicts_max=1010,
)
PROBE = "abi_probe.c"
ANCHORS = """
struct event stockade_abi_event;
enum ct_mode stockade_abi_ct_mode;
enum event_kind stockade_abi_event_kind;
enum drop_reason stockade_abi_drop_reason;
"""
# The enums of the ABI: (C enum or None for #defines, prefix of the C names).
ENUMS: dict[type[IntEnum], tuple[str | None, str]] = {
    abi.Direction: (None, "DIR_"),
    abi.Action: (None, "ACTION_"),
    abi.ClassFlag: (None, "CLASS_FLAG_"),
    abi.PendingState: (None, "PENDING_"),
    abi.ConntrackMode: ("ct_mode", "CT_MODE_"),
    abi.EventKind: ("event_kind", "EVENT_"),
    abi.DropReason: ("drop_reason", "REASON_"),
}
DEFINES = {
    "CLASS_KEY_BITS": abi.CLASS_KEY_BITS,
    "POLICY_KEY_BITS": abi.POLICY_KEY_BITS,
    "POLICY_EXACT_PORT": abi.POLICY_EXACT_PORT,
    "POLICY_EXACT_CLASS": abi.POLICY_EXACT_CLASS,
    "POLICY_FLAG_LONGER": abi.POLICY_FLAG_LONGER,
    "FRAG_TIMEOUT_NS": abi.FRAG_TIMEOUT_NS,
    "CT_TCP_REPLIED": abi.CT_TCP_REPLIED,
    "CT_TCP_FIN_ORIG": abi.CT_TCP_FIN_ORIG,
    "CT_TCP_FIN_REPLY": abi.CT_TCP_FIN_REPLY,
    "CT_TCP_RST": abi.CT_TCP_RST,
}


@dataclass(frozen=True)
class Btf:
    """The types of a BPF object's BTF, by id, as bpftool dumps them."""

    types: dict[int, dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> Btf:
        out = subprocess.run(
            ["bpftool", "-j", "btf", "dump", "file", str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
        return cls({t["id"]: t for t in json.loads(out.stdout)["types"]})

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [t for t in self.types.values() if t["kind"] == kind and t["name"] == name]
        assert len(found) == 1, f"{kind} {name}: {len(found)} in the object's BTF"
        return found[0]

    def resolve(self, type_id: int) -> dict[str, Any]:
        """Through typedefs and qualifiers to the type that has a size."""
        t = self.types[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT"):
            t = self.types[t["type_id"]]
        return t

    def size(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t["kind"] == "ARRAY":
            return int(t["nr_elems"]) * self.size(t["type_id"])
        return int(t["size"])

    def members(self, c_struct: dict[str, Any]) -> list[tuple[str, int, int]]:
        """(name, byte offset, byte size) of every member."""
        return [
            (m["name"], m["bits_offset"] // 8, self.size(m["type_id"])) for m in c_struct["members"]
        ]

    def map_def(self, name: str) -> dict[str, dict[str, Any]]:
        """The members of a map definition in `.maps`, each resolved through its pointer."""
        var = self.named("VAR", name)
        members = self.types[var["type_id"]]["members"]
        return {m["name"]: self.types[self.types[m["type_id"]]["type_id"]] for m in members}


def _layout_members(layout: abi.Layout) -> list[tuple[str, int, int]]:
    return [(name, layout.offset(name), struct.calcsize(fmt)) for name, fmt in layout.fields]


@dataclass(frozen=True)
class Compiled:
    btf: Btf
    macros: dict[str, str]


def _macros(compiler: Compiler, files: dict[str, str], entry: str, tmp: Path) -> dict[str, str]:
    for name, text in files.items():
        (tmp / name).write_text(text)
    out = subprocess.run(
        [compiler.clang, *compiler.flags, "-I", str(tmp), "-dM", "-E", str(tmp / entry)],
        check=True,
        capture_output=True,
        text=True,
    )
    pairs = (line.split(" ", 2)[1:] for line in out.stdout.splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


@pytest.fixture(scope="module", params=list(Hook), ids=lambda h: h.name.lower())
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    hook: Hook = request.param
    program = render(SHAPE, hook)
    files = {**program.files, PROBE: f'#include "{program.filename}"\n{ANCHORS}'}
    tmp = tmp_path_factory.mktemp(f"abi-{hook.name.lower()}")
    compiler = Compiler(tmp / "cache")
    obj = compiler.compile(files, PROBE)
    sources = tmp / "src"
    sources.mkdir()
    return Compiled(Btf.read(obj.path), _macros(compiler, files, PROBE, sources))


@pytest.mark.parametrize("layout", abi.STRUCTS, ids=lambda s: s.c_name)
def test_every_struct_has_the_size_and_field_offsets_of_the_c(
    compiled: Compiled, layout: abi.Layout
) -> None:
    c_struct = compiled.btf.named("STRUCT", layout.c_name)
    assert c_struct["size"] == layout.size
    assert compiled.btf.members(c_struct) == _layout_members(layout)


@pytest.mark.parametrize("spec", abi.MAPS.values(), ids=lambda m: m.name)
def test_every_map_has_the_type_key_value_size_and_flags_of_the_c(
    compiled: Compiled, spec: abi.MapSpec
) -> None:
    definition = compiled.btf.map_def(spec.name)
    assert definition["type"]["nr_elems"] == spec.type
    assert definition["max_entries"]["nr_elems"] == spec.entries(SHAPE)
    assert definition.get("map_flags", {}).get("nr_elems", 0) == spec.flags
    for member, layout in (("key", spec.key), ("value", spec.value)):
        if layout is None:
            assert member not in definition
            continue
        c_type = definition[member]  # the struct, or the __u32 typedef of an array's key
        assert (c_type["name"], compiled.btf.size(c_type["id"])) == (layout.c_name, layout.size)


def test_the_programs_declare_no_map_the_abi_does_not_know(compiled: Compiled) -> None:
    datasec = compiled.btf.named("DATASEC", ".maps")
    declared = {compiled.btf.types[v["type_id"]]["name"] for v in datasec["vars"]}
    assert declared == set(abi.MAPS)


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.__name__)
def test_every_enum_has_the_names_and_values_of_the_c(
    compiled: Compiled, enum: type[IntEnum]
) -> None:
    c_enum, prefix = ENUMS[enum]
    want = {f"{prefix}{member.name}": int(member) for member in enum}
    if c_enum is None:
        got = {k: int(v) for k, v in compiled.macros.items() if k.startswith(prefix)}
    else:
        values = compiled.btf.named("ENUM", c_enum)["values"]
        got = {v["name"]: int(v["val"]) for v in values}
    assert got == want


@pytest.mark.parametrize(("name", "value"), DEFINES.items(), ids=DEFINES.keys())
def test_every_constant_has_the_value_of_its_define(
    compiled: Compiled, name: str, value: int
) -> None:
    assert int(compiled.macros[name].removesuffix("ULL")) == value
