"""The agent's eBPF backend (nodeagent/agent/ebpf.py) enrolls a pod in both directions.

The test process plays the agent's data plane: it opens the pod's 15001 and
15006 listeners inside the pod namespace, then ``EbpfBackend.apply`` enrolls
the pod, finding the 15006 listeners among this process's sockets (as in the
agent, where the data plane opens them just before). Also: ``--capture
auto``'s eBPF attempt falls back with one line when eBPF cannot work.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess

import pytest

from bpf import origdst
from nodeagent.agent.capture import CaptureError
from nodeagent.agent.workload import WorkloadSpec
from tests.conftest import require
from tests.kernel.test_bpf_inbound import Responder, ask, fmt, ip, listen_in, sk_lookup_programs

TAG = secrets.token_hex(3)
PIN_DIR = f"/sys/fs/bpf/nodeagent-test-inag-{TAG}"
POD_IP, CLIENT_IP, OTHER_IP = "10.250.4.2", "10.250.4.3", "10.250.4.4"


@pytest.fixture(scope="module")
def pods():
    require(os.geteuid() == 0, "needs root (network namespaces, eBPF)")
    from bpf.loader import unavailable_reason
    require(unavailable_reason() is None, f"eBPF capture unavailable: {unavailable_reason()}")
    names = {"pod": f"naiap{TAG}", "client": f"naiac{TAG}", "bare": f"naiab{TAG}"}
    responders: list[Responder] = []
    try:
        for ns in names.values():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", names["pod"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", names["client"])
        ip("-n", names["pod"], "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", names["bare"])
        for ns, dev, addr in ((names["pod"], "eth0", f"{POD_IP}/24"), (names["client"], "eth0", f"{CLIENT_IP}/24"),
                              (names["pod"], "eth1", "10.250.5.2/24"), (names["bare"], "eth0", "10.250.5.3/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        responders.append(Responder(listen_in(names["pod"], (POD_IP, 8080)), lambda c: f"app {fmt(c.getsockname())}"))
        for port in (15001, 15006):
            responders.append(Responder(listen_in(names["pod"], ("0.0.0.0", port)),
                                        lambda c, p=port: f"proxy:{p} {fmt(origdst.so_original_dst(c))}"))
        yield names
    finally:
        for r in responders:
            r.close()
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=5)


def spec(netns: str) -> WorkloadSpec:
    return WorkloadSpec(kind="netns", target=netns, name="web", namespace="shop", service_account="web")


def test_backend_captures_a_pod_in_both_directions_and_removes_it(pods):
    from nodeagent.agent.ebpf import EbpfBackend

    backend = EbpfBackend(PIN_DIR)
    backend.start()
    try:
        assert backend.loader.inbound_problem is None
        backend.apply(spec(pods["pod"]))
        backend.apply(spec(pods["pod"]))   # idempotent
        # inbound: lands on the pod's 15006 with the original destination
        assert ask(pods["client"], (POD_IP, 8080)) == f"proxy:15006 {POD_IP}:8080"
        # outbound from the pod: its 15001
        assert ask(pods["pod"], ("10.250.5.3", 80)) == "proxy:15001 10.250.5.3:80"
        [enrolled] = backend.loader.inbound_enrollments()
        assert enrolled.config.tunnel_port == 15008 and enrolled.listeners == (socket.AF_INET,)
        backend.remove(spec(pods["pod"]))
        assert sk_lookup_programs(pods["pod"]) == []
        assert ask(pods["client"], (POD_IP, 8080)) == f"app {POD_IP}:8080"
        backend.apply(spec(pods["pod"]))
        assert sk_lookup_programs(pods["pod"]) != []
    finally:
        backend.uninstall()
    assert not os.path.exists(PIN_DIR)
    assert sk_lookup_programs(pods["pod"]) == []
    assert ask(pods["client"], (POD_IP, 8080)) == f"app {POD_IP}:8080"


def test_pod_without_an_inbound_listener_is_a_clear_error(pods):
    from nodeagent.agent.ebpf import EbpfBackend

    backend = EbpfBackend(PIN_DIR)
    backend.start()
    try:
        with pytest.raises(CaptureError, match=r"shop/web \(netns .*\): bpf: no inbound listener on port 15006"):
            backend.apply(spec(pods["bare"]))
        assert sk_lookup_programs(pods["bare"]) == []
    finally:
        backend.uninstall()
    assert not os.path.exists(PIN_DIR)


def test_auto_falls_back_to_nftables_with_one_line(pods, caplog):
    from bpf import sys as bpfsys
    from nodeagent.agent.ebpf import auto_backend

    # state left by "another version": a pinned netns map with other key/value sizes
    pin_dir = f"{PIN_DIR}-old"
    os.makedirs(f"{pin_dir}/maps")
    try:
        fd = _create_hash_map(4, 4)
        bpfsys.obj_pin(fd, f"{pin_dir}/maps/netns")
        os.close(fd)
        with caplog.at_level(logging.INFO):
            assert auto_backend(pin_dir) is None
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1, lines
        assert lines[0].startswith("capture: eBPF unavailable, using nftables: "), lines[0]
        assert pin_dir in lines[0]
        assert sorted(os.listdir(f"{pin_dir}/maps")) == ["netns"]   # the failed start removed what it made
    finally:
        for name in os.listdir(f"{pin_dir}/maps"):
            os.unlink(f"{pin_dir}/maps/{name}")
        os.rmdir(f"{pin_dir}/maps")
        os.rmdir(pin_dir)


def _create_hash_map(key_size: int, value_size: int) -> int:
    import ctypes

    from bpf import sys as bpfsys

    attr = bpfsys._Attr()
    base = ctypes.addressof(attr)
    for offset, value in ((0, 1), (4, key_size), (8, value_size), (12, 4)):   # BPF_MAP_TYPE_HASH, 4 entries
        ctypes.c_uint32.from_address(base + offset).value = value
    fd = bpfsys._libc.syscall(bpfsys._SYS_BPF, 0, ctypes.byref(attr), ctypes.sizeof(attr))   # BPF_MAP_CREATE
    assert fd >= 0, os.strerror(ctypes.get_errno())
    return fd
