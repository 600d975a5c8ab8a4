"""cgroup v2 look-ups for host-mode capture (thin I/O, read-only)."""
from __future__ import annotations

from .plan import CaptureError


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str:
    """Where cgroup v2 is mounted (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified`` on hybrid hosts)."""
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    raise CaptureError("cgroup v2 is not mounted (see `mount | grep cgroup2`); host-mode capture needs it: "
                       "mount -t cgroup2 none /sys/fs/cgroup/unified")


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of a process, relative to the v2 root (for ``HostWorkload.cgroup``)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip().strip("/")
    except FileNotFoundError:
        raise CaptureError(f"process {pid} does not exist") from None
    raise CaptureError(f"process {pid} has no cgroup v2 membership (no '0::' line in /proc/{pid}/cgroup)")
