"""Real capture in pod namespaces: REDIRECT, SO_ORIGINAL_DST, marks, probes, fail-closed, cgroups.

Topology (built per test module): node n1 with pods `client` and `server`,
node n2 with pod `remote`. Listeners are opened INSIDE pod namespaces from
this (host) process, as the agent does.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap

import pytest

from redirect import capture
from redirect.cgroup import cgroup_of
from redirect.netns import connect_marked, open_listener_in_netns, original_dst, run_in_netns
from redirect.plan import CaptureConfig, HostWorkload, host_plan, in_pod_plan
from redirect.topology import Topology
from tests.conftest import REPO, require

TIMEOUT = 3.0


@pytest.fixture(scope="module")
def net():
    require(os.geteuid() == 0, "needs root (network namespaces, nftables/iptables)")
    with Topology() as topo:
        topo.add_node("n1")
        topo.add_node("n2")
        topo.add_pod("n1", "client", "10.250.1.2")
        topo.add_pod("n1", "server", "10.250.1.3")
        topo.add_pod("n2", "remote", "10.250.2.2")
        yield topo


class Listener:
    """A listener in a pod namespace that reports what it accepted (bounded waits)."""

    def __init__(self, netns, port, host="0.0.0.0"):
        self.sock = open_listener_in_netns(netns, host, port)
        self.sock.settimeout(TIMEOUT)

    def accept(self):
        conn, peer = self.sock.accept()
        conn.settimeout(TIMEOUT)
        return conn, peer

    def pending(self, wait=0.2) -> bool:
        return bool(select.select([self.sock], [], [], wait)[0])

    def close(self):
        self.sock.close()


@pytest.fixture
def listeners():
    opened = []

    def open_(netns, port, host="0.0.0.0"):
        listener = Listener(netns, port, host)
        opened.append(listener)
        return listener

    yield open_
    for listener in opened:
        listener.close()


def connect_from(netns, address):
    return run_in_netns(netns, socket.create_connection, address, TIMEOUT)


@pytest.fixture
def rules(net):
    """Apply plans to pods; cleaned up after the test."""
    applied = []

    def apply_(pod, plan, backend="nft"):
        ns = net.netns(pod)
        result = capture.apply(plan, ns, backend)
        applied.append(ns)
        return result

    yield apply_
    for ns in applied:
        capture.cleanup(ns)


def test_outbound_lands_on_15001_with_original_destination(net, rules, listeners):
    client, server = net.pods["client"], net.pods["server"]
    app = listeners(server.netns, 80)
    proxy = listeners(client.netns, 15001)
    rules("client", in_pod_plan())

    conn = connect_from(client.netns, (server.ip, 80))
    accepted, peer = proxy.accept()
    assert original_dst(accepted) == (server.ip, 80)
    assert peer[0] == client.ip
    assert accepted.getsockname() == ("127.0.0.1", 15001)  # REDIRECT of local traffic: to loopback
    conn.sendall(b"ping")
    assert accepted.recv(4) == b"ping"
    assert not app.pending()  # the application never saw it
    conn.close()
    accepted.close()

    # The proxy's own upstream socket (mark 0x539) reaches the real server.
    upstream = connect_marked((server.ip, 80), netns=client.netns, timeout=TIMEOUT)
    real, real_peer = app.accept()
    assert real_peer[0] == client.ip
    assert not proxy.pending()
    upstream.close()
    real.close()


def test_cross_node_capture_and_exclusions(net, rules, listeners):
    client, remote = net.pods["client"], net.pods["remote"]
    app = listeners(remote.netns, 80)
    db = listeners(remote.netns, 5432)
    proxy = listeners(client.netns, 15001)
    rules("client", in_pod_plan(CaptureConfig(exclude_outbound_ports=(5432,))))

    conn = connect_from(client.netns, (remote.ip, 80))
    accepted, _ = proxy.accept()
    assert original_dst(accepted) == (remote.ip, 80)
    conn.close(), accepted.close()

    conn = connect_from(client.netns, (remote.ip, 5432))  # excluded port: straight through
    direct, peer = db.accept()
    assert peer[0] == client.ip and not proxy.pending()
    conn.close(), direct.close()

    rules("client", in_pod_plan(CaptureConfig(exclude_cidrs=("10.250.2.0/24",))))
    conn = connect_from(client.netns, (remote.ip, 80))  # excluded CIDR: straight through
    direct, peer = app.accept()
    assert peer[0] == client.ip and not proxy.pending()
    conn.close(), direct.close()


def test_fail_closed_when_no_proxy_listens(net, rules, listeners):
    client, server = net.pods["client"], net.pods["server"]
    app = listeners(server.netns, 80)
    rules("client", in_pod_plan())
    # The agent is down: nothing listens on 15001, the rules stay. The connect
    # is refused (RST from the pod's own stack) instead of bypassing the mesh.
    with pytest.raises(ConnectionRefusedError):
        connect_from(client.netns, (server.ip, 80))
    assert not app.pending()
    assert capture.verify(in_pod_plan(), client.netns) == ()
    # The moment the proxy listens again, capture resumes with no rule change.
    proxy = listeners(client.netns, 15001)
    conn = connect_from(client.netns, (server.ip, 80))
    accepted, _ = proxy.accept()
    assert original_dst(accepted) == (server.ip, 80)
    conn.close(), accepted.close()


@pytest.mark.parametrize("backend", ["nft", "iptables-nft", "iptables-legacy"])
def test_inbound_capture_tunnel_and_probes(net, rules, listeners, backend):
    client, server = net.pods["client"], net.pods["server"]
    node = net.nodes["n1"]
    app = listeners(server.netns, 8080)
    inbound = listeners(server.netns, 15006)
    tunnel = listeners(server.netns, 15008)
    metrics = listeners(server.netns, 9000)
    rules("server", in_pod_plan(CaptureConfig(node_probe_sources=(node.gateway,),
                                              exclude_inbound_ports=(9000,))), backend)

    conn = connect_from(client.netns, (server.ip, 8080))
    accepted, peer = inbound.accept()
    assert original_dst(accepted) == (server.ip, 8080) and peer[0] == client.ip
    conn.close(), accepted.close()

    conn = connect_from(client.netns, (server.ip, 15008))  # the tunnel port is not redirected
    accepted, _ = tunnel.accept()
    assert accepted.getsockname() == (server.ip, 15008) and not inbound.pending(0.05)
    conn.close(), accepted.close()

    conn = connect_from(client.netns, (server.ip, 9000))  # excluded inbound port
    accepted, _ = metrics.accept()
    conn.close(), accepted.close()

    # A kubelet-style probe from the node (source = node's address on the veth).
    conn = connect_from(node.netns, (server.ip, 8080))
    accepted, peer = app.accept()
    assert peer[0] == node.gateway and not inbound.pending(0.05)
    conn.close(), accepted.close()


CHILD = textwrap.dedent("""
    import socket, sys
    sys.path.insert(0, sys.argv[1])
    cgroup_procs, netns, ip, port = sys.argv[2:6]
    if cgroup_procs != "-":
        with open(cgroup_procs, "w") as f:  # join the cgroup BEFORE the socket exists
            f.write("0")
    from redirect.netns import entered
    with entered(netns):
        s = socket.create_connection((ip, int(port)), 3)
    s.sendall(b"hello")
    print(s.recv(16).decode(), flush=True)
""")


def accept_from_child(listener, child):
    try:
        return listener.accept()
    except TimeoutError:
        child.kill()
        _, err = child.communicate(timeout=TIMEOUT)
        pytest.fail(f"nothing arrived from the child process; its stderr: {err}")


def run_child(cgroup_procs, netns, ip, port):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), cgroup_procs, netns, ip, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("backend", ["nft", "iptables-nft"])
def test_host_mode_cgroup_capture(net, rules, listeners, cgroup_dir, backend):
    mount, cgroup = cgroup_dir
    host, remote = net.pods["client"], net.pods["remote"]  # the client pod plays a host here
    app = listeners(remote.netns, 80)
    workload_listener = listeners(host.netns, 15101)
    # A long (namespace-qualified) name: rule comments must still fit nft's 128 characters.
    plan = host_plan([HostWorkload("team-" + "w" * 120 + ".web", cgroup, 15101)], cgroup2_mount=mount)
    rules("client", plan, backend)

    inside = run_child(f"{mount}/{cgroup}/cgroup.procs", host.netns, remote.ip, 80)
    try:
        accepted, _ = accept_from_child(workload_listener, inside)
        assert cgroup_of(inside.pid) == cgroup
        assert original_dst(accepted) == (remote.ip, 80)
        assert accepted.recv(5) == b"hello"
        accepted.sendall(b"via-proxy")
        out, err = inside.communicate(timeout=TIMEOUT)
        assert out.strip() == "via-proxy", err
        accepted.close()
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait(TIMEOUT)

    outside = run_child("-", host.netns, remote.ip, 80)  # same namespace, other cgroup
    try:
        accepted, peer = accept_from_child(app, outside)
        assert peer[0] == host.ip and accepted.recv(5) == b"hello"
        accepted.sendall(b"direct")
        out, err = outside.communicate(timeout=TIMEOUT)
        assert out.strip() == "direct", err
        assert not workload_listener.pending(0.05)
        accepted.close()
    finally:
        if outside.poll() is None:
            outside.kill()
            outside.wait(TIMEOUT)


def test_ipv6_capture_and_original_dst(fresh_netns, listeners):
    ns = fresh_netns
    subprocess.run(["ip", "-n", ns, "-batch", "-"], check=True, timeout=5, text=True, input=(
        "link add v6a type veth peer name v6b\nlink set v6a up\nlink set v6b up\n"
        "addr add fd00:250::1/64 dev v6a nodad\n"))
    proxy = listeners(ns, 15001, host="::")
    capture.apply(in_pod_plan(), ns)
    try:
        conn = connect_from(ns, ("fd00:250::99", 80))
        accepted, _ = proxy.accept()
        assert original_dst(accepted) == ("fd00:250::99", 80)
        conn.close(), accepted.close()
    finally:
        capture.cleanup(ns)
