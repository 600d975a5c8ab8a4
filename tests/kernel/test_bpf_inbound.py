"""eBPF inbound capture on the real kernel: sk_lookup steers TCP arriving at a pod to its 15006 listener.

A "pod" namespace and a "client" namespace joined by a veth (10.250.3.0/24,
fd00:253::/64). In the pod: the application listens on 10.250.3.2:8080 and
:9090 (an excluded port) and [fd00:253::2]:8080, the tunnel on :15008, the
proxy on 0.0.0.0:15006 and [::]:15006. Every listener answers with one line
naming itself, and the proxy also says what SO_ORIGINAL_DST, getsockname()
and the map read give, so each answer shows which socket took the
connection and what the proxy would recover. One loader (one compile) serves
the module, with a pin directory of its own.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from bpf import origdst
from bpf import sys as bpfsys
from bpf.inbound import InboundConfig, listeners_in_process, patch_netns, INBOUND_MAGIC, magic_offsets
from bpf.loader import EbpfCapture
from bpf.netns import netns_cookie, run_in_netns
from tests.conftest import REPO, require
from tests.kernel.responder import Responder, fmt, ip

TAG = secrets.token_hex(3)
PIN_DIR = f"/sys/fs/bpf/nodeagent-test-in-{TAG}"
POD_IP, POD_IP6, CLIENT_IP, PROBE_IP = "10.250.3.2", "fd00:253::2", "10.250.3.3", "10.250.3.9"
CONFIG = InboundConfig(exclude_ports=(9090,), probe_sources=(f"{PROBE_IP}/32",))


def proxy_reply(conn: socket.socket) -> str:
    return (f"proxy {fmt(origdst.so_original_dst(conn))} {fmt(conn.getsockname()[:2])} "
            f"{fmt(origdst.original_dst_for_socket(conn, pin_dir=PIN_DIR))}")


def listen_in(netns: str, addr: tuple[str, int]) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in addr[0]:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(64)
        return sock
    return run_in_netns(f"/run/netns/{netns}", make)


def ask(netns: str, addr: tuple[str, int], source: str | None = None, timeout: float = 3.0) -> str:
    """Connect from inside ``netns`` (optionally from ``source``) and return the one-line answer."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family)
        if source:
            sock.bind((source, 0))
        return sock
    sock = run_in_netns(f"/run/netns/{netns}", make)
    with sock:
        sock.settimeout(timeout)
        sock.connect(addr)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def sk_lookup_programs(netns: str) -> list[int]:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        return bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
    finally:
        os.close(fd)


class World:
    def __init__(self):
        self.pod, self.client = f"nainp{TAG}", f"nainc{TAG}"
        self.responders: list[Responder] = []
        self.proxy: list[Responder] = []
        self.cap: EbpfCapture | None = None
        self.program_ids: set[int] = set()

    def build(self) -> None:
        for ns in (self.pod, self.client):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.client)
        for ns, addrs in ((self.pod, (f"{POD_IP}/24", f"{POD_IP6}/64")),
                          (self.client, (f"{CLIENT_IP}/24", f"{PROBE_IP}/24", "fd00:253::3/64"))):
            for addr in addrs:
                ip("-n", ns, "addr", "add", addr, "dev", "eth0", *(["nodad"] if ":" in addr else []))
            ip("-n", ns, "link", "set", "eth0", "up")
        for addr, name in (((POD_IP, 8080), "app"), ((POD_IP, 9090), "app"), ((POD_IP6, 8080), "app"),
                           (("0.0.0.0", 15008), "tunnel")):
            self.responders.append(Responder(listen_in(self.pod, addr), lambda c, n=name: f"{n} {fmt(c.getsockname()[:2])}"))
        self.open_proxy()

    def open_proxy(self) -> None:
        self.proxy = [Responder(listen_in(self.pod, addr), proxy_reply) for addr in (("0.0.0.0", 15006), ("::", 15006))]

    def close_proxy(self) -> None:
        for r in self.proxy:
            r.close()
        self.proxy = []

    def teardown(self) -> None:
        if self.cap is not None:
            self.cap.cleanup()
        for r in self.responders + self.proxy:
            r.close()
        for ns in (self.pod, self.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=5)


@pytest.fixture(scope="module")
def world():
    require(os.geteuid() == 0, "needs root (network namespaces, eBPF)")
    w = World()
    try:
        w.build()
        w.cap = EbpfCapture(PIN_DIR)
        w.cap.start()
        assert w.cap.inbound_problem is None, w.cap.inbound_problem
        # the agent's way: the listeners are found among this process's sockets
        w.enrolled = w.cap.enroll_inbound(f"/run/netns/{w.pod}", config=CONFIG)
        w.program_ids |= set(sk_lookup_programs(w.pod))
        yield w
    finally:
        w.teardown()


def wait_for_answer(netns: str, addr: tuple[str, int], want_prefix: str, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            answer = ask(netns, addr, timeout=1.0)
        except OSError as exc:
            answer = f"{exc!r}"
        if answer.startswith(want_prefix) or time.monotonic() > deadline:
            return answer


def test_app_port_lands_on_the_inbound_listener_with_the_original_destination(world):
    answer = ask(world.client, (POD_IP, 8080))
    # SO_ORIGINAL_DST (getsockopt hook), getsockname (TPROXY-style) and the map read all agree
    assert answer == f"proxy {POD_IP}:8080 {POD_IP}:8080 {POD_IP}:8080", answer
    assert world.enrolled.listeners == (socket.AF_INET, socket.AF_INET6)
    assert world.enrolled.key == netns_cookie(f"/run/netns/{world.pod}")


def test_port_without_an_application_listener_is_captured_too(world):
    # as with REDIRECT, any port is captured; the proxy decides what to do with it
    assert ask(world.client, (POD_IP, 7000)) == f"proxy {POD_IP}:7000 {POD_IP}:7000 {POD_IP}:7000"


def test_ipv6_lands_on_the_ipv6_inbound_listener(world):
    answer = ask(world.client, (POD_IP6, 8080))
    assert answer == f"proxy {POD_IP6}:8080 {POD_IP6}:8080 {POD_IP6}:8080", answer


def test_tunnel_port_is_accepted_directly(world):
    assert ask(world.client, (POD_IP, 15008)) == f"tunnel {POD_IP}:15008"


def test_excluded_inbound_port_reaches_the_application(world):
    assert ask(world.client, (POD_IP, 9090)) == f"app {POD_IP}:9090"


def test_node_probe_source_reaches_the_application(world):
    assert ask(world.client, (POD_IP, 8080), source=PROBE_IP) == f"app {POD_IP}:8080"
    assert ask(world.client, (POD_IP, 8080), source=CLIENT_IP).startswith("proxy ")


def test_loopback_inside_the_pod_is_not_captured(world):
    # the pod talking to itself, and the proxy's own connection to the application
    assert ask(world.pod, (POD_IP, 8080)) == f"app {POD_IP}:8080"


def test_without_a_listener_new_connections_fail_closed_and_recover(world):
    world.close_proxy()
    try:
        with pytest.raises(ConnectionRefusedError):   # reset, as REDIRECT to a closed port: never a bypass
            ask(world.client, (POD_IP, 8080), timeout=0.5)
        assert world.cap.inbound_enrollments()[0].listeners == ()   # closed sockets leave the map
    finally:
        world.open_proxy()
    world.cap.enroll_inbound(f"/run/netns/{world.pod}", config=CONFIG)
    assert wait_for_answer(world.client, (POD_IP, 8080), "proxy ").startswith(f"proxy {POD_IP}:8080")


def test_enrollments_read_back_from_the_maps(world):
    [found] = world.cap.inbound_enrollments()
    assert found.key == world.enrolled.key
    assert found.config == CONFIG
    assert found.listeners == (socket.AF_INET, socket.AF_INET6)
    assert os.path.exists(found.link_pin)


def test_reenrolling_keeps_live_listeners_without_scanning_the_process(world, monkeypatch):
    import bpf.inbound

    def no_scan(*args):
        raise AssertionError("scanned the process although the listeners are registered")
    monkeypatch.setattr(bpf.inbound, "listeners_in_process", no_scan)
    again = world.cap.enroll_inbound(f"/run/netns/{world.pod}", config=CONFIG)
    assert again.listeners == (socket.AF_INET, socket.AF_INET6) and again.link_pin == world.enrolled.link_pin
    assert ask(world.client, (POD_IP, 8080)).startswith(f"proxy {POD_IP}:8080")


def test_listeners_in_process_finds_only_that_namespace_and_port(world):
    found = listeners_in_process(world.enrolled.key)
    try:
        assert sorted(s.family for s in found) == [socket.AF_INET, socket.AF_INET6]
        assert all(s.getsockname()[1] == 15006 for s in found)
    finally:
        for s in found:
            s.close()
    assert listeners_in_process(netns_cookie(f"/run/netns/{world.client}")) == []


def test_placeholder_patching_is_exact():
    code = bytes([0x18, 0x01, 0, 0]) + (INBOUND_MAGIC & 0xFFFFFFFF).to_bytes(4, "little") + bytes(4) + \
        (INBOUND_MAGIC >> 32).to_bytes(4, "little") + bytes([0x95]) + bytes(7)
    assert magic_offsets(code) == [0]
    patched = patch_netns(code, 0x1122334455667788)
    assert patched[4:8] == bytes.fromhex("88776655") and patched[12:16] == bytes.fromhex("44332211")
    assert magic_offsets(patched) == []
    with pytest.raises(ValueError, match="found 0"):
        patch_netns(patched, 1)


def test_inbound_key_codecs_round_trip():
    from bpf import maps

    cookie = 0x1122334455667788
    assert maps.decode_listen_key(maps.encode_listen_key(cookie, socket.AF_INET6)) == (cookie, socket.AF_INET6)
    assert maps.decode_in_port_key(maps.encode_in_port_key(cookie, 15008)) == (cookie, 15008)
    assert maps.decode_in_src_key(maps.encode_in_src_key(cookie, "10.250.3.9")) == (cookie, "10.250.3.9/32")
    assert maps.decode_in_src_key(maps.encode_in_src_key(cookie, "fd00::/8")) == (cookie, "fd00::/8")
    # the LPM prefix always covers the whole 64-bit cookie, then the (v4-mapped) address bits
    assert int.from_bytes(maps.encode_in_src_key(cookie, "10.0.0.0/8")[:4], "little") == 64 + 96 + 8
    assert (maps.LISTEN_KEY_SIZE, maps.IN_PORT_KEY_SIZE, maps.IN_SRC_KEY_SIZE) == (16, 16, 28)
    config = InboundConfig(exclude_ports=(9090,), probe_sources=("10.250.3.9/32",))
    assert set(config.port_entries(cookie).values()) == {bytes([maps.IN_PORT_EXCLUDED]), bytes([maps.IN_PORT_TUNNEL])}


def test_bad_config_changes_nothing(world):
    before = world.cap.inbound_enrollments()
    with pytest.raises(ValueError, match="inbound port"):
        world.cap.enroll_inbound(f"/run/netns/{world.pod}", config=InboundConfig(exclude_ports=(0,)))
    with pytest.raises(ValueError, match="probe source"):
        world.cap.enroll_inbound(f"/run/netns/{world.pod}", config=InboundConfig(probe_sources=("10.0.0.300",)))
    assert world.cap.inbound_enrollments() == before


def test_readopting_removes_the_link_of_a_namespace_that_is_gone(world):
    gone = f"naing{TAG}"
    ip("netns", "add", gone)
    try:
        listener = listen_in(gone, ("0.0.0.0", 15006))
        enrolled = world.cap.enroll_inbound(f"/run/netns/{gone}", [listener])
        world.program_ids |= set(sk_lookup_programs(gone))
        listener.close()
    finally:
        subprocess.run(["ip", "netns", "del", gone], capture_output=True, timeout=5)
    assert os.path.exists(enrolled.link_pin)
    deadline = time.monotonic() + 5   # the kernel dismantles a namespace asynchronously
    while os.path.exists(enrolled.link_pin) and time.monotonic() < deadline:
        world.cap.start()   # re-adoption (no recompile in this process)
        time.sleep(0.05)
    assert not os.path.exists(enrolled.link_pin)
    assert [i.key for i in world.cap.inbound_enrollments()] == [world.enrolled.key]
    assert ask(world.client, (POD_IP, 8080)).startswith(f"proxy {POD_IP}:8080")


RESTART = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from bpf.loader import EbpfCapture
from bpf import sys as bpfsys
pin_dir, link = sys.argv[2], sys.argv[3]
cap = EbpfCapture(pin_dir)
cap.start()
fd = bpfsys.obj_get(link)
info = bpfsys.netns_link_info(fd)
os.close(fd)
print(json.dumps({"prog": info[1], "inbound": [[i.key, list(i.config.exclude_ports), list(i.listeners)]
                                               for i in cap.inbound_enrollments()]}))
cap.close()
"""


def test_restarted_agent_swaps_a_new_program_into_the_pinned_netns_link(world):
    before = sk_lookup_programs(world.pod)
    done = subprocess.run([sys.executable, "-c", RESTART, str(REPO), PIN_DIR, world.enrolled.link_pin],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["inbound"] == [[world.enrolled.key, [9090], [socket.AF_INET, socket.AF_INET6]]]
    assert sk_lookup_programs(world.pod) == [state["prog"]] and [state["prog"]] != before
    world.program_ids.add(state["prog"])
    # the new program serves after that process exited; our listeners are still registered
    assert ask(world.client, (POD_IP, 8080)).startswith(f"proxy {POD_IP}:8080")
    assert ask(world.client, (POD_IP, 9090)) == f"app {POD_IP}:9090"


def test_status_command_lists_inbound(world):
    done = subprocess.run([sys.executable, "-m", "bpf.loader", "status", "--pin-dir", PIN_DIR], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (f"inbound netns {world.enrolled.key}: -> listeners=ipv4,ipv6 tunnel=15008 exclude ports=[9090] "
            f"probe sources=['{PROBE_IP}/32']") in done.stdout.splitlines()
    assert f"na_inbound_{world.enrolled.key}" in done.stdout.splitlines()[0]


def test_unenroll_then_cleanup_leave_nothing(world):
    # runs last in this module
    assert world.cap.unenroll_inbound(f"/run/netns/{world.pod}") is True
    assert sk_lookup_programs(world.pod) == []
    assert ask(world.client, (POD_IP, 8080)) == f"app {POD_IP}:8080"
    assert world.cap.inbound_enrollments() == []
    assert world.cap.unenroll_inbound(world.enrolled.key) is False
    # enrolled again (with outbound too), then everything removed by cleanup
    world.cap.enroll_netns(f"/run/netns/{world.pod}", 15001)
    world.cap.enroll_inbound(f"/run/netns/{world.pod}", config=CONFIG)
    world.program_ids |= set(sk_lookup_programs(world.pod))
    assert ask(world.client, (POD_IP, 8080)).startswith("proxy ")
    world.cap.cleanup()
    assert not os.path.exists(PIN_DIR)
    assert sk_lookup_programs(world.pod) == []
    assert ask(world.client, (POD_IP, 8080)) == f"app {POD_IP}:8080"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(bpfsys.prog_name_and_load_time(p) for p in world.program_ids):
        time.sleep(0.05)
    assert [p for p in world.program_ids if bpfsys.prog_name_and_load_time(p)] == []
