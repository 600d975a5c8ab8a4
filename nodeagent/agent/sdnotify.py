"""systemd's sd_notify protocol: one datagram to $NOTIFY_SOCKET, no library.

``@name`` is a socket in the abstract namespace. Without $NOTIFY_SOCKET (not
run by systemd with Type=notify) every call is a no-op that returns False.
With ``WatchdogSec=`` systemd sets $WATCHDOG_USEC (and $WATCHDOG_PID): the
agent then sends ``WATCHDOG=1`` from its event loop at half that interval, so
a stalled loop gets the service restarted.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("nodeagent.agent.sdnotify")


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STATUS=...``, ``STOPPING=1``); True if sent."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        # Never block (this runs on the event loop): a receiver whose queue is full loses the datagram.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(state.encode(), address)
    except BlockingIOError:
        log.debug("systemd notify %r to %s dropped: the receiver's queue is full", state, address.replace("\0", "@"))
        return False
    except OSError as exc:
        log.warning("systemd notify %r to %s failed: %s", state, address.replace("\0", "@"), exc)
        return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not asked."""
    env = environ if environ is not None else os.environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
