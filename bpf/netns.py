"""Network-namespace identity for the capture maps.

The programs select a pod by its netns cookie (bpf_get_netns_cookie). User
space reads the same cookie with getsockopt(SO_NETNS_COOKIE) on a socket
opened inside the namespace (setns in a throwaway thread: setns changes only
the calling thread, and Python 3.11 has no os.setns).
"""
from __future__ import annotations

import ctypes
import os
import socket
import threading

SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def socket_netns_cookie(sock: socket.socket) -> int:
    """The netns cookie of the namespace ``sock`` lives in (Linux >= 5.14)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def run_in_netns(netns_path: str, fn):
    """Call ``fn()`` in a thread that has joined the network namespace at ``netns_path``."""
    result: dict = {}

    def target() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result["error"] = OSError(exc.errno, f"cannot open network namespace {netns_path}: {exc.strerror}")
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = OSError(err, f"cannot join network namespace {netns_path}: {os.strerror(err)}")
                return
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc
        finally:
            os.close(fd)

    # The thread exits after fn: its changed namespace dies with it.
    worker = threading.Thread(target=target, name="bpf-netns")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def netns_cookie(netns_path: str) -> int:
    """The cookie of the network namespace at ``netns_path`` (e.g. /run/netns/NAME, /proc/PID/ns/net)."""
    def probe() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            return socket_netns_cookie(sock)
    return run_in_netns(netns_path, probe)
