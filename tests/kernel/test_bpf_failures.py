"""eBPF capture failure paths: each a clear error, nothing half-attached left behind."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from bpf import sys as bpfsys
from bpf.loader import SOURCE, EbpfCapture, EbpfError, cgroup2_root
from tests.conftest import REPO

ATTACH_TYPES = (bpfsys.CGROUP_INET4_CONNECT, bpfsys.CGROUP_INET6_CONNECT, bpfsys.CGROUP_SOCK_OPS,
                bpfsys.CGROUP_GETSOCKOPT)

TRY_START = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[1])
from bpf.loader import EbpfCapture, EbpfUnavailable, start_capture
pin_dir, bpffs = sys.argv[2], sys.argv[3]
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("nodeagent.bpf").addHandler(handler)
logging.getLogger("nodeagent.bpf").setLevel(logging.INFO)
out = {}
try:
    EbpfCapture(pin_dir, bpffs=bpffs).start()
    out["started"] = True
except EbpfUnavailable as exc:
    out["unavailable"] = str(exc)
out["auto_fell_back"] = start_capture("auto", pin_dir, bpffs=bpffs) is None
out["log"] = lines
try:
    start_capture("ebpf", pin_dir, bpffs=bpffs)
except EbpfUnavailable as exc:
    out["ebpf"] = str(exc)
print(json.dumps(out))
"""


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _held_by_other_processes() -> set[int]:
    """Ids of the BPF programs another live process holds a descriptor of: an agent or test
    running beside this one (a failed start leaves nothing open elsewhere)."""
    held = set()
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            held.add(int(line.split()[1]))
            except (OSError, ValueError):
                continue
    return held


def ours_attached_since(since_ns: int) -> list[str]:
    """Capture programs attached at the cgroup root that were loaded after ``since_ns``.

    (Other agents on this machine may attach their own at any time; only
    programs loaded during the failed start could be ours.)
    """
    fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = {pid for t in ATTACH_TYPES for pid in bpfsys.prog_query(fd, t)}
    finally:
        os.close(fd)
    ids -= _held_by_other_processes()
    found = []
    for pid in ids:
        info = bpfsys.prog_name_and_load_time(pid)
        if info and info[0].startswith("na_") and info[1] >= since_ns:
            found.append(info[0])
    return found


def try_start(prefix: list[str], pin_dir: str, bpffs: str) -> dict:
    done = subprocess.run([*prefix, sys.executable, "-c", TRY_START, str(REPO), pin_dir, bpffs],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_unprivileged_user_gets_a_clear_reason(needs_root, needs_tool):
    setpriv = needs_tool("setpriv")
    pin_dir = f"/sys/fs/bpf/nodeagent-test-{secrets.token_hex(3)}"
    result = try_start([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"],
                       pin_dir, "/sys/fs/bpf")
    reason = result["unavailable"]
    assert "needs root (CAP_SYS_ADMIN, or CAP_BPF and CAP_NET_ADMIN)" in reason and "uid 65534" in reason
    # --capture auto: one line, then nftables; --capture ebpf: fails with the reason
    assert result["auto_fell_back"] is True
    assert result["log"] == [f"capture: eBPF unavailable, using nftables: {reason}"]
    assert result["ebpf"] == f"--capture ebpf: {reason}"
    assert not os.path.exists(pin_dir)


def test_no_bpffs_and_no_right_to_mount_it(needs_root, needs_tool, tmp_path):
    setpriv = needs_tool("setpriv")
    bpffs = tmp_path / "bpf"
    bpffs.mkdir()
    since = boottime_ns()
    # root keeps CAP_BPF and CAP_NET_ADMIN but loses CAP_SYS_ADMIN: it may load, but not mount
    result = try_start([setpriv, "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"],
                       f"{bpffs}/nodeagent", str(bpffs))
    assert result["unavailable"] == (f"bpffs is not mounted at {bpffs} and mounting it failed: Operation not "
                                     f"permitted; run `mount -t bpf bpf {bpffs}` as root")
    assert os.listdir(bpffs) == []
    assert ours_attached_since(since) == []


def rejected_source() -> str:
    # dereferences a number: compiles, then the verifier refuses it
    good = "ctx->user_ip4 = cfg->proxy_ip4;"
    source = SOURCE.read_text()
    assert good in source
    return source.replace(good, "ctx->user_ip4 = *(__u32 *)(long)cfg->proxy_ip4;")


def test_program_rejected_by_the_verifier_leaves_nothing_behind(needs_root):
    pin_dir = f"/sys/fs/bpf/nodeagent-test-{secrets.token_hex(3)}"
    since = boottime_ns()
    cap = EbpfCapture(pin_dir, source=rejected_source())
    with pytest.raises(EbpfError) as info:
        cap.start()
    message = str(info.value)
    assert message.startswith("bpf: the kernel refused program na_connect4 (")
    assert "verifier log:" in message and "invalid mem access" in message
    assert not os.path.exists(pin_dir)          # the maps the compile pinned are gone again
    assert ours_attached_since(since) == []


def test_compile_error_names_the_problem_and_leaves_nothing_behind(needs_root):
    pin_dir = f"/sys/fs/bpf/nodeagent-test-{secrets.token_hex(3)}"
    cap = EbpfCapture(pin_dir, source=SOURCE.read_text() + "\nint broken(struct bpf_sock_addr *ctx) { return undefined_name; }\n")
    with pytest.raises(EbpfError) as info:
        cap.start()
    assert "compiling the capture programs failed" in str(info.value)
    assert "undefined_name" in str(info.value)
    assert not os.path.exists(pin_dir)
