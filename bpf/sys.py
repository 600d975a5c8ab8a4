"""The bpf(2) system calls nodeagent needs, through ctypes.

bcc compiles and loads the programs; everything after that (pinning,
bpf_link attach/update/detach, map reads by the proxy, queries for tests) is
done here with plain syscalls, so a reader of a pinned map needs neither bcc
nor a compiler. Every call raises ``BpfError`` naming the operation and the
object (path, fd) with the kernel's errno text.
"""
from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

# enum bpf_cmd
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34

# enum bpf_attach_type (the ones used here)
CGROUP_SOCK_OPS = 3
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_GETSOCKOPT = 21
SK_MSG_VERDICT = 7
SK_LOOKUP = 36

# enum bpf_prog_type (the ones loaded here without bcc)
PROG_TYPE_SK_LOOKUP = 30

BPF_ANY = 0
BPF_F_RDONLY = 1 << 3  # file_flags for OBJ_GET

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed; ``errno`` is the kernel's error code."""


class _Attr(ctypes.Structure):
    """union bpf_attr, as a zeroed 128-byte buffer the callers fill."""
    _fields_ = [("raw", ctypes.c_uint8 * 128)]


def _bpf(cmd: int, fields: list[tuple[int, str, int]], what: str) -> tuple[int, _Attr]:
    attr = _Attr()
    base = ctypes.addressof(attr)
    for offset, ctype, value in fields:
        typ = {"u32": ctypes.c_uint32, "u64": ctypes.c_uint64}[ctype]
        typ.from_address(base + offset).value = value
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret, attr


def obj_get(path: str, readonly: bool = False) -> int:
    """Open a pinned map, program or link; returns a new fd."""
    buf = ctypes.create_string_buffer(os.fsencode(path))
    fd, _ = _bpf(OBJ_GET, [(0, "u64", ctypes.addressof(buf)),
                           (12, "u32", BPF_F_RDONLY if readonly else 0)], f"open pinned {path}")
    return fd


def obj_pin(fd: int, path: str) -> None:
    buf = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(OBJ_PIN, [(0, "u64", ctypes.addressof(buf)), (8, "u32", fd)], f"pin fd {fd} at {path}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key``, or None when there is none."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    try:
        _bpf(MAP_LOOKUP_ELEM, [(0, "u32", fd), (8, "u64", ctypes.addressof(kbuf)),
                               (16, "u64", ctypes.addressof(vbuf))], f"lookup in map fd {fd}")
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return None
        raise
    return vbuf.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _bpf(MAP_UPDATE_ELEM, [(0, "u32", fd), (8, "u64", ctypes.addressof(kbuf)),
                           (16, "u64", ctypes.addressof(vbuf)), (24, "u64", BPF_ANY)],
         f"update map fd {fd}")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(MAP_DELETE_ELEM, [(0, "u32", fd), (8, "u64", ctypes.addressof(kbuf))],
             f"delete from map fd {fd}")
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int, limit: int = 1 << 20) -> list[bytes]:
    """All keys of a map (bounded by ``limit``)."""
    keys: list[bytes] = []
    nbuf = ctypes.create_string_buffer(key_size)
    prev: ctypes.Array | None = None
    while len(keys) < limit:
        fields = [(0, "u32", fd), (16, "u64", ctypes.addressof(nbuf))]
        if prev is not None:
            fields.append((8, "u64", ctypes.addressof(prev)))
        try:
            _bpf(MAP_GET_NEXT_KEY, fields, f"iterate map fd {fd}")
        except BpfError as exc:
            if exc.errno == errno_mod.ENOENT:
                break
            raise
        keys.append(nbuf.raw)
        prev = ctypes.create_string_buffer(nbuf.raw, key_size)
    return keys


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    fd, _ = _bpf(LINK_CREATE, [(0, "u32", prog_fd), (4, "u32", target_fd), (8, "u32", attach_type)],
                 f"attach {what}")
    return fd


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    """Legacy attach (used for sk_msg on a SOCKHASH, which replaces any earlier program)."""
    _bpf(PROG_ATTACH, [(0, "u32", target_fd), (4, "u32", prog_fd), (8, "u32", attach_type)], f"attach {what}")


def link_update(link_fd: int, new_prog_fd: int, what: str) -> None:
    _bpf(LINK_UPDATE, [(0, "u32", link_fd), (4, "u32", new_prog_fd)], f"replace program of {what}")


def link_detach(link_fd: int, what: str) -> None:
    _bpf(LINK_DETACH, [(0, "u32", link_fd)], f"detach {what}")


def _info(fd: int, size: int, what: str) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _bpf(OBJ_GET_INFO_BY_FD, [(0, "u32", fd), (4, "u32", size), (8, "u64", ctypes.addressof(buf))],
         f"inspect {what}")
    return buf.raw


def prog_id(prog_fd: int) -> int:
    """struct bpf_prog_info.id (offset 4)."""
    return int.from_bytes(_info(prog_fd, 64, f"program fd {prog_fd}")[4:8], "little")


def prog_name_and_load_time(prog_id: int) -> tuple[str, int] | None:
    """(name, load time in ns of CLOCK_BOOTTIME) of a loaded program, or None once it is gone."""
    try:
        fd, _ = _bpf(PROG_GET_FD_BY_ID, [(0, "u32", prog_id)], f"open program id {prog_id}")
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return None
        raise
    try:
        raw = _info(fd, 96, f"program id {prog_id}")
    finally:
        os.close(fd)
    # struct bpf_prog_info: ... u64 load_time at 40, char name[16] at 64
    return raw[64:80].split(b"\0", 1)[0].decode(), int.from_bytes(raw[40:48], "little")


def link_info(link_fd: int) -> tuple[int, int, int, int]:
    """(link id, program id, cgroup id, attach type) of a cgroup link."""
    raw = _info(link_fd, 64, f"link fd {link_fd}")
    # struct bpf_link_info: u32 type, u32 id, u32 prog_id, u32 pad, union { cgroup {u64 id; u32 type} }
    lid = int.from_bytes(raw[4:8], "little")
    pid = int.from_bytes(raw[8:12], "little")
    cgid = int.from_bytes(raw[16:24], "little")
    atype = int.from_bytes(raw[24:28], "little")
    return lid, pid, cgid, atype


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Ids of the programs attached to a cgroup for ``attach_type`` (effective=False)."""
    ids = (ctypes.c_uint32 * max_progs)()
    _, attr = _bpf(PROG_QUERY, [(0, "u32", target_fd), (4, "u32", attach_type),
                                (16, "u64", ctypes.addressof(ids)), (24, "u32", max_progs)],
                   f"query cgroup fd {target_fd}")
    count = ctypes.c_uint32.from_address(ctypes.addressof(attr) + 24).value
    return list(ids[:count])


def prog_load(prog_type: int, insns: bytes, *, name: str, expected_attach_type: int = 0,
              license: str = "GPL", log_size: int = 1 << 18) -> int:
    """Load already-relocated instructions (e.g. bcc's ``dump_func`` output, patched).

    On refusal the BpfError message carries the verifier log's last lines.
    """
    if len(insns) % 8:
        raise ValueError(f"program {name}: {len(insns)} bytes is not a whole number of instructions")
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(log_size)
    attr = _Attr()
    base = ctypes.addressof(attr)
    for offset, typ, value in ((0, ctypes.c_uint32, prog_type), (4, ctypes.c_uint32, len(insns) // 8),
                               (8, ctypes.c_uint64, ctypes.addressof(ibuf)),
                               (16, ctypes.c_uint64, ctypes.addressof(lic)),
                               (24, ctypes.c_uint32, 1), (28, ctypes.c_uint32, log_size),
                               (32, ctypes.c_uint64, ctypes.addressof(log)),
                               (68, ctypes.c_uint32, expected_attach_type)):
        typ.from_address(base + offset).value = value
    raw_name = name.encode()[:15]
    ctypes.memmove(base + 48, raw_name, len(raw_name))
    fd = _libc.syscall(_SYS_BPF, PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        tail = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()][-8:]
        detail = ("; verifier log:\n" + "\n".join("    " + ln for ln in tail)) if tail else ""
        raise BpfError(err, f"load program {name}: {os.strerror(err)}{detail}")
    return fd


def netns_link_info(link_fd: int) -> tuple[int, int, int, int]:
    """(link id, program id, netns inode, attach type) of a netns link (sk_lookup)."""
    raw = _info(link_fd, 64, f"link fd {link_fd}")
    # struct bpf_link_info: u32 type, u32 id, u32 prog_id, u32 pad, union { netns {u32 netns_ino; u32 attach_type} }
    return (int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[8:12], "little"),
            int.from_bytes(raw[16:20], "little"), int.from_bytes(raw[20:24], "little"))
