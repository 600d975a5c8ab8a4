"""eBPF capture on the real kernel: redirect, original destination, skips, cgroups, restart, cleanup.

One loader (one compile) serves the whole module. Every namespace holds its
own addresses (10.250.x.y on its lo) and a real server on them, so a
connection that is NOT captured reaches that server and one that is reaches
the proxy listener: each answer says which side took the connection.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bpf import maps, origdst
from bpf import sys as bpfsys
from bpf.loader import EbpfCapture, Excludes, cgroup2_root
from bpf.netns import netns_cookie, run_in_netns, socket_netns_cookie
from tests.conftest import REPO, require
from tests.kernel.responder import Responder, fmt, ip

TAG = secrets.token_hex(3)
PIN_DIR = f"/sys/fs/bpf/nodeagent-test-{TAG}"
SKIP_MARK = 0x539
DST = ("10.250.1.2", 80)
ATTACH_TYPES = (bpfsys.CGROUP_INET4_CONNECT, bpfsys.CGROUP_INET6_CONNECT, bpfsys.CGROUP_SOCK_OPS,
                bpfsys.CGROUP_GETSOCKOPT)
DST6 = ("fd00:250::2", 80)
EXCLUDES = Excludes(ports=(81,), destinations=("10.250.1.3/32", "fd00:250::3/128"))


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_in(netns: str, addr: tuple[str, int]) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(family_of(addr[0]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
        return sock
    return run_in_netns(f"/run/netns/{netns}", make)


def proxy_reply(pin_dir: str):
    def reply(conn: socket.socket) -> str:
        peer = conn.getpeername()
        via_sockopt = origdst.so_original_dst(conn)
        via_map = origdst.original_dst_for_socket(conn, pin_dir=pin_dir)
        return f"proxy {fmt(via_sockopt)} {fmt(via_map)} {peer[0]}:{peer[1]}"
    return reply


def ask(netns: str, addr: tuple[str, int], mark: int | None = None) -> str:
    """Connect from inside ``netns`` and return the one-line answer."""
    def make() -> socket.socket:
        sock = socket.socket(family_of(addr[0]))
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        return sock
    sock = run_in_netns(f"/run/netns/{netns}", make)
    with sock:
        sock.settimeout(3)
        sock.connect(addr)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


class World:
    def __init__(self):
        self.netns = {k: f"nabpf{k}{TAG}" for k in ("a", "b", "c", "d")}
        self.responders: list[Responder] = []
        self.cgroups: list[Path] = []
        self.cap: EbpfCapture | None = None
        self.program_ids: set[int] = set()

    def build(self) -> None:
        for ns in self.netns.values():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            for addr in ("10.250.1.2/32", "10.250.1.3/32", "fd00:250::2/128", "fd00:250::3/128"):
                ip("-n", ns, "addr", "add", addr, "dev", "lo", *(["nodad"] if ":" in addr else []))
            for addr in (("10.250.1.2", 80), ("10.250.1.2", 81), ("10.250.1.3", 80),
                         ("fd00:250::2", 80), ("fd00:250::3", 80)):
                self.responders.append(Responder(listen_in(ns, addr), lambda c, a=addr, n=ns: f"server {a[0]}:{a[1]}"))
        for proxy in (("127.0.0.1", 15001), ("::1", 15001)):
            self.responders.append(Responder(listen_in(self.netns["a"], proxy), proxy_reply(PIN_DIR)))
        # host-mode listener: a per-workload port, bound to port 0
        self.host_listener = listen_in(self.netns["c"], ("127.0.0.1", 0))
        self.host_port = self.host_listener.getsockname()[1]
        self.responders.append(Responder(self.host_listener, proxy_reply(PIN_DIR)))
        root = Path(cgroup2_root())
        self.cg_parent = root / f"nodeagent-test-{TAG}"
        self.cg_svc = self.cg_parent / "svc"
        self.cg_sub = self.cg_svc / "worker"
        self.cg_other = self.cg_parent / "other"
        for d in (self.cg_sub, self.cg_other):
            d.mkdir(parents=True)
        self.cgroups = [self.cg_sub, self.cg_other, self.cg_svc, self.cg_parent]

    def teardown(self) -> None:
        if self.cap is not None:
            self.cap.cleanup()
        for r in self.responders:
            r.close()
        for ns in self.netns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=5)
        for d in self.cgroups:
            deadline = time.monotonic() + 5
            while d.exists() and time.monotonic() < deadline:
                try:
                    d.rmdir()
                except OSError:
                    time.sleep(0.05)


@pytest.fixture(scope="module")
def world():
    require(os.geteuid() == 0, "needs root (network namespaces, eBPF)")
    w = World()
    try:
        w.build()
        w.cap = EbpfCapture(PIN_DIR)
        started = time.monotonic()
        w.cap.start()
        w.start_seconds = time.monotonic() - started
        w.program_ids |= set(w.cap.program_ids.values())
        w.enrolled = w.cap.enroll_netns(f"/run/netns/{w.netns['a']}", 15001, EXCLUDES)
        yield w
    finally:
        w.teardown()


def test_netns_connection_is_redirected_and_original_dst_recovered(world):
    answer = ask(world.netns["a"], DST)
    # both recovery paths: SO_ORIGINAL_DST (getsockopt hook) and the pinned map read
    assert answer.startswith("proxy 10.250.1.2:80 10.250.1.2:80 127.0.0.1:"), answer
    assert world.start_seconds < 10


def test_ipv6_connection_is_redirected_to_the_ipv6_loopback_listener(world):
    answer = ask(world.netns["a"], DST6)
    # IP6T_SO_ORIGINAL_DST through the getsockopt hook, and the map read
    assert answer.startswith("proxy fd00:250::2:80 fd00:250::2:80 ::1:"), answer
    assert ask(world.netns["b"], DST6) == "server fd00:250::2:80"


def test_v4_mapped_destination_on_a_dual_stack_socket_is_redirected(world):
    answer = ask(world.netns["a"], ("::ffff:10.250.1.2", 80))
    assert answer.startswith("proxy 10.250.1.2:80 10.250.1.2:80 127.0.0.1:"), answer


def test_original_dst_from_map_by_peer_address(world):
    sock = run_in_netns(f"/run/netns/{world.netns['a']}", socket.socket)
    with sock:
        sock.settimeout(3)
        sock.connect(("10.250.1.2", 80))
        local_ip, local_port = sock.getsockname()
        assert sock.getpeername() == ("127.0.0.1", 15001)     # the client sees where it really went
        cookie = socket_netns_cookie(sock)
        assert cookie == world.enrolled.key == netns_cookie(f"/run/netns/{world.netns['a']}")
        assert world.cap.original_dst(local_ip, local_port, proxy_port=15001, netns_cookie=cookie) == DST
        assert origdst.original_dst_from_map(local_ip, local_port, proxy_port=15001, netns_cookie=cookie,
                                             pin_dir=PIN_DIR) == DST
        # another netns' cookie with the same address pair finds nothing
        other = netns_cookie(f"/run/netns/{world.netns['b']}")
        assert world.cap.original_dst(local_ip, local_port, proxy_port=15001, netns_cookie=other) is None


def test_proxy_marked_socket_is_not_redirected(world):
    assert ask(world.netns["a"], DST, mark=SKIP_MARK) == "server 10.250.1.2:80"
    assert ask(world.netns["a"], DST, mark=0x538).startswith("proxy 10.250.1.2:80")


def test_excluded_port_and_destination_are_not_redirected(world):
    assert ask(world.netns["a"], ("10.250.1.2", 81)) == "server 10.250.1.2:81"
    assert ask(world.netns["a"], ("10.250.1.3", 80)) == "server 10.250.1.3:80"
    assert ask(world.netns["a"], ("fd00:250::3", 80)) == "server fd00:250::3:80"
    assert world.cap.enrollments()[0].excludes == EXCLUDES


def test_other_netns_is_unaffected(world):
    assert ask(world.netns["b"], DST) == "server 10.250.1.2:80"


def test_unenroll_stops_capture_and_reenroll_restores_it(world):
    ns_path = f"/run/netns/{world.netns['a']}"
    assert world.cap.unenroll_netns(ns_path) is True
    assert world.cap.enrollments() == []
    assert ask(world.netns["a"], DST) == "server 10.250.1.2:80"
    assert world.cap.unenroll_netns(ns_path) is False
    again = world.cap.enroll_netns(ns_path, 15001, EXCLUDES)
    assert again.key == world.enrolled.key
    assert ask(world.netns["a"], DST).startswith("proxy 10.250.1.2:80")
    assert ask(world.netns["a"], ("10.250.1.2", 81)) == "server 10.250.1.2:81"


def local_socks(pin_dir: str) -> set[tuple]:
    fd = bpfsys.obj_get(f"{pin_dir}/maps/{maps.MAP_SOCKS}")
    try:
        return {maps.decode_sock_key(k) for k in bpfsys.map_keys(fd, maps.SOCK_KEY_SIZE)}
    finally:
        os.close(fd)


def echo_once(listener: socket.socket, accepted: list) -> threading.Thread:
    def serve() -> None:
        listener.settimeout(3)
        conn, _ = listener.accept()
        accepted.append(conn)
        with conn:
            conn.settimeout(5)
            while data := conn.recv(65536):
                conn.sendall(data)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def exchange(sock: socket.socket, rounds: int = 300) -> None:
    """Many writes of varying sizes, some pipelined, each echoed back in order."""
    sock.settimeout(5)
    expected = bytearray()
    received = bytearray()
    for i in range(rounds):
        chunk = bytes([(i + j) % 251 for j in range(1 + (i * 37) % 3000)])
        sock.sendall(chunk)
        expected += chunk
        if i % 7 == 0:   # read back what is there so far, leaving the rest in flight
            while len(received) < len(expected) - 4096:
                received += sock.recv(65536)
    while len(received) < len(expected):
        data = sock.recv(65536)
        assert data, "echo closed early"
        received += data
    assert received == expected


@pytest.mark.parametrize("fast_path", [True, False])
def test_same_node_fast_path_pairs_the_sockets_and_keeps_bytes_in_order(world, fast_path):
    ns = world.netns["d"]
    assert world.cap.fast_path_problem is None
    listener = listen_in(ns, ("127.0.0.1", 15001))
    accepted: list = []
    enrolled = world.cap.enroll_netns(f"/run/netns/{ns}", 15001, fast_path=fast_path)
    try:
        assert bool(enrolled.config.flags & maps.FLAG_FAST_PATH) is fast_path
        server = echo_once(listener, accepted)
        sock = run_in_netns(f"/run/netns/{ns}", socket.socket)
        with sock:
            sock.settimeout(3)
            sock.connect(DST)
            exchange(sock)
            here = sock.getsockname()[:2]
            paired = {(local, remote) for cookie, local, remote in local_socks(PIN_DIR) if cookie == enrolled.key}
            if fast_path:   # both ends are in the SOCKHASH: sk_msg moved the bytes
                assert paired == {(here, ("127.0.0.1", 15001)), (("127.0.0.1", 15001), here)}
            else:
                assert paired == set()
            assert origdst.so_original_dst(accepted[0]) == DST
        server.join(timeout=5)
        assert not server.is_alive()
    finally:
        world.cap.unenroll_netns(enrolled.key)
        listener.close()
    assert all(cookie != enrolled.key for cookie, _, _ in local_socks(PIN_DIR))   # closed sockets leave


CHILD = r"""
import ctypes, os, socket, sys
cgroup, netns, host, port = sys.argv[1:5]
with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:   # join the cgroup first, then the netns
    fh.write(str(os.getpid()))
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(netns, os.O_RDONLY)
if libc.setns(fd, 0x40000000) != 0:
    sys.exit("setns failed: " + os.strerror(ctypes.get_errno()))
sock = socket.create_connection((host, int(port)), timeout=3)
data = b""
while not data.endswith(b"\n"):
    chunk = sock.recv(256)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


def run_child_in(cgroup: Path, netns: str, addr: tuple[str, int]) -> str:
    done = subprocess.run([sys.executable, "-I", "-c", CHILD, str(cgroup), f"/run/netns/{netns}", addr[0],
                           str(addr[1])], capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_cgroup_mode_captures_processes_of_the_selected_cgroup_only(world):
    enrolled = world.cap.enroll_cgroup(str(world.cg_svc), world.host_port)
    try:
        assert enrolled.key == world.cg_svc.stat().st_ino
        # a process in a sub-cgroup of the enrolled one is captured (deepest enrolled ancestor)
        answer = run_child_in(world.cg_sub, world.netns["c"], DST)
        assert answer.startswith("proxy 10.250.1.2:80 10.250.1.2:80 127.0.0.1:"), answer
        # a process in a sibling cgroup is not
        assert run_child_in(world.cg_other, world.netns["c"], DST) == "server 10.250.1.2:80"
        # nor this test process, in the same netns, outside the cgroup
        assert ask(world.netns["c"], DST) == "server 10.250.1.2:80"
    finally:
        assert world.cap.unenroll_cgroup(str(world.cg_svc)) is True
    assert run_child_in(world.cg_sub, world.netns["c"], DST) == "server 10.250.1.2:80"


RESTART = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from bpf.loader import EbpfCapture, attach_plan
from bpf import sys as bpfsys
pin_dir, peer_ip, peer_port, cookie = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
pins = set()
for d, dirs, files in os.walk(pin_dir):
    pins.update(os.path.join(d, n) for n in dirs + files)
plan = [s.action for s in attach_plan(pin_dir, pins)]
cap = EbpfCapture(pin_dir)
cap.start()
links = {}
for name in sorted(os.listdir(pin_dir + "/links")):
    fd = bpfsys.obj_get(pin_dir + "/links/" + name)
    links[name] = bpfsys.link_info(fd)[1]
    os.close(fd)
print(json.dumps({
    "plan": plan, "timings": cap.timings, "program_ids": cap.program_ids, "links": links,
    "enrollments": [[e.kind, e.key, e.config.proxy_port, list(e.excludes.ports), list(e.excludes.destinations)]
                    for e in cap.enrollments()],
    "orig": cap.original_dst(peer_ip, peer_port, proxy_port=15001, netns_cookie=cookie),
}))
cap.close()
"""


def test_restarted_agent_readopts_pinned_maps_and_links(world):
    # a connection captured before the restart
    sock = run_in_netns(f"/run/netns/{world.netns['a']}", socket.socket)
    with sock:
        sock.settimeout(3)
        sock.connect(DST)
        peer_ip, peer_port = sock.getsockname()
        done = subprocess.run([sys.executable, "-c", RESTART, str(REPO), PIN_DIR, peer_ip, str(peer_port),
                               str(world.enrolled.key)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["plan"] == ["replace"] * 5 + ["attach-map"]
    assert state["enrollments"] == [["netns", world.enrolled.key, 15001, [81], list(EXCLUDES.destinations)]]
    assert state["orig"] == list(DST)
    # the new process's programs now serve the pinned links, and keep working after it exited
    assert state["links"] == {k: v for k, v in state["program_ids"].items() if k != "na_fast_msg"}
    world.program_ids |= set(state["program_ids"].values())
    assert ask(world.netns["a"], DST).startswith("proxy 10.250.1.2:80 10.250.1.2:80")
    assert ask(world.netns["b"], DST) == "server 10.250.1.2:80"
    # re-adopting in this process swaps its (cached, not recompiled) programs back in
    world.cap.start()
    assert world.cap.timings["compile"] == 0.0
    assert ask(world.netns["a"], DST).startswith("proxy 10.250.1.2:80")


def test_other_getsockopt_calls_pass_through_even_with_big_buffers(world, needs_tool):
    # iptables-legacy reads its table with getsockopt into a buffer larger than a page
    restore = needs_tool("iptables-legacy-restore")
    legacy = needs_tool("iptables-legacy")
    rules = "".join(f"-A OUTPUT -p tcp --dport {20000 + i} -j ACCEPT\n" for i in range(80))
    ns = world.netns["b"]
    subprocess.run(["ip", "netns", "exec", ns, restore], input=f"*filter\n{rules}COMMIT\n", text=True,
                   check=True, capture_output=True, timeout=20)
    listed = subprocess.run(["ip", "netns", "exec", ns, legacy, "-w", "-S", "OUTPUT"], text=True, check=True,
                            capture_output=True, timeout=20).stdout
    assert listed.count("-j ACCEPT") == 80
    assert "--dport 20079" in listed


def test_status_command_lists_links_and_enrollments(world):
    done = subprocess.run([sys.executable, "-m", "bpf.loader", "status", "--pin-dir", PIN_DIR], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "links: na_connect4 na_connect6 na_fast_sockops na_getsockopt na_sockops",
        f"netns {world.enrolled.key}: -> 127.0.0.1:15001 fast_path=on exclude ports=[81] "
        f"destinations=['10.250.1.3/32', 'fd00:250::3/128']",
    ]


def attached_ids() -> set[int]:
    fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {pid for t in ATTACH_TYPES for pid in bpfsys.prog_query(fd, t)}
    finally:
        os.close(fd)


def test_cleanup_detaches_and_unpins_everything(world):
    # runs last in this module
    ours = world.program_ids | set(world.cap.program_ids.values())
    linked = {v for k, v in world.cap.program_ids.items() if k != "na_fast_msg"}
    assert linked <= attached_ids()
    world.cap.cleanup()
    assert not os.path.exists(PIN_DIR)
    assert attached_ids().isdisjoint(ours)
    assert ask(world.netns["a"], DST) == "server 10.250.1.2:80"
    # every program of both agent generations is freed (sk_msg went with its SOCKHASH)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(bpfsys.prog_name_and_load_time(p) for p in ours):
        time.sleep(0.05)
    assert [bpfsys.prog_name_and_load_time(p) for p in ours if bpfsys.prog_name_and_load_time(p)] == []
    world.cap.cleanup()     # idempotent
