"""Render a Shape into the C of stockade's tc programs (and, with services, its netfilter one).

The operator (or the agent) calls `render_all(shape)` and hands the result to the agent's
compiler (`stockade.datapath.clang`). The output is self-contained: the rendered entry file plus
the static headers of `bpf/` it includes, so that the compile cache key covers every byte that
reaches clang.

Only `Shape.defines()` (integers) and the names of templates reach the C: no string from a
Kubernetes object is ever rendered. Jinja runs with StrictUndefined so a missing value fails the
render instead of producing C with a hole in it. Every rendered file starts with a "generated,
do not edit" line and the sha256 of its inputs (the Shape, the template and the headers).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import jinja2

from stockade.compiler.ir import Direction
from stockade.compiler.shape import Shape

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
HEADERS = (
    "parse.h",
    "maps.h",
    "policy.h",
    "conntrack.h",
    "events.h",
    "hook.h",
    "service.h",
)


class Hook(Enum):
    """An attach point on the pod's host-side veth and the program that runs there."""

    FROM_POD = ("from_pod.c.j2", "stockade_from_pod", Direction.EGRESS)  # tc ingress
    TO_POD = ("to_pod.c.j2", "stockade_to_pod", Direction.INGRESS)  # tc egress
    # the node namespace's netfilter hooks (Shape.services): Service flows after DNAT, and
    # after SNAT the masqueraded ones a local backend admitted (bpf/service.h)
    SERVICE = ("service.c.j2", "stockade_service", Direction.EGRESS)
    SERVICE_NAT = ("service.c.j2", "stockade_service_nat", Direction.INGRESS)

    def __init__(self, template: str, program: str, direction: Direction) -> None:
        self.template = template
        self.program = program
        self.direction = direction

    @property
    def netfilter(self) -> bool:
        """A program of the node namespace's netfilter hooks, not of a veth."""
        return self in (Hook.SERVICE, Hook.SERVICE_NAT)

    @property
    def filename(self) -> str:
        return self.template.removesuffix(".j2")


@dataclass(frozen=True)
class RenderedProgram:
    """One program's C: the entry file and the headers it includes, by file name."""

    hook: Hook
    filename: str
    program: str  # the SEC("tc") function name, the program's name once loaded
    source: str
    headers: tuple[tuple[str, str], ...]
    digest: str  # sha256 of the inputs (Shape, template, headers)

    @property
    def files(self) -> dict[str, str]:
        return {self.filename: self.source, **dict(self.headers)}


def _environment(bpf_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(bpf_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _checked_defines(shape: Shape) -> tuple[tuple[str, int], ...]:
    defines = shape.defines()
    for name, value in defines:
        if not (name.isidentifier() and name.isupper() and name.startswith("STOCKADE_")):
            raise ValueError(f"shape define {name!r} is not a STOCKADE_ identifier")
        if type(value) is not int:
            raise ValueError(f"shape define {name} must be an int, got {type(value).__name__}")
    return defines


def render(shape: Shape, hook: Hook, bpf_dir: Path = BPF_DIR) -> RenderedProgram:
    """The C of `hook`'s program for `shape`; byte-identical for equal shapes."""
    if hook.netfilter and not shape.services:
        raise ValueError(f"the {hook.name} program needs a shape with services on")
    env = _environment(bpf_dir)
    defines = _checked_defines(shape)
    headers = tuple((name, (bpf_dir / name).read_text()) for name in HEADERS)
    templates = (hook.template, "_prologue.c.j2")
    digest = hashlib.sha256()
    digest.update(shape.canonical().encode())
    for name in templates:
        digest.update(b"\0" + name.encode() + b"\0" + (bpf_dir / name).read_bytes())
    for name, text in headers:
        digest.update(b"\0" + name.encode() + b"\0" + text.encode())
    hexdigest = digest.hexdigest()
    source = env.get_template(hook.template).render(
        template=hook.template, digest=hexdigest, defines=defines
    )
    return RenderedProgram(
        hook=hook,
        filename=hook.filename,
        program=hook.program,
        source=source,
        headers=headers,
        digest=hexdigest,
    )


def hooks(shape: Shape) -> tuple[Hook, ...]:
    """The programs a node runs for `shape`: the veth's two, plus the netfilter ones (SERVICE,
    SERVICE_NAT) with services on."""
    return tuple(h for h in Hook if not h.netfilter or shape.services)


def render_all(shape: Shape, bpf_dir: Path = BPF_DIR) -> tuple[RenderedProgram, ...]:
    """Every program of a node (`hooks()`), FROM_POD first."""
    return tuple(render(shape, hook, bpf_dir) for hook in hooks(shape))
