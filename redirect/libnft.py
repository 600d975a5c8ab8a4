"""libnftables in-process: the `nft` commands without the `nft` process.

``nft -f`` from Python costs a fork/exec of nsenter and nft (~5-10 ms on a
loaded 2-core VM) plus, after any commit, the kernel's wait for an RCU grace
period when the netlink socket is closed (~10 ms; nf_tables flushes its
transaction-destroy work on the socket's NETLINK_URELEASE). This module runs
the same command text through libnftables (``libnftables.so.1``, shipped with
the ``nftables`` package the ``nft`` binary comes from) inside the pod's
namespace, and closes the context from a background thread once that grace
period is over, so neither cost is on the caller's path.

- A context's netlink socket belongs to the network namespace of the thread
  that creates it, so ``run(netns, fn)`` creates a fresh context inside
  ``netns`` (``redirect.netns.run_in_netns``) for each call. No context is
  kept per namespace: an open socket would keep a deleted pod's namespace
  alive.
- ``Session.cmd(text)`` is ``nft -f`` semantics: the whole text is ONE batch,
  committed atomically or not at all.
- Calls into the library are serialized by one lock (each takes well under a
  millisecond; libnftables keeps some caches process-global).
- Binding: a few ctypes prototypes of the stable public API
  (``nft_ctx_new``, ``nft_run_cmd_from_buffer``, output buffering), the same
  calls Debian's ``python3-nftables`` makes; no extra Python package needed.
- ``available()`` is False when the library cannot be loaded; callers then
  fall back to the ``nft`` binary (one log line says so).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import socket
import threading
import time
from typing import Callable, TypeVar

from .netns import NetnsRef, run_in_netns
from .plan import CaptureError

T = TypeVar("T")
log = logging.getLogger(__name__)

SONAME = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
NETLINK_NETFILTER = 12
# Free a context once no command ran for this long: by then the RCU grace
# period that a commit's cleanup waits for is over, so the close does not block
# (and, holding the call lock, does not delay the next apply). During a burst
# of applies, contexts wait, but never longer than FREE_MAX_WAIT nor more than
# FREE_MAX_PENDING at once (each holds a file descriptor and its namespace).
FREE_DELAY = 0.05
FREE_MAX_WAIT = 1.0
FREE_MAX_PENDING = 64
# libnftables waits for netlink replies with select() (nftables' mnl.c), and glibc aborts the
# whole process ("bit out of range 0 - FD_SETSIZE on fd_set") when that descriptor is >= 1024.
# A context takes the lowest free descriptor when it is made: with fewer than FD_HEADROOM free
# below FD_SETSIZE, callers use the nft command instead (its own process, low descriptors).
FD_SETSIZE = 1024
FD_HEADROOM = 64


class NftLibError(CaptureError):
    """libnftables refused a command; the message carries its error text."""


_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_load_lock = threading.Lock()
_call_lock = threading.Lock()  # one libnftables call at a time, process-wide
_warned = False
_last_call = 0.0  # time.monotonic() of the last libnftables command


def _load() -> ctypes.CDLL | None:
    global _lib, _load_error
    with _load_lock:
        if _lib is not None:
            return _lib
        try:  # a failure is not cached: it may be passing (out of file descriptors)
            lib = ctypes.CDLL(SONAME)
        except OSError as exc:
            _load_error = f"cannot load {SONAME} ({exc}); install Debian's libnftables1 (it comes with nftables)"
            return None
        vp, ci, cu, cs = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
        for name, res, args in (("nft_ctx_new", vp, [ctypes.c_uint32]), ("nft_ctx_free", None, [vp]),
                                ("nft_ctx_output_set_flags", None, [vp, cu]),
                                ("nft_ctx_buffer_output", ci, [vp]), ("nft_ctx_buffer_error", ci, [vp]),
                                ("nft_ctx_get_output_buffer", cs, [vp]), ("nft_ctx_get_error_buffer", cs, [vp]),
                                ("nft_run_cmd_from_buffer", ci, [vp, cs])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _lib = lib
        return lib


def low_descriptor_free() -> bool:
    """True when a context made now gets a descriptor libnftables can select() on (see FD_SETSIZE)."""
    try:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # none free at all: the session's own checks report it as a CaptureError
    os.close(fd)
    return fd < FD_SETSIZE - FD_HEADROOM


def available() -> bool:
    """True when libnftables can be used; logs once (as a warning) why not."""
    global _warned
    if _load() is not None:
        return True
    if not _warned:
        _warned = True
        log.warning("nftables capture: %s; using the nft command instead (slower: one process per command)",
                    _load_error)
    return False


class Session:
    """One libnftables context, used from the thread (and namespace) that made it."""

    def __init__(self, lib: ctypes.CDLL, where: str) -> None:
        self._lib = lib
        self.where = where
        # libnftables exit()s the whole process when it cannot open its netlink
        # socket (e.g. out of file descriptors): find out first, as an exception.
        try:
            probe = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise NftLibError(f"cannot open a netfilter netlink socket{where}: {exc.strerror or exc}") from None
        fd = probe.fileno()
        probe.close()
        if fd >= FD_SETSIZE - FD_HEADROOM:
            raise NftLibError(f"libnftables cannot be used with {fd} descriptors open (it select()s on its socket, "
                              f"which aborts the process at {FD_SETSIZE}); use the nft command")
        with _call_lock:
            ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
            if not ctx:
                raise NftLibError(f"libnftables: cannot create a context{where} (netlink socket refused?)")
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
        self._ctx: int | None = ctx

    def cmd(self, text: str, *, json_output: bool = False) -> str:
        """Run ``text`` (one batch, like ``nft -f``); its output, or NftLibError."""
        if self._ctx is None:
            raise NftLibError("libnftables session used after close")
        global _last_call
        with _call_lock:
            _last_call = time.monotonic()
            self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            first = text.strip().splitlines()[0] if text.strip() else ""
            raise NftLibError(f"nftables{self.where} refused `{first}`{' ...' if chr(10) in text.strip() else ''}: "
                              f"{err.strip() or f'error {rc}'}")
        return out

    def close(self) -> None:
        """Hand the context to the background closer (see FREE_DELAY)."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            _closer.put(self._lib, ctx)


class _Closer:
    """Frees contexts off the caller's path once libnftables has been idle for FREE_DELAY."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[float, ctypes.CDLL, int]] = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def put(self, lib: ctypes.CDLL, ctx: int) -> None:
        with self._cond:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="libnft-closer", daemon=True)
                self._thread.start()
        self._queue.put((time.monotonic(), lib, ctx))

    def _loop(self) -> None:
        while True:
            since, lib, ctx = self._queue.get()
            while True:
                now = time.monotonic()
                wait = max(since, _last_call) + FREE_DELAY - now
                if wait <= 0 or now - since >= FREE_MAX_WAIT or self._pending > FREE_MAX_PENDING:
                    break
                time.sleep(min(wait, FREE_MAX_WAIT - (now - since)))
            try:
                with _call_lock:
                    lib.nft_ctx_free(ctx)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def drain(self, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)


_closer = _Closer()


def drain(timeout: float = 5.0) -> bool:
    """Wait (bounded) until every context is closed; True when none is left."""
    return _closer.drain(timeout)


def run(netns: NetnsRef | None, fn: Callable[[Session], T], *, timeout: float = 10.0) -> T:
    """Call ``fn(session)`` with a libnftables session inside ``netns`` (None: here)."""
    lib = _load()
    if lib is None:
        raise NftLibError(_load_error or f"{SONAME} is unavailable")
    where = f" in network namespace {netns!r}" if netns is not None else ""

    def body() -> T:
        session = Session(lib, where)
        try:
            return fn(session)
        finally:
            session.close()

    return run_in_netns(netns, body, timeout=timeout)
