"""Network-namespace helpers: run code and commands inside a pod's namespace.

A network namespace is named three ways, all accepted everywhere here:
a name (``ip netns`` style, ``/var/run/netns/NAME``), a path
(``/var/run/netns/NAME``, ``/proc/PID/ns/net``) or a PID (int).

Python 3.11 has no ``os.setns``, so ``entered`` calls libc's ``setns`` through
ctypes. A namespace switch is per THREAD: ``run_in_netns`` does it in a short
worker thread, so the caller (e.g. the asyncio loop thread) never changes
namespace. A socket belongs to the namespace it was created in for its whole
life, which is why a listener opened this way keeps serving the pod after the
thread has switched back.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import subprocess
import threading
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .plan import PROXY_MARK, CaptureError

T = TypeVar("T")
NetnsRef = str | int
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
SO_ORIGINAL_DST = 80  # netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


class NetnsError(CaptureError):
    """A namespace could not be found or entered; the message says which and why."""


def netns_path(netns: NetnsRef) -> str:
    """The filesystem path of a namespace given by name, path or PID."""
    if isinstance(netns, bool):
        raise NetnsError(f"network namespace must be a name, path or PID, got {netns!r}")
    if isinstance(netns, int):
        return f"/proc/{netns}/ns/net"
    if not netns:
        raise NetnsError("network namespace name is empty")
    if "/" in netns:
        return netns
    return f"{NETNS_RUN_DIR}/{netns}"


def _open_netns(netns: NetnsRef) -> int:
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {netns!r} not found ({path} does not exist); "
                         "is the pod still running?") from None
    except PermissionError:
        raise NetnsError(f"cannot open network namespace {path}: permission denied (run as root)") from None
    except OSError as exc:  # e.g. out of file descriptors
        raise NetnsError(f"cannot open network namespace {path}: {exc.strerror or exc}") from None


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns({what}) failed: {os.strerror(err)}"
                         + (" (needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""))


@contextlib.contextmanager
def entered(netns: NetnsRef) -> Iterator[None]:
    """Switch the CALLING THREAD into ``netns`` and back on exit.

    Use ``run_in_netns`` unless you own the thread: a thread left in the wrong
    namespace would silently open sockets in the wrong pod.
    """
    target = _open_netns(netns)
    try:
        try:
            home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"cannot open this thread's network namespace: {exc.strerror or exc}") from None
        try:
            _setns(target, netns_path(netns))
            try:
                yield
            finally:
                _setns(home, "back to the original namespace")
        finally:
            os.close(home)
    finally:
        os.close(target)


def run_in_netns(netns: NetnsRef | None, fn: Callable[..., T], *args: Any,
                 timeout: float = 10.0, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` inside ``netns`` (None: here) from a worker thread.

    Returns its result or re-raises its exception. ``timeout`` bounds the wait.
    """
    if netns is None:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with entered(netns):
                box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=body, name=f"netns:{netns}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"call in network namespace {netns!r} did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def netns_command(netns: NetnsRef | None, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` in ``netns``.

    nsenter joins only the network namespace: unlike ``ip netns exec`` it does
    not remount /sys, so nft can still resolve cgroup paths under /sys/fs/cgroup.
    """
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def check_netns(netns: NetnsRef) -> None:
    """NetnsError naming the namespace if it does not exist."""
    if not os.path.exists(netns_path(netns)):
        raise NetnsError(f"network namespace {netns!r} not found ({netns_path(netns)} does not exist)")


def run_command(netns: NetnsRef | None, argv: Sequence[str], *, input: str | None = None,
                timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside ``netns``; on failure raise NetnsError with its stderr."""
    if netns is not None:
        check_netns(netns)
    cmd = netns_command(netns, argv)
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetnsError(f"{exc.filename}: command not found; install it (Debian: nftables, iptables, util-linux)") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` in network namespace {netns!r} took longer than {timeout} s") from None
    if check and proc.returncode != 0:
        where = f" in network namespace {netns!r}" if netns is not None else ""
        raise NetnsError(f"`{' '.join(argv)}`{where} failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.split("%")[0]).version == 6 else socket.AF_INET
    except ValueError:
        raise NetnsError(f"listener address must be a literal IP address (no DNS here), got {host!r}") from None


def set_mark(sock: socket.socket, mark: int = PROXY_MARK) -> None:
    """Mark a socket's packets so nodeagent's capture rules let them through."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def open_listener_in_netns(netns: NetnsRef | None, host: str, port: int, *, transparent: bool = False,
                           reuse_port: bool = False, mark: int | None = None,
                           backlog: int = 1024) -> socket.socket:
    """Bind and listen inside ``netns`` from this process; returns the (blocking) socket.

    ``transparent`` sets IP_TRANSPARENT (TPROXY listeners); ``mark`` sets
    SO_MARK on the listener (accepted sockets inherit it).
    """
    family = _family(host)

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if transparent:
                if family == socket.AF_INET6:
                    sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            if mark is not None:
                set_mark(sock, mark)
            sock.bind((host, port))
            sock.listen(backlog)
            return sock
        except OSError as exc:
            sock.close()
            where = f" in network namespace {netns!r}" if netns is not None else ""
            raise NetnsError(f"cannot listen on {host}:{port}{where}: {exc.strerror or exc}") from None

    return run_in_netns(netns, make)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a REDIRECTed connection was addressed to (SO_ORIGINAL_DST)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def marked_socket(family: socket.AddressFamily = socket.AF_INET, *, netns: NetnsRef | None = None,
                  mark: int = PROXY_MARK) -> socket.socket:
    """An unconnected TCP socket in ``netns`` carrying ``mark`` (for loop.sock_connect)."""

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            set_mark(sock, mark)
        except OSError:
            sock.close()
            raise
        return sock

    return run_in_netns(netns, make)


def connect_marked(address: tuple[str, int], *, netns: NetnsRef | None = None, mark: int = PROXY_MARK,
                   timeout: float | None = 5.0, source: tuple[str, int] | None = None) -> socket.socket:
    """Connect to ``address`` from ``netns`` with SO_MARK ``mark`` (not captured)."""
    sock = marked_socket(_family(address[0]), netns=netns, mark=mark)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind(source)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
