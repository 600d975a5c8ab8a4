"""eBPF capture loader (the kernel edge): compile once with bcc, pin, attach, enroll.

Layout under the pin directory (default /sys/fs/bpf/nodeagent):

    maps/netns maps/cgroup maps/excl_port maps/excl_dst maps/cookie_dst maps/pair_dst
    maps/local_socks maps/tcp_used maps/in_listen maps/in_port maps/in_src maps/in_dst
    links/na_connect4 links/na_connect6 links/na_sockops links/na_getsockopt links/na_fast_sockops
    links/na_inbound_<netns cookie>   (inbound: one sk_lookup instance per enrolled pod, bpf/inbound.py)

The cgroup programs are attached ONCE, at the cgroup v2 root, with bpf_links
that are pinned: they stay attached while the agent restarts, and a new agent
re-adopts them by atomically swapping its freshly loaded programs into the
pinned links (BPF_LINK_UPDATE), so there is no window without capture. The
sk_msg program of the same-node fast path is attached to the pinned SOCKHASH
(re-attaching replaces it). Enrolling or removing a workload is a map update
(no compile, no attach). Inbound capture (``enroll_inbound``) is the
exception: sk_lookup programs attach per network namespace, so each enrolled
pod gets its own instance of ``na_inbound`` (patched, not recompiled) and
link. ``cleanup()`` detaches the links and removes every pin.

Errors: ``EbpfUnavailable`` when this host cannot do eBPF capture at all
(no bcc, no kernel headers, no privileges, no bpffs/cgroup v2) - with
``--capture auto`` the daemon falls back to nftables; ``EbpfError`` when an
operation fails (a program the verifier rejects, a map that cannot be
updated). A failed ``start()`` removes whatever it created. The fast-path
programs are optional: when the kernel refuses them, capture runs without
(``fast_path_problem`` says why, one warning line).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import headers, inbound, maps, origdst, sys as bpfsys
from .inbound import InboundConfig, InboundEnrollment
from .netns import netns_cookie, socket_netns_cookie

log = logging.getLogger("nodeagent.bpf")

DEFAULT_PIN_DIR = origdst.DEFAULT_PIN_DIR
DEFAULT_BPFFS = "/sys/fs/bpf"
SKIP_MARK = 0x539
SOURCE = Path(__file__).with_name("capture.c")

PROG_CGROUP_SOCK_ADDR = 18
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCKOPT = 25
PROG_SK_MSG = 16

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


class EbpfUnavailable(Exception):
    """This host cannot do eBPF capture; the message says why and what to do."""


class EbpfError(Exception):
    """An eBPF operation failed; the message names the program, map or path."""


@dataclass(frozen=True, slots=True)
class Program:
    name: str          # function in capture.c
    prog_type: int
    attach_type: int   # also the expected attach type at load
    optional: bool = False   # the same-node fast path: capture works without it
    target: str = "cgroup"   # "cgroup": a pinned bpf_link at the cgroup v2 root; "map": attached to local_socks


PROGRAMS = (
    Program("na_connect4", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT),
    Program("na_connect6", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT),
    Program("na_sockops", PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS),
    Program("na_getsockopt", PROG_CGROUP_SOCKOPT, bpfsys.CGROUP_GETSOCKOPT),
    Program("na_fast_sockops", PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS, optional=True),
    Program("na_fast_msg", PROG_SK_MSG, bpfsys.SK_MSG_VERDICT, optional=True, target="map"),
)

# (key size, value size) of each pinned map: a pin left by an agent with
# another layout is refused rather than misread.
MAP_LAYOUTS = {
    maps.MAP_NETNS: (8, maps.WORKLOAD_CONFIG_SIZE),
    maps.MAP_CGROUP: (8, maps.WORKLOAD_CONFIG_SIZE),
    maps.MAP_EXCL_PORT: (maps.PORT_KEY_SIZE, 1),
    maps.MAP_EXCL_DST: (maps.CIDR_KEY_SIZE, 1),
    maps.MAP_COOKIE: (8, maps.ORIGINAL_DST_SIZE),
    maps.MAP_PAIR: (maps.PAIR_KEY_SIZE, maps.ORIGINAL_DST_SIZE),
    maps.MAP_SOCKS: (maps.SOCK_KEY_SIZE, 4),
    maps.MAP_TCP_USED: (maps.SOCK_KEY_SIZE, 1),
    maps.MAP_IN_LISTEN: (maps.LISTEN_KEY_SIZE, 4),
    maps.MAP_IN_PORT: (maps.IN_PORT_KEY_SIZE, 1),
    maps.MAP_IN_SRC: (maps.IN_SRC_KEY_SIZE, 1),
    maps.MAP_IN_DST: (maps.PAIR_KEY_SIZE, maps.ORIGINAL_DST_SIZE),
}


@dataclass(frozen=True, slots=True)
class AttachStep:
    program: Program
    link_pin: str
    action: str        # "create" (new link, pinned), "replace" (swap program in the pinned link),
                       # "attach-map" (sk_msg onto the pinned SOCKHASH; replaces an earlier program)


def attach_plan(pin_dir: str, existing_pins: set[str], loaded: set[str] | None = None) -> list[AttachStep]:
    """What start() does per program, given the pins that already exist (and which programs loaded)."""
    steps = []
    for prog in PROGRAMS:
        if loaded is not None and prog.name not in loaded:
            continue
        if prog.target == "map":
            steps.append(AttachStep(prog, f"{pin_dir}/maps/{maps.MAP_SOCKS}", "attach-map"))
            continue
        pin = f"{pin_dir}/links/{prog.name}"
        steps.append(AttachStep(prog, pin, "replace" if pin in existing_pins else "create"))
    return steps


@dataclass(frozen=True, slots=True)
class Excludes:
    """Connections a workload makes that stay uncaptured."""
    ports: tuple[int, ...] = ()
    destinations: tuple[str, ...] = ()   # IPv4/IPv6 addresses or CIDRs


@dataclass(frozen=True, slots=True)
class Enrollment:
    kind: str          # "netns" or "cgroup"
    key: int           # netns cookie or cgroup id
    config: maps.WorkloadConfig
    excludes: Excludes = field(default_factory=Excludes)


# ---- host checks -------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            out.append((point, right.split()[0]))
    return out


def cgroup2_root() -> str | None:
    for point, fstype in _mounts():
        if fstype == "cgroup2":
            return point
    return None


def is_bpffs(path: str) -> bool:
    return any(point == path and fstype == "bpf" for point, fstype in _mounts())


def _effective_caps() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def privilege_problem(caps: int | None = None) -> str | None:
    caps = _effective_caps() if caps is None else caps
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_NET_ADMIN)):
        return None
    return (f"eBPF capture needs root (CAP_SYS_ADMIN, or CAP_BPF and CAP_NET_ADMIN); "
            f"this process (uid {os.geteuid()}) has neither")


def unavailable_reason(bpffs: str = DEFAULT_BPFFS) -> str | None:
    """Why eBPF capture cannot work here, or None. Looks only; mounts nothing."""
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        return f"bcc is not importable ({exc}); install Debian's python3-bpfcc"
    problem = privilege_problem()
    if problem:
        return problem
    if headers.find_header_tree() is None:
        return headers.explain_missing()
    if cgroup2_root() is None:
        return "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    if not os.path.isdir(bpffs):
        return f"{bpffs} does not exist, so bpffs cannot be mounted there"
    return None


def _mount_bpffs(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise EbpfUnavailable(f"bpffs is not mounted at {path} and mounting it failed: {os.strerror(err)}; "
                              f"run `mount -t bpf bpf {path}` as root")


# ---- compile once per process --------------------------------------------------------------


@contextlib.contextmanager
def _stderr_to(buf: list[str]):
    """bcc prints compiler errors and verifier logs on fd 2: collect them."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.append(tmp.read().decode(errors="replace"))


def _tail(text: str, lines: int = 12) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in kept)


@dataclass
class _Compiled:
    bpf: object
    prog_fds: dict[str, int]
    map_ids: dict[str, int]
    skipped: dict[str, str]   # optional programs the kernel refused: name -> reason
    inbound_code: bytes | None = None    # na_inbound, relocated, to be patched per netns
    inbound_problem: str | None = None   # why the kernel refused it (inbound capture off)


_COMPILED: dict[tuple, _Compiled] = {}


def _map_id(fd: int) -> int:
    return int.from_bytes(bpfsys._info(fd, 32, f"map fd {fd}")[4:8], "little")


def _map_sizes(fd: int) -> tuple[int, int]:
    raw = bpfsys._info(fd, 32, f"map fd {fd}")
    return int.from_bytes(raw[8:12], "little"), int.from_bytes(raw[12:16], "little")


def _prepare_inbound(bpf) -> tuple[bytes | None, str | None]:
    """na_inbound's relocated instructions, checked by loading one instance; or why not."""
    what = f"bpf: the kernel refused {inbound.INBOUND_PROGRAM} (inbound capture needs sk_lookup with " \
           f"ingress_ifindex, Linux 5.17 or newer)"
    try:
        code = bytes(bpf.dump_func(inbound.INBOUND_PROGRAM.encode()))
        fd = _load_inbound_instance(code, 0)
    except (bpfsys.BpfError, ValueError) as exc:
        return None, f"{what}: {exc}"
    except Exception as exc:   # bcc raises plain Exceptions
        return None, f"{what}: {exc}"
    os.close(fd)
    return code, None


def _load_inbound_instance(code: bytes, netns_cookie: int) -> int:
    return bpfsys.prog_load(bpfsys.PROG_TYPE_SK_LOOKUP, inbound.patch_netns(code, netns_cookie),
                            name=inbound.INBOUND_PROGRAM, expected_attach_type=bpfsys.SK_LOOKUP)


# ---- choosing the capture mode (--capture ebpf|nftables|auto) -------------------------------

CAPTURE_MODES = ("auto", "ebpf", "nftables", "iptables")


def decide_capture(requested: str, ebpf_problem: str | None) -> tuple[str, str | None]:
    """(mode to use, one log line or None) for ``--capture requested``.

    ``ebpf_problem`` is why eBPF cannot work here (``unavailable_reason()`` or a
    failed ``start()``), None when it works. ``auto`` falls back to nftables
    with one line saying why; ``ebpf`` fails with that reason.
    """
    if requested not in CAPTURE_MODES:
        raise ValueError(f"--capture must be one of {', '.join(CAPTURE_MODES)}, got {requested!r}")
    if requested in ("nftables", "iptables"):
        return requested, None
    if ebpf_problem is None:
        return "ebpf", None
    if requested == "ebpf":
        raise EbpfUnavailable(f"--capture ebpf: {ebpf_problem}")
    return "nftables", f"capture: eBPF unavailable, using nftables: {ebpf_problem}"


def start_capture(requested: str, pin_dir: str = DEFAULT_PIN_DIR, **kwargs) -> "EbpfCapture | None":
    """Start eBPF capture if ``--capture requested`` asks for it and the host allows it.

    Returns the started EbpfCapture, or None when nftables/iptables should be
    used (for ``auto`` one warning line says why). ``ebpf`` on a host that
    cannot do it raises EbpfUnavailable with the reason. An explicit ``ebpf``
    prepares missing kernel headers (once); ``auto`` falls back at once instead.
    """
    problem = None
    capture = None
    if requested in ("auto", "ebpf"):
        kwargs.setdefault("prepare_headers", requested == "ebpf")
        capture = EbpfCapture(pin_dir, **kwargs)
        try:
            capture.start()
        except (EbpfUnavailable, EbpfError) as exc:
            problem, capture = str(exc), None
    mode, line = decide_capture(requested, problem)
    if line:
        log.warning("%s", line)
    return capture if mode == "ebpf" else None


# ---- the loader ----------------------------------------------------------------------------


class EbpfCapture:
    """eBPF capture for the workloads of this node (see the module docstring)."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, *, bpffs: str = DEFAULT_BPFFS,
                 skip_mark: int = SKIP_MARK, source: str | None = None,
                 max_cgroup_depth: int = 8, local_fast_path: bool = True,
                 prepare_headers: bool = False) -> None:
        self.pin_dir = pin_dir.rstrip("/")
        self.bpffs = bpffs.rstrip("/")
        if not (self.pin_dir + "/").startswith(self.bpffs + "/") or self.pin_dir == self.bpffs:
            raise ValueError(f"pin directory {pin_dir} must be inside the bpffs mount {bpffs}")
        self.skip_mark = skip_mark
        self.source = source if source is not None else SOURCE.read_text()
        self.max_cgroup_depth = max_cgroup_depth
        self.local_fast_path = local_fast_path
        self.prepare_headers = prepare_headers
        self.fast_path_problem: str | None = None   # why the fast path is off on this kernel
        self.inbound_problem: str | None = None     # why inbound capture (sk_lookup) is off on this kernel
        self._compiled: _Compiled | None = None
        self.cgroup_root: str | None = None
        self.header_tree: headers.HeaderTree | None = None
        self.timings: dict[str, float] = {}
        self.program_ids: dict[str, int] = {}
        self._map_fds: dict[str, int] = {}

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        """Compile (once per process), pin the maps, attach or re-adopt the programs.

        With ``prepare_headers`` a missing header tree is prepared first from
        Debian's packages (once, ~15 s; `python -m bpf.headers prepare` does the same).
        """
        if self.prepare_headers and headers.find_header_tree() is None and privilege_problem() is None:
            try:
                headers.prepare_debian_tree(log=log.info)
            except (headers.HeaderError, OSError) as exc:
                raise EbpfUnavailable(f"{headers.explain_missing()}; preparing Debian's header packages "
                                      f"failed: {exc}") from None
        reason = unavailable_reason(self.bpffs)
        if reason:
            raise EbpfUnavailable(reason)
        if not is_bpffs(self.bpffs):
            _mount_bpffs(self.bpffs)
            log.info("bpf: mounted bpffs at %s", self.bpffs)
        self.cgroup_root = cgroup2_root()
        self.header_tree = headers.find_header_tree()
        headers.activate(self.header_tree)
        log.info("bpf: %s", self.header_tree.describe())

        self._close_maps()   # a second start() re-adopts: no handle of the first may leak
        before = self._pins()
        try:
            for sub in ("", "/maps", "/links"):
                os.makedirs(self.pin_dir + sub, exist_ok=True)
            self._check_pinned_layouts()   # before bcc reuses a pin it would misread
            compiled = self._compile()
            self._open_maps()
            self._attach(compiled, before)
            self._compiled = compiled
            self._readopt_inbound()
        except BaseException:
            self._rollback(before)
            raise

    def _pins(self) -> set[str]:
        found = set()
        if os.path.isdir(self.pin_dir):
            for directory, dirs, files in os.walk(self.pin_dir):
                found.update(os.path.join(directory, n) for n in dirs + files)
            found.add(self.pin_dir)
        return found

    def _cflags(self) -> list[str]:
        return [f'-DNA_PIN_DIR="{self.pin_dir}"', f"-DNA_SKIP_MARK={self.skip_mark:#x}",
                f"-DNA_MAX_CGROUP_DEPTH={self.max_cgroup_depth}"]

    def _compile(self) -> _Compiled:
        key = (self.source, tuple(self._cflags()), str(self.header_tree.path))
        cached = _COMPILED.get(key)
        if cached is not None and self._pinned_map_ids() == cached.map_ids:
            self.timings["compile"] = 0.0
            self.program_ids = {name: bpfsys.prog_id(fd) for name, fd in cached.prog_fds.items()}
            self.fast_path_problem = next(iter(cached.skipped.values()), None)
            self.inbound_problem = cached.inbound_problem
            return cached
        if cached is not None:   # the pins were replaced under us: recompile against the new ones
            _COMPILED.pop(key).bpf.cleanup()
        from bcc import BPF
        out: list[str] = []
        started = time.monotonic()
        try:
            with _stderr_to(out):
                bpf = BPF(text=self.source.encode(), cflags=self._cflags())
        except Exception as exc:
            raise EbpfError(f"bpf: compiling the capture programs failed ({exc}):\n{_tail(out[0] if out else '')}") from None
        self.timings["compile"] = time.monotonic() - started
        started = time.monotonic()
        prog_fds = {}
        skipped = {}
        try:
            for prog in PROGRAMS:
                out.clear()
                try:
                    with _stderr_to(out):
                        fn = bpf.load_func(prog.name.encode(), prog.prog_type, attach_type=prog.attach_type)
                except Exception as exc:
                    message = (f"bpf: the kernel refused program {prog.name} ({exc}); verifier log:\n"
                               f"{_tail(out[0] if out else '')}")
                    if not prog.optional:
                        raise EbpfError(message) from None
                    skipped[prog.name] = message
                    continue
                prog_fds[prog.name] = fn.fd
        except BaseException:
            bpf.cleanup()
            raise
        inbound_code, inbound_problem = _prepare_inbound(bpf)
        self.timings["load"] = time.monotonic() - started
        compiled = _Compiled(bpf, prog_fds, self._pinned_map_ids(), skipped, inbound_code, inbound_problem)
        _COMPILED[key] = compiled
        self.fast_path_problem = next(iter(skipped.values()), None)
        if self.fast_path_problem:
            log.warning("bpf: same-node fast path off: %s", self.fast_path_problem.splitlines()[0])
        self.inbound_problem = inbound_problem
        if inbound_problem:
            log.warning("bpf: inbound capture off: %s", inbound_problem.splitlines()[0])
        self.program_ids = {name: bpfsys.prog_id(fd) for name, fd in prog_fds.items()}
        return compiled

    def _pinned_map_ids(self) -> dict[str, int]:
        ids = {}
        for name in maps.MAP_NAMES:
            path = f"{self.pin_dir}/maps/{name}"
            if not os.path.exists(path):
                continue
            fd = bpfsys.obj_get(path)
            try:
                ids[name] = _map_id(fd)
            finally:
                os.close(fd)
        return ids

    def _check_pinned_layouts(self) -> None:
        for name in maps.MAP_NAMES:
            path = f"{self.pin_dir}/maps/{name}"
            if not os.path.exists(path):
                continue
            try:
                fd = bpfsys.obj_get(path)
            except bpfsys.BpfError as exc:
                raise EbpfError(f"bpf: cannot open pinned map {path}: {exc}") from None
            try:
                self._check_layout(name, path, fd)
            finally:
                os.close(fd)

    def _check_layout(self, name: str, path: str, fd: int) -> None:
        if _map_sizes(fd) != MAP_LAYOUTS[name]:
            raise EbpfError(f"bpf: pinned map {path} has key/value sizes {_map_sizes(fd)}, expected "
                            f"{MAP_LAYOUTS[name]} (left by another nodeagent version); remove that state with "
                            f"`python -m bpf.loader cleanup --pin-dir {self.pin_dir}`")

    def _open_maps(self) -> None:
        for name in maps.MAP_NAMES:
            path = f"{self.pin_dir}/maps/{name}"
            try:
                fd = bpfsys.obj_get(path)
            except bpfsys.BpfError as exc:
                raise EbpfError(f"bpf: pinned map {path} missing after compile: {exc}") from None
            self._map_fds[name] = fd
            self._check_layout(name, path, fd)

    def _attach(self, compiled: _Compiled, existing: set[str]) -> None:
        started = time.monotonic()
        cg_fd = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for step in attach_plan(self.pin_dir, existing, set(compiled.prog_fds)):
                prog_fd = compiled.prog_fds[step.program.name]
                what = f"{step.program.name} at cgroup {self.cgroup_root}"
                try:
                    if step.action == "attach-map":
                        what = f"{step.program.name} to {step.link_pin}"
                        bpfsys.prog_attach(prog_fd, self._map_fds[maps.MAP_SOCKS], step.program.attach_type, what)
                    elif step.action == "replace":
                        link_fd = bpfsys.obj_get(step.link_pin)
                        try:
                            bpfsys.link_update(link_fd, prog_fd, what)
                        finally:
                            os.close(link_fd)
                    else:
                        link_fd = bpfsys.link_create(prog_fd, cg_fd, step.program.attach_type, what)
                        try:
                            bpfsys.obj_pin(link_fd, step.link_pin)
                        finally:
                            os.close(link_fd)   # the pin keeps it attached
                except bpfsys.BpfError as exc:
                    raise EbpfError(f"bpf: {exc}") from None
                log.debug("bpf: %s %s (%s)", step.action, what, step.link_pin)
        finally:
            os.close(cg_fd)
        self.timings["attach"] = time.monotonic() - started

    def _rollback(self, before: set[str]) -> None:
        self._close_maps()
        created = sorted(self._pins() - before, key=len, reverse=True)
        for path in created:   # deepest first: pins, then their directories
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
        self._forget_compiled()

    # -- enrollment ------------------------------------------------------------

    def _fd(self, name: str) -> int:
        if not self._map_fds:
            raise EbpfError("bpf: capture not started; call start() first")
        return self._map_fds[name]

    def _allocate_id(self, existing_key: tuple[str, int]) -> int:
        used = {}
        for kind in (maps.MAP_NETNS, maps.MAP_CGROUP):
            for raw_key in bpfsys.map_keys(self._fd(kind), 8):
                raw = bpfsys.map_lookup(self._fd(kind), raw_key, maps.WORKLOAD_CONFIG_SIZE)
                if raw is not None:
                    used[(kind, maps.decode_u64(raw_key))] = maps.WorkloadConfig.decode(raw).workload_id
        if existing_key in used:
            return used[existing_key]
        taken = set(used.values())
        return next(i for i in range(1, len(taken) + 2) if i not in taken)

    def _write_excludes(self, workload_id: int, excludes: Excludes) -> None:
        want_ports = {maps.encode_port_key(workload_id, p) for p in excludes.ports}
        want_cidrs = {maps.encode_cidr_key(workload_id, c) for c in excludes.destinations}
        for key in want_ports:
            bpfsys.map_update(self._fd(maps.MAP_EXCL_PORT), key, b"\x01")
        for key in want_cidrs:
            bpfsys.map_update(self._fd(maps.MAP_EXCL_DST), key, b"\x01")
        self._drop_excludes(workload_id, keep=want_ports | want_cidrs)

    def _drop_excludes(self, workload_id: int, keep: set[bytes] = frozenset()) -> None:
        for name, size in ((maps.MAP_EXCL_PORT, maps.PORT_KEY_SIZE), (maps.MAP_EXCL_DST, maps.CIDR_KEY_SIZE)):
            fd = self._fd(name)
            for key in bpfsys.map_keys(fd, size):
                owner = int.from_bytes(key[4:8] if name == maps.MAP_EXCL_DST else key[0:4], "little")
                if owner == workload_id and key not in keep:
                    bpfsys.map_delete(fd, key)

    def _enroll(self, kind: str, key: int, proxy_ip: str, proxy_port: int, excludes: Excludes,
                fast_path: bool | None) -> Enrollment:
        # encode everything first: a bad port or CIDR changes nothing
        wid = self._allocate_id((kind, key))
        fast = (self.local_fast_path if fast_path is None else fast_path) and self.fast_path_problem is None
        config = maps.WorkloadConfig(wid, proxy_ip, proxy_port, maps.FLAG_FAST_PATH if fast else 0)
        raw_config = config.encode()
        [maps.encode_port_key(wid, p) for p in excludes.ports]
        [maps.encode_cidr_key(wid, c) for c in excludes.destinations]
        try:
            self._write_excludes(wid, excludes)
            bpfsys.map_update(self._fd(kind), maps.encode_u64(key), raw_config)
        except bpfsys.BpfError as exc:
            raise EbpfError(f"bpf: enrolling {kind} {key:#x} failed: {exc}") from None
        return Enrollment(kind, key, config, excludes)

    def enroll_netns(self, netns_path: str, proxy_port: int = 15001, excludes: Excludes = Excludes(),
                     proxy_ip: str = "127.0.0.1", fast_path: bool | None = None) -> Enrollment:
        """Capture every outbound TCP connection made in this network namespace (a pod)."""
        enrollment = self._enroll(maps.MAP_NETNS, netns_cookie(netns_path), proxy_ip, proxy_port, excludes,
                                  fast_path)
        log.info("bpf: capturing netns %s (cookie %d) -> %s:%d", netns_path, enrollment.key, proxy_ip, proxy_port)
        return enrollment

    def cgroup_id(self, cgroup_path: str) -> int:
        root = self.cgroup_root or cgroup2_root()
        path = cgroup_path if os.path.isabs(cgroup_path) else os.path.join(root, cgroup_path)
        real = os.path.realpath(path)
        if not (real + "/").startswith(os.path.realpath(root) + "/"):
            raise EbpfError(f"bpf: {cgroup_path} is not inside the cgroup v2 hierarchy {root}")
        try:
            return os.stat(real).st_ino
        except OSError as exc:
            raise EbpfError(f"bpf: cgroup {path}: {exc.strerror}") from None

    def enroll_cgroup(self, cgroup_path: str, proxy_port: int, excludes: Excludes = Excludes(),
                      proxy_ip: str = "127.0.0.1", fast_path: bool | None = None) -> Enrollment:
        """Capture the processes of this cgroup v2 (and its sub-cgroups): a host service."""
        enrollment = self._enroll(maps.MAP_CGROUP, self.cgroup_id(cgroup_path), proxy_ip, proxy_port, excludes,
                                  fast_path)
        log.info("bpf: capturing cgroup %s (id %d) -> %s:%d", cgroup_path, enrollment.key, proxy_ip, proxy_port)
        return enrollment

    def _unenroll(self, kind: str, key: int) -> bool:
        fd = self._fd(kind)
        raw = bpfsys.map_lookup(fd, maps.encode_u64(key), maps.WORKLOAD_CONFIG_SIZE)
        if raw is None:
            return False
        bpfsys.map_delete(fd, maps.encode_u64(key))
        self._drop_excludes(maps.WorkloadConfig.decode(raw).workload_id)
        return True

    def unenroll_netns(self, netns: str | int) -> bool:
        """Stop capturing a netns, both directions (by path, or by the cookie from its Enrollment once it is gone)."""
        cookie = netns if isinstance(netns, int) else netns_cookie(netns)
        inbound_removed = self.unenroll_inbound(cookie)
        return self._unenroll(maps.MAP_NETNS, cookie) or inbound_removed

    def unenroll_cgroup(self, cgroup: str | int) -> bool:
        return self._unenroll(maps.MAP_CGROUP, cgroup if isinstance(cgroup, int) else self.cgroup_id(cgroup))

    def enrollments(self) -> list[Enrollment]:
        """What the pinned maps say is captured (also what a restarted agent re-adopts)."""
        excl_ports: dict[int, list[int]] = {}
        for key in bpfsys.map_keys(self._fd(maps.MAP_EXCL_PORT), maps.PORT_KEY_SIZE):
            excl_ports.setdefault(int.from_bytes(key[0:4], "little"), []).append(int.from_bytes(key[4:6], "little"))
        excl_dsts: dict[int, list[str]] = {}
        for key in bpfsys.map_keys(self._fd(maps.MAP_EXCL_DST), maps.CIDR_KEY_SIZE):
            wid, cidr = maps.decode_cidr_key(key)
            excl_dsts.setdefault(wid, []).append(cidr)
        out = []
        for kind in (maps.MAP_NETNS, maps.MAP_CGROUP):
            fd = self._fd(kind)
            for raw_key in bpfsys.map_keys(fd, 8):
                raw = bpfsys.map_lookup(fd, raw_key, maps.WORKLOAD_CONFIG_SIZE)
                if raw is None:
                    continue
                cfg = maps.WorkloadConfig.decode(raw)
                out.append(Enrollment(kind, maps.decode_u64(raw_key), cfg,
                                      Excludes(tuple(sorted(excl_ports.get(cfg.workload_id, ()))),
                                               tuple(sorted(excl_dsts.get(cfg.workload_id, ()))))))
        return sorted(out, key=lambda e: e.config.workload_id)

    def original_dst(self, peer_ip: str, peer_port: int, *, proxy_port: int, netns_cookie: int) -> tuple[str, int] | None:
        """Original destination of the accepted connection from peer_ip:peer_port (see bpf/origdst.py)."""
        raw = bpfsys.map_lookup(self._fd(maps.MAP_PAIR),
                                maps.encode_pair_key(netns_cookie, peer_ip, peer_port, proxy_port),
                                maps.ORIGINAL_DST_SIZE)
        if raw is None:
            return None
        found = maps.OriginalDst.decode(raw)
        return found.ip, found.port

    # -- inbound (sk_lookup, per netns) -----------------------------------------

    def _inbound_link_pin(self, cookie: int) -> str:
        return f"{self.pin_dir}/links/{inbound.link_name(cookie)}"

    def _inbound_instance(self, cookie: int) -> int:
        if self._compiled is None or self._compiled.inbound_code is None:
            raise EbpfError(self.inbound_problem or "bpf: capture not started; call start() first")
        try:
            return _load_inbound_instance(self._compiled.inbound_code, cookie)
        except bpfsys.BpfError as exc:
            raise EbpfError(f"bpf: {exc}") from None

    def enroll_inbound(self, netns_path: str, listeners: list[socket.socket] | None = None,
                       config: InboundConfig = InboundConfig()) -> InboundEnrollment:
        """Capture TCP arriving at this network namespace (a pod) into its inbound listener.

        ``listeners``: the proxy's listening sockets inside that namespace (one
        per address family; any bound port, 15006 by convention). None finds
        them among this process's sockets on port 15006 (the agent's data
        plane opened them). Re-enrolling updates the pass-through ports and
        sources and the listeners; the per-netns program stays attached.
        """
        if self.inbound_problem:
            raise EbpfError(self.inbound_problem)
        cookie = netns_cookie(netns_path)
        ports = config.port_entries(cookie)          # validate before changing anything
        sources = config.source_entries(cookie)
        found = listeners is None
        registered = self._registered_families(cookie) if found else ()
        if registered:   # still alive (closed sockets leave the map): no scan of this process's sockets
            self._write_passes(netns_path, cookie, ports, sources)
            return InboundEnrollment(cookie, config, registered, self._ensure_inbound_link(netns_path, cookie))
        socks = inbound.listeners_in_process(cookie) if found else list(listeners)
        try:
            if found and not socks:
                raise EbpfError(f"bpf: no inbound listener on port {inbound.INBOUND_PORT} in {netns_path} "
                                f"in this process; open it before enrolling inbound capture")
            families = {}
            for sock in socks:
                if sock.getsockopt(socket.SOL_SOCKET, inbound.SO_ACCEPTCONN) != 1:
                    raise EbpfError(f"bpf: inbound listener {sock.getsockname()} is not listening")
                if socket_netns_cookie(sock) != cookie:
                    raise EbpfError(f"bpf: inbound listener {sock.getsockname()} is not inside {netns_path}")
                families[sock.family] = sock
            self._write_passes(netns_path, cookie, ports, sources)
            try:
                listen_fd = self._fd(maps.MAP_IN_LISTEN)
                for family in (socket.AF_INET, socket.AF_INET6):
                    key = maps.encode_listen_key(cookie, family)
                    if family in families:
                        bpfsys.map_update(listen_fd, key, struct.pack("=I", families[family].fileno()))
                    else:
                        bpfsys.map_delete(listen_fd, key)
            except bpfsys.BpfError as exc:
                raise EbpfError(f"bpf: enrolling inbound capture of {netns_path} failed: {exc}") from None
            pin = self._ensure_inbound_link(netns_path, cookie)
        finally:
            if found:
                for sock in socks:
                    sock.close()
        log.info("bpf: capturing inbound of netns %s (cookie %d) -> listeners %s", netns_path, cookie,
                 ",".join(socket.AddressFamily(f).name for f in sorted(families)) or "none (fail closed)")
        return InboundEnrollment(cookie, config, tuple(sorted(families)), pin)

    def _write_passes(self, netns_path: str, cookie: int, ports: dict[bytes, bytes], sources: set[bytes]) -> None:
        try:
            self._sync_keys(maps.MAP_IN_PORT, maps.IN_PORT_KEY_SIZE, cookie, ports)
            self._sync_keys(maps.MAP_IN_SRC, maps.IN_SRC_KEY_SIZE, cookie, {k: b"\x01" for k in sources})
        except bpfsys.BpfError as exc:
            raise EbpfError(f"bpf: enrolling inbound capture of {netns_path} failed: {exc}") from None

    def _ensure_inbound_link(self, netns_path: str, cookie: int) -> str:
        pin = self._inbound_link_pin(cookie)
        if not os.path.exists(pin):
            self._attach_inbound(netns_path, cookie, pin)
        return pin

    def _attach_inbound(self, netns_path: str, cookie: int, pin: str) -> None:
        prog_fd = self._inbound_instance(cookie)
        try:
            ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(prog_fd)
            raise EbpfError(f"bpf: cannot open network namespace {netns_path}: {exc.strerror}") from None
        try:
            link_fd = bpfsys.link_create(prog_fd, ns_fd, bpfsys.SK_LOOKUP,
                                         f"{inbound.INBOUND_PROGRAM} to netns {netns_path}")
            try:
                bpfsys.obj_pin(link_fd, pin)
            except bpfsys.BpfError:
                bpfsys.link_detach(link_fd, pin)
                raise
            finally:
                os.close(link_fd)   # the pin keeps it attached
        except bpfsys.BpfError as exc:
            raise EbpfError(f"bpf: {exc}") from None
        finally:
            os.close(ns_fd)
            os.close(prog_fd)

    def _registered_families(self, cookie: int) -> tuple[int, ...]:
        keys = bpfsys.map_keys(self._fd(maps.MAP_IN_LISTEN), maps.LISTEN_KEY_SIZE)
        return tuple(sorted(f for c, f in map(maps.decode_listen_key, keys) if c == cookie))

    def _sync_keys(self, name: str, key_size: int, cookie: int, want: dict[bytes, bytes]) -> None:
        """Make the entries of netns ``cookie`` in map ``name`` exactly ``want`` (keys start with it)."""
        fd = self._fd(name)
        for key, value in want.items():
            bpfsys.map_update(fd, key, value)
        for key in bpfsys.map_keys(fd, key_size):
            if self._key_cookie(name, key) == cookie and key not in want:
                bpfsys.map_delete(fd, key)

    @staticmethod
    def _key_cookie(name: str, key: bytes) -> int:
        if name == maps.MAP_IN_SRC:
            return maps.decode_in_src_key(key)[0]
        return maps.decode_u64(key)   # in_port and in_listen keys start with the cookie

    def unenroll_inbound(self, netns: str | int) -> bool:
        """Stop capturing inbound for a netns (by path or cookie); False when it was not enrolled."""
        cookie = netns if isinstance(netns, int) else netns_cookie(netns)
        removed = False
        pin = self._inbound_link_pin(cookie)
        if os.path.exists(pin):
            try:
                fd = bpfsys.obj_get(pin)
                try:
                    bpfsys.link_detach(fd, pin)
                finally:
                    os.close(fd)
            except bpfsys.BpfError as exc:
                raise EbpfError(f"bpf: {exc}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pin)
            removed = True
        try:
            for name, size in ((maps.MAP_IN_PORT, maps.IN_PORT_KEY_SIZE), (maps.MAP_IN_SRC, maps.IN_SRC_KEY_SIZE),
                               (maps.MAP_IN_LISTEN, maps.LISTEN_KEY_SIZE)):
                fd = self._fd(name)
                for key in bpfsys.map_keys(fd, size):
                    if self._key_cookie(name, key) == cookie:
                        removed = bpfsys.map_delete(fd, key) or removed
        except bpfsys.BpfError as exc:
            raise EbpfError(f"bpf: removing inbound capture of netns cookie {cookie}: {exc}") from None
        # in_dst entries of the namespace age out of the LRU map (cookies are never reused)
        return removed

    def inbound_enrollments(self) -> list[InboundEnrollment]:
        """What the pins and maps say is captured inbound."""
        cookies: dict[int, dict] = {}

        def entry(cookie: int) -> dict:
            return cookies.setdefault(cookie, {"excl": [], "tunnel": inbound.TUNNEL_PORT, "src": [], "fam": []})

        links = f"{self.pin_dir}/links"
        for name in sorted(os.listdir(links)) if os.path.isdir(links) else ():
            cookie = inbound.cookie_of_link(name)
            if cookie is not None:
                entry(cookie)
        fd = self._fd(maps.MAP_IN_PORT)
        for key in bpfsys.map_keys(fd, maps.IN_PORT_KEY_SIZE):
            cookie, port = maps.decode_in_port_key(key)
            value = bpfsys.map_lookup(fd, key, 1)
            if value == bytes([maps.IN_PORT_TUNNEL]):
                entry(cookie)["tunnel"] = port
            elif value is not None:
                entry(cookie)["excl"].append(port)
        for key in bpfsys.map_keys(self._fd(maps.MAP_IN_SRC), maps.IN_SRC_KEY_SIZE):
            cookie, cidr = maps.decode_in_src_key(key)
            entry(cookie)["src"].append(cidr)
        for key in bpfsys.map_keys(self._fd(maps.MAP_IN_LISTEN), maps.LISTEN_KEY_SIZE):
            cookie, family = maps.decode_listen_key(key)
            entry(cookie)["fam"].append(family)
        return [InboundEnrollment(c, InboundConfig(tuple(sorted(e["excl"])), tuple(sorted(e["src"])), e["tunnel"]),
                                  tuple(sorted(e["fam"])), self._inbound_link_pin(c))
                for c, e in sorted(cookies.items())]

    def _readopt_inbound(self) -> None:
        """Swap freshly loaded na_inbound instances into the pinned per-netns links (agent restart).

        A link whose namespace is gone is removed with its map entries.
        """
        links = f"{self.pin_dir}/links"
        if not os.path.isdir(links) or self._compiled is None or self._compiled.inbound_code is None:
            return
        for name in sorted(os.listdir(links)):
            cookie = inbound.cookie_of_link(name)
            if cookie is None:
                continue
            path = f"{links}/{name}"
            prog_fd = self._inbound_instance(cookie)
            try:
                link_fd = bpfsys.obj_get(path)
                try:
                    bpfsys.link_update(link_fd, prog_fd, f"{inbound.INBOUND_PROGRAM} ({path})")
                finally:
                    os.close(link_fd)
            except bpfsys.BpfError as exc:
                if exc.errno not in (errno.ENOLINK, errno.ENOENT):
                    raise EbpfError(f"bpf: {exc}") from None
                log.info("bpf: netns cookie %d is gone; removing its inbound capture", cookie)
                self.unenroll_inbound(cookie)
            finally:
                os.close(prog_fd)

    # -- teardown --------------------------------------------------------------

    def _close_maps(self) -> None:
        for fd in self._map_fds.values():
            os.close(fd)
        self._map_fds.clear()
        self._compiled = None

    def _forget_compiled(self) -> None:
        for key in [k for k in _COMPILED if f'-DNA_PIN_DIR="{self.pin_dir}"' in k[1]]:
            _COMPILED.pop(key).bpf.cleanup()
        origdst.forget_pin_dir(self.pin_dir)

    def close(self) -> None:
        """Release this process's handles; pinned maps and links stay (agent restart)."""
        self._close_maps()

    def cleanup(self) -> None:
        """Detach every program and remove every pin (works without start(), e.g. after a crash)."""
        self._close_maps()
        problems = []
        links = f"{self.pin_dir}/links"
        if os.path.isdir(links):
            for name in sorted(os.listdir(links)):
                path = f"{links}/{name}"
                try:
                    fd = bpfsys.obj_get(path)
                    try:
                        bpfsys.link_detach(fd, path)
                    finally:
                        os.close(fd)
                except bpfsys.BpfError as exc:
                    problems.append(str(exc))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for directory, dirs, files in os.walk(self.pin_dir, topdown=False):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
            for name in dirs:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(os.path.join(directory, name))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.pin_dir)
        self._forget_compiled()
        if problems:
            raise EbpfError("bpf: cleanup could not detach: " + "; ".join(problems))
        log.info("bpf: capture removed (%s)", self.pin_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m bpf.loader status|cleanup [--pin-dir DIR]``: inspect or remove pinned capture state."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bpf.loader")
    parser.add_argument("action", choices=("status", "cleanup"))
    parser.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    args = parser.parse_args(argv)
    capture = EbpfCapture(args.pin_dir)
    if args.action == "cleanup":
        try:
            capture.cleanup()
        except EbpfError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"removed {args.pin_dir}")
        return 0
    if not os.path.isdir(args.pin_dir):
        print(f"no eBPF capture state at {args.pin_dir}")
        return 0
    for name in maps.MAP_NAMES:
        path = f"{args.pin_dir}/maps/{name}"
        if os.path.exists(path):
            capture._map_fds[name] = bpfsys.obj_get(path, readonly=True)
    links = sorted(os.listdir(f"{args.pin_dir}/links")) if os.path.isdir(f"{args.pin_dir}/links") else []
    print(f"links: {' '.join(links) or '-'}")
    try:
        for e in capture.enrollments():
            print(f"{e.kind} {e.key}: -> {e.config.proxy_ip}:{e.config.proxy_port} "
                  f"fast_path={'on' if e.config.flags & maps.FLAG_FAST_PATH else 'off'} "
                  f"exclude ports={list(e.excludes.ports)} destinations={list(e.excludes.destinations)}")
        if all(name in capture._map_fds for name in (maps.MAP_IN_PORT, maps.MAP_IN_SRC, maps.MAP_IN_LISTEN)):
            for i in capture.inbound_enrollments():
                fams = ",".join({socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(f, str(f)) for f in i.listeners)
                print(f"inbound netns {i.key}: -> listeners={fams or '-'} tunnel={i.config.tunnel_port} "
                      f"exclude ports={list(i.config.exclude_ports)} probe sources={list(i.config.probe_sources)}")
    finally:
        capture.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
