"""The namespace topology builder and the setns helpers, on the real kernel."""
from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from redirect.netns import (NetnsError, entered, netns_path, open_listener_in_netns, run_command,
                            run_in_netns)
from redirect.topology import Topology

TIMEOUT = 3.0


def host_netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=5).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=5).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def tcp_roundtrip(topo: Topology, src: str, dst: str, port: int) -> tuple[str, int]:
    listener = open_listener_in_netns(topo.netns(dst), "0.0.0.0", port)
    listener.settimeout(TIMEOUT)
    try:
        conn = run_in_netns(topo.netns(src), socket.create_connection, (topo.pods[dst].ip, port), TIMEOUT)
        accepted, peer = listener.accept()
        conn.sendall(b"x")
        accepted.settimeout(TIMEOUT)
        assert accepted.recv(1) == b"x"
        conn.close()
        accepted.close()
        return peer
    finally:
        listener.close()


def test_two_nodes_two_pods_each_talk_and_tear_down_cleanly(needs_root):
    links_before = host_links()
    topo = Topology()
    with topo:
        topo.add_node("n1")
        topo.add_node("n2")
        for node, pods in (("n1", ("a", "b")), ("n2", ("c", "d"))):
            for pod in pods:
                topo.add_pod(node, pod)
        pods = list(topo.pods.values())
        assert {p.ip for p in topo.pods.values()} == {"10.250.1.2", "10.250.1.3", "10.250.2.2", "10.250.2.3"}
        names = set(topo.namespaces)
        assert names <= host_netns_names() and len(names) == 6
        # Across nodes both ways, and within a node (through the node's netfilter).
        for src, dst in (("a", "c"), ("d", "b"), ("a", "b"), ("c", "d")):
            peer = tcp_roundtrip(topo, src, dst, 7000)
            assert peer[0] == topo.pods[src].ip  # routed, not NATed
        route = topo.exec("a", ["ip", "route", "get", topo.pods["c"].ip]).stdout
        assert "via 10.250.1.1" in route
        assert not ({p.host_veth for p in pods} | {"nl1", "nl2"}) & (host_links() - links_before)
        # Spawned processes die with the topology.
        sleeper = topo.spawn("n1", ["sleep", "30"])
    assert sleeper.poll() is not None
    assert not names & host_netns_names()
    # No veth ever appeared in (or leaked to) the host namespace. Only our own
    # names are compared: others may add links to the shared host meanwhile.
    ours = {p.host_veth for p in pods} | {"nl1", "nl2", "eth0"}
    assert not ours & (host_links() - links_before)
    topo.teardown()  # idempotent


def test_failed_build_tears_down_and_bad_input_is_refused(needs_root):
    topo = Topology()
    with topo:
        topo.add_node("n1")
        with pytest.raises(NetnsError, match=r"must be a free host address in node n1's 10.250.1.0/24"):
            topo.add_pod("n1", "p", "10.250.9.9")
        with pytest.raises(NetnsError, match="no node 'nx'"):
            topo.add_pod("nx", "p")
        made = set(topo.namespaces)
        # A failing command during a build tears everything down.
        topo.add_pod("n1", "p1")
        topo.nodes["n1"].gateway = "not-an-address"
        with pytest.raises(NetnsError, match="failed"):
            topo.add_pod("n1", "p2")
        assert topo.namespaces == () and not made & host_netns_names()


def test_exec_is_bounded_by_timeout(needs_root):
    with Topology(timeout=0.5) as topo:
        topo.add_node("n1")
        with pytest.raises(NetnsError, match="took longer than 0.5 s"):
            topo.exec("n1", ["sleep", "5"])


def _netns_id(path: str) -> int:
    return os.stat(path).st_ino


def test_run_in_netns_by_name_path_and_pid_then_comes_back(fresh_netns):
    me = _netns_id(f"/proc/self/task/{threading.get_native_id()}/ns/net")
    target = _netns_id(netns_path(fresh_netns))
    inside = lambda: _netns_id(f"/proc/self/task/{threading.get_native_id()}/ns/net")  # noqa: E731
    assert run_in_netns(fresh_netns, inside) == target
    assert run_in_netns(netns_path(fresh_netns), inside) == target
    holder = subprocess.Popen(["nsenter", f"--net={netns_path(fresh_netns)}", "--", "sleep", "10"])
    try:
        deadline = 50
        while _netns_id(f"/proc/{holder.pid}/ns/net") != target and deadline:
            deadline -= 1
            threading.Event().wait(0.02)
        assert run_in_netns(holder.pid, inside) == target
    finally:
        holder.kill()
        holder.wait(TIMEOUT)
    assert _netns_id(f"/proc/self/task/{threading.get_native_id()}/ns/net") == me
    with entered(fresh_netns):  # the thread-level switch, and back
        assert inside() == target
    assert inside() == me
    with pytest.raises(ZeroDivisionError):
        run_in_netns(fresh_netns, lambda: 1 / 0)
    assert run_command(fresh_netns, ["ip", "-o", "link"]).stdout.count(":") >= 2  # only lo


def test_listener_in_netns_serves_after_switching_back(fresh_netns):
    listener = open_listener_in_netns(fresh_netns, "127.0.0.1", 0, reuse_port=True, mark=0x539)
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    try:
        # Not reachable from the host namespace: it lives in the pod's.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        conn = run_in_netns(fresh_netns, socket.create_connection, ("127.0.0.1", port), TIMEOUT)
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.SOL_SOCKET, 36) == 0x539  # SO_MARK inherited
        conn.close(), accepted.close()
    finally:
        listener.close()


def test_netns_errors_are_actionable():
    with pytest.raises(NetnsError, match=r"'nak-none' not found \(/var/run/netns/nak-none does not exist\)"):
        run_in_netns("nak-none", lambda: None)
    with pytest.raises(NetnsError, match="literal IP address"):
        open_listener_in_netns(None, "localhost", 0)
