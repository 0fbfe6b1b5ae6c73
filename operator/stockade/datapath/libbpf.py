"""A typed ctypes layer over libbpf.so.1 (v1.1) and the raw bpf(2) syscall.

Everything else in `stockade.datapath` calls the kernel through here: opening and loading
compiled objects (with maps pinned by name under a pin root so that a reload re-adopts them),
pinned objects, object info, element and batched map operations, BPF_PROG_TEST_RUN and the ring
buffer. Commands that Debian's libbpf 1.1 lacks (tcx links) go through `sys_bpf()`.

File descriptors are plain ints owned by the caller unless a class says otherwise; errors raise
`BpfError` naming the operation and the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

_SYS_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]

# enum bpf_cmd
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34
# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
LOG_LEVEL_STATS = 4
BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45  # enum bpf_attach_type
# Sections libbpf 1.1 does not know: their program type and expected attach type.
SECTION_TYPES = {"netfilter": (BPF_PROG_TYPE_NETFILTER, BPF_NETFILTER)}


class BpfError(OSError):
    """A bpf operation failed; `errno` is the kernel's, the message names the operation."""


def _fail(err: int, what: str) -> BpfError:
    return BpfError(err, f"{what}: {os.strerror(err)}")


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise _fail(-rc if rc != -1 else (ctypes.get_errno() or errno.EINVAL), what)
    return rc


def _sig(name: str, restype: object, *argtypes: object) -> Any:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


_c = ctypes
_vp, _u32, _int, _sz, _cp = _c.c_void_p, _c.c_uint32, _c.c_int, _c.c_size_t, _c.c_char_p


class _OpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", _sz),
        ("object_name", _cp),
        ("relaxed_maps", _c.c_bool),
        ("pin_root_path", _cp),
        ("_attach_prog_fd", _u32),
        ("kconfig", _cp),
        ("btf_custom_path", _cp),
        ("kernel_log_buf", _cp),
        ("kernel_log_size", _sz),
        ("kernel_log_level", _u32),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", _sz),
        ("data_in", _vp),
        ("data_out", _vp),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("ctx_in", _vp),
        ("ctx_out", _vp),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("retval", _u32),
        ("repeat", _int),
        ("duration", _u32),
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    ]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", _sz), ("elem_flags", _c.c_uint64), ("flags", _c.c_uint64)]


_open_mem = _sig("bpf_object__open_mem", _vp, _vp, _sz, _c.POINTER(_OpenOpts))
_obj_load = _sig("bpf_object__load", _int, _vp)
_obj_close = _sig("bpf_object__close", None, _vp)
_next_prog = _sig("bpf_object__next_program", _vp, _vp, _vp)
_next_map = _sig("bpf_object__next_map", _vp, _vp, _vp)
_prog_name = _sig("bpf_program__name", _cp, _vp)
_prog_fd = _sig("bpf_program__fd", _int, _vp)
_prog_set_log_buf = _sig("bpf_program__set_log_buf", _int, _vp, _vp, _sz)
_prog_set_log_level = _sig("bpf_program__set_log_level", _int, _vp, _u32)
_prog_section = _sig("bpf_program__section_name", _cp, _vp)
_prog_set_type = _sig("bpf_program__set_type", _int, _vp, _int)
_prog_set_attach = _sig("bpf_program__set_expected_attach_type", _int, _vp, _int)
_map_name = _sig("bpf_map__name", _cp, _vp)
_map_fd = _sig("bpf_map__fd", _int, _vp)
_obj_pin = _sig("bpf_obj_pin", _int, _int, _cp)
_obj_get = _sig("bpf_obj_get", _int, _cp)
_map_create = _sig("bpf_map_create", _int, _int, _cp, _u32, _u32, _u32, _vp)
_prog_load = _sig("bpf_prog_load", _int, _int, _cp, _cp, _vp, _sz, _vp)
_get_info = _sig("bpf_obj_get_info_by_fd", _int, _int, _vp, _c.POINTER(_u32))
_update = _sig("bpf_map_update_elem", _int, _int, _vp, _vp, _c.c_uint64)
_lookup = _sig("bpf_map_lookup_elem", _int, _int, _vp, _vp)
_delete = _sig("bpf_map_delete_elem", _int, _int, _vp)
_next_key = _sig("bpf_map_get_next_key", _int, _int, _vp, _vp)
_batch_args = (_int, _vp, _vp, _c.POINTER(_u32), _c.POINTER(_BatchOpts))
_update_batch = _sig("bpf_map_update_batch", _int, *_batch_args)
_delete_batch = _sig(
    "bpf_map_delete_batch", _int, _int, _vp, _c.POINTER(_u32), _c.POINTER(_BatchOpts)
)
_lookup_batch = _sig(
    "bpf_map_lookup_batch",
    _int,
    _int,
    _vp,
    _vp,
    _vp,
    _vp,
    _c.POINTER(_u32),
    _c.POINTER(_BatchOpts),
)
_test_run = _sig("bpf_prog_test_run_opts", _int, _int, _c.POINTER(_TestRunOpts))
_num_cpus = _sig("libbpf_num_possible_cpus", _int)
RingBufferCallback = ctypes.CFUNCTYPE(_int, _vp, _vp, _sz)
_rb_new = _sig("ring_buffer__new", _vp, _int, RingBufferCallback, _vp, _vp)
_rb_poll = _sig("ring_buffer__poll", _int, _vp, _int)
_rb_free = _sig("ring_buffer__free", None, _vp)
_libc.syscall.restype = _c.c_long


def sys_bpf(cmd: int, attr: bytearray) -> int:
    """The raw bpf(2) syscall on a mutable attr buffer (the kernel may write results into it)."""
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    rc = _libc.syscall(_c.c_long(_SYS_BPF), _c.c_int(cmd), buf, _c.c_uint(len(attr)))
    if rc < 0:
        raise _fail(ctypes.get_errno(), f"bpf(cmd {cmd})")
    return int(rc)


def num_possible_cpus() -> int:
    return _check(int(_num_cpus()), "libbpf_num_possible_cpus")


# --- pinned objects and object info -------------------------------------------------------------


def obj_get(path: Path) -> int:
    """Open a pinned map, program or link; the caller owns the returned fd."""
    return _check(int(_obj_get(str(path).encode())), f"open pinned {path}")


def obj_pin(fd: int, path: Path) -> None:
    _check(int(_obj_pin(fd, str(path).encode())), f"pin {path}")


def obj_pin_whole(fd: int, path: Path) -> None:
    """Pin under a temporary name, then rename: bpffs renames atomically, so the pin at `path`
    is whole or absent, never half made (bpffs reserves dots in names: the temporary one is
    `partial-<name>`)."""
    partial = path.with_name(f"partial-{path.name}")
    if partial.exists():
        partial.unlink()
    obj_pin(fd, partial)
    partial.rename(path)


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map (no flags); the caller owns the returned fd."""
    rc = _map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, None)
    return _check(int(rc), f"create map {name}")


def prog_load_insns(prog_type: int, name: str, insns: bytes) -> int:
    """Load a program given as raw instructions (8 bytes each, `struct bpf_insn`), GPL; the
    caller owns the returned fd. For the few programs too small to compile (`stockade.datapath.
    clock`)."""
    if len(insns) % 8:
        raise ValueError(f"program {name}: {len(insns)} bytes is no whole number of instructions")
    buf = ctypes.create_string_buffer(insns, len(insns))
    count = len(insns) // 8
    rc = _prog_load(prog_type, name.encode()[:15], b"GPL", ctypes.cast(buf, _vp), count, None)
    return _check(int(rc), f"load program {name}")


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    length = _u32(size)
    _check(int(_get_info(fd, buf, ctypes.byref(length))), f"object info of fd {fd}")
    return buf.raw


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    prog_type: int
    id: int
    name: str
    verified_insns: int


@dataclass(frozen=True)
class LinkInfo:
    link_type: int
    id: int
    prog_id: int
    ifindex: int  # tcx links: the interface and the attach type
    attach_type: int


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88)
    mtype, mid, ks, vs, maxe, flags = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0")[0].decode()
    return MapInfo(mtype, mid, ks, vs, maxe, flags, name)


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232)
    ptype, pid = struct.unpack_from("=2I", raw, 0)
    name = raw[64:80].split(b"\0")[0].decode()
    (verified,) = struct.unpack_from("=I", raw, 216)
    return ProgInfo(ptype, pid, name, verified)


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 48)
    ltype, lid, prog_id = struct.unpack_from("=3I", raw, 0)
    ifindex, attach_type = struct.unpack_from("=2I", raw, 16)
    return LinkInfo(ltype, lid, prog_id, ifindex, attach_type)


# --- objects ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedProgram:
    name: str
    fd: int  # owned by the BpfObject
    id: int
    verified_insns: int
    verifier_log: str

    @property
    def processed_insns(self) -> int:
        """The verifier's "processed N insns" from its log (BPF_LOG_STATS)."""
        match = re.search(r"processed (\d+) insns", self.verifier_log)
        return int(match.group(1)) if match else self.verified_insns


class BpfObject:
    """A compiled object opened from memory and loaded; owns its program and map fds.

    Maps declared with LIBBPF_PIN_BY_NAME are pinned under `pin_root` on first load and reused
    (after a compatibility check by libbpf) by every later load with the same pin root.
    """

    LOG_SIZE = 1 << 16

    def __init__(self, data: bytes, name: str, pin_root: Path | None = None) -> None:
        self._data = ctypes.create_string_buffer(data, len(data))
        self._name = name.encode()
        self._pin_root = str(pin_root).encode() if pin_root else None
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), object_name=self._name)
        if self._pin_root:
            opts.pin_root_path = self._pin_root
        ptr = _open_mem(self._data, len(data), ctypes.byref(opts))
        if not ptr:
            raise _fail(ctypes.get_errno() or errno.EINVAL, f"open BPF object {name}")
        self._obj: int | None = int(ptr)
        self._logs: dict[str, ctypes.Array[ctypes.c_char]] = {}
        self.programs: dict[str, LoadedProgram] = {}
        self.maps: dict[str, int] = {}

    def _iter(self, step: Any) -> Iterator[int]:
        pos = step(self._obj, None)
        while pos:
            yield int(pos)
            pos = step(self._obj, pos)

    def load(self) -> BpfObject:
        if self._obj is None:
            raise BpfError(errno.EBADF, "load of a closed BPF object")
        for prog in self._iter(_next_prog):
            pname = _prog_name(prog).decode()
            buf = ctypes.create_string_buffer(self.LOG_SIZE)
            self._logs[pname] = buf
            _check(int(_prog_set_log_buf(prog, buf, self.LOG_SIZE)), "set log buffer")
            _check(int(_prog_set_log_level(prog, LOG_LEVEL_STATS)), "set log level")
            section = (_prog_section(prog) or b"").decode()
            if section in SECTION_TYPES:
                ptype, attach_type = SECTION_TYPES[section]
                _check(int(_prog_set_type(prog, ptype)), f"set type of {pname}")
                _check(int(_prog_set_attach(prog, attach_type)), f"set attach type of {pname}")
        rc = int(_obj_load(self._obj))
        if rc < 0:
            logs = "\n".join(
                f"{n}: {b.value.decode(errors='replace')}" for n, b in self._logs.items()
            )
            raise BpfError(
                -rc, f"load BPF object {self._name.decode()}: {os.strerror(-rc)}\n{logs}"
            )
        for prog in self._iter(_next_prog):
            pname = _prog_name(prog).decode()
            fd = int(_prog_fd(prog))
            info = prog_info(fd)
            log = self._logs[pname].value.decode(errors="replace")
            self.programs[pname] = LoadedProgram(pname, fd, info.id, info.verified_insns, log)
        for m in self._iter(_next_map):
            self.maps[_map_name(m).decode()] = int(_map_fd(m))
        return self

    def program(self, name: str) -> LoadedProgram:
        try:
            return self.programs[name]
        except KeyError:
            raise KeyError(f"no program {name!r} in object; has {sorted(self.programs)}") from None

    def close(self) -> None:
        if self._obj is not None:
            _obj_close(self._obj)
            self._obj = None
            self.programs.clear()
            self.maps.clear()

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- map elements -------------------------------------------------------------------------------


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(int(_update(fd, key, value, flags)), f"update map fd {fd}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    rc = int(_lookup(fd, key, buf))
    if rc == -errno.ENOENT:
        return None
    _check(rc, f"lookup map fd {fd}")
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    rc = int(_delete(fd, key))
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"delete from map fd {fd}")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, by get_next_key (works for every map type, including LPM tries)."""
    prev: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        rc = int(_next_key(fd, prev, nxt))
        if rc == -errno.ENOENT:
            return
        _check(rc, f"next key of map fd {fd}")
        prev = nxt.raw
        yield prev


def _batch_opts(elem_flags: int = 0) -> _BatchOpts:
    return _BatchOpts(sz=ctypes.sizeof(_BatchOpts), elem_flags=elem_flags, flags=0)


def map_update_batch(fd: int, keys: list[bytes], values: list[bytes], flags: int = BPF_ANY) -> None:
    if not keys:
        return
    count = _u32(len(keys))
    opts = _batch_opts(flags)
    rc = int(
        _update_batch(fd, b"".join(keys), b"".join(values), ctypes.byref(count), ctypes.byref(opts))
    )
    _check(rc, f"batch update of map fd {fd} ({count.value}/{len(keys)} written)")


def map_delete_batch(fd: int, keys: list[bytes]) -> None:
    if not keys:
        return
    count = _u32(len(keys))
    opts = _batch_opts()
    rc = int(_delete_batch(fd, b"".join(keys), ctypes.byref(count), ctypes.byref(opts)))
    _check(rc, f"batch delete from map fd {fd} ({count.value}/{len(keys)} deleted)")


def map_dump(
    fd: int, key_size: int, value_size: int, chunk: int = 4096
) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value): batched lookup where the map supports it, else key by key."""
    token_in: ctypes.Array[ctypes.c_char] | None = None
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    opts = _batch_opts()
    while True:
        count = _u32(chunk)
        rc = int(
            _lookup_batch(
                fd, token_in, token_out, keys, values, ctypes.byref(count), ctypes.byref(opts)
            )
        )
        if rc < 0 and -rc == errno.EINVAL and token_in is None:
            break  # no batch support for this map type
        if rc < 0 and -rc != errno.ENOENT:
            _check(rc, f"batch lookup of map fd {fd}")
        kraw, vraw = keys.raw, values.raw
        for i in range(count.value):
            yield (
                kraw[i * key_size : (i + 1) * key_size],
                vraw[i * value_size : (i + 1) * value_size],
            )
        if rc < 0:
            return
        token_in = ctypes.create_string_buffer(token_out.raw, len(token_out))
    for key in list(map_keys(fd, key_size)):
        value = map_lookup(fd, key, value_size)
        if value is not None:
            yield key, value


# --- BPF_PROG_TEST_RUN and the ring buffer -----------------------------------------------------


@dataclass(frozen=True)
class TestRunResult:
    retval: int  # the program's return value as a signed int
    duration_ns: int  # average per repetition, as the kernel measured it
    data: bytes  # the packet after the program ran


# struct __sk_buff: the offset of ingress_ifindex, and the size of the prefix passed as the
# context of a test run (through ifindex, which stays 0: the loopback).
SKB_INGRESS_IFINDEX, SKB_CTX_SIZE = 36, 44


def prog_test_run(
    prog_fd: int,
    data: bytes,
    repeat: int = 1,
    ingress_ifindex: int = 0,
    ctx: bytes | None = None,
) -> TestRunResult:
    """Run the program on `data`. `ingress_ifindex`: the interface the packet arrived on, as
    the program reads it from `skb->ingress_ifindex` (0, the default: the node's own stack sent
    it). `ctx`: the context the kernel builds the run from (a netfilter program: the hook and
    protocol family of a `struct nf_hook_state`)."""
    out = ctypes.create_string_buffer(len(data) + 256)
    inbuf = ctypes.create_string_buffer(data, len(data))
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(inbuf, _vp),
        data_out=ctypes.cast(out, _vp),
        data_size_in=len(data),
        data_size_out=len(out),
        repeat=repeat,
    )
    if ingress_ifindex:
        skb = bytearray(SKB_CTX_SIZE)
        struct.pack_into("=I", skb, SKB_INGRESS_IFINDEX, ingress_ifindex)
        ctx = bytes(skb)
    if ctx is not None:
        ctxbuf = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctxbuf, _vp)
        opts.ctx_size_in = len(ctx)
    _check(int(_test_run(prog_fd, ctypes.byref(opts))), f"test run of prog fd {prog_fd}")
    retval = ctypes.c_int32(opts.retval).value
    return TestRunResult(retval, opts.duration, out.raw[: opts.data_size_out])


class RingBuffer:
    """libbpf's ring buffer consumer on one map; `poll()` returns the records it read."""

    def __init__(self, map_fd: int) -> None:
        self._records: list[bytes] = []

        def on_record(_ctx: int | None, data: int | None, size: int) -> int:
            self._records.append(ctypes.string_at(data, size) if data else b"")
            return 0

        self._callback = RingBufferCallback(on_record)
        ptr = _rb_new(map_fd, self._callback, None, None)
        if not ptr:
            raise _fail(ctypes.get_errno() or errno.EINVAL, f"ring buffer on map fd {map_fd}")
        self._rb: int | None = int(ptr)

    def poll(self, timeout_ms: int = 0) -> list[bytes]:
        if self._rb is None:
            raise BpfError(errno.EBADF, "poll of a closed ring buffer")
        rc = int(_rb_poll(self._rb, timeout_ms))
        if rc < 0 and -rc != errno.EINTR:
            _check(rc, "ring buffer poll")
        records, self._records = self._records, []
        return records

    def close(self) -> None:
        if self._rb is not None:
            _rb_free(self._rb)
            self._rb = None
