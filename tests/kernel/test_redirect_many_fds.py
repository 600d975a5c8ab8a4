"""A busy agent holds more than 1024 descriptors (six listening sockets per pod: ~160 pods).
libnftables select()s on its netlink socket, and glibc aborts the whole process when that
descriptor is >= FD_SETSIZE: capture must then go through the nft command instead, and the
agent must live on. Run in a child process: the abort, if it came back, would kill pytest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from redirect import libnft
from redirect.capture import apply as apply_plan, cleanup
from redirect.plan import in_pod_plan
netns = sys.argv[2]
assert libnft.available() and libnft.low_descriptor_free()
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]   # like ~180 pods' listeners
assert not libnft.low_descriptor_free()
result = apply_plan(in_pod_plan(), netns)
print("applied", result.changed)
again = apply_plan(in_pod_plan(), netns)
print("again", again.changed)
try:
    libnft.run(netns, lambda s: s.cmd("list tables"))
except libnft.NftLibError as exc:
    print("libnft refused:", "descriptors open" in str(exc))
cleanup(netns)
for fd in held:
    os.close(fd)
assert libnft.low_descriptor_free()
print("done")
"""


def test_capture_with_more_than_fd_setsize_descriptors_open(needs_root, fresh_netns):
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), fresh_netns], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split("\n")[:4] == ["applied True", "again False", "libnft refused: True", "done"], out.stdout
    listing = subprocess.run(["ip", "netns", "exec", fresh_netns, "nft", "list", "tables"], capture_output=True,
                             text=True, timeout=10).stdout
    assert "nodeagent" not in listing
