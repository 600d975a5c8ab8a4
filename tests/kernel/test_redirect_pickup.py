"""Connections conntrack lost and picks up again mid-stream (root): the proxy's own sockets
keep working, applications stay captured.

After ``conntrack -F`` (or a switch from eBPF capture, or an expired entry) the next packet of
an established flow is a "new" connection to the nat chains. If it is the peer's packet to one
of the proxy's marked sockets, the catch-all would redirect it to 15006 and reset the proxy's
connection; ``in-skip-proxy-socket`` leaves it alone. What it must never do: let an
application's traffic past capture (a SYN to an application, even to a listener carrying the
proxy's mark, and any packet for an unmarked application socket are still redirected).

Topology: node n1 with pods `client` and `app`, node n2 with pod `peer`.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess

import pytest

from redirect import capture
from redirect.netns import connect_marked, netns_command, open_listener_in_netns, run_in_netns
from redirect.plan import PROXY_MARK, CapturePlan, CaptureConfig, in_pod_plan
from redirect.topology import Topology
from tests.conftest import require

TIMEOUT = 3.0
BACKENDS = ["nft", "iptables-nft", "iptables-legacy"]
APP_PORT = 8080


@pytest.fixture(scope="module")
def net():
    require(os.geteuid() == 0, "needs root (network namespaces, nftables/iptables)")
    with Topology() as topo:
        topo.add_node("n1")
        topo.add_node("n2")
        topo.add_pod("n1", "client", "10.250.1.2")
        topo.add_pod("n1", "app", "10.250.1.3")
        topo.add_pod("n2", "peer", "10.250.2.2")
        yield topo


@pytest.fixture
def sockets():
    opened: list[socket.socket] = []

    def keep(sock: socket.socket) -> socket.socket:
        sock.settimeout(TIMEOUT)
        opened.append(sock)
        return sock

    yield keep
    for sock in opened:
        sock.close()


@pytest.fixture
def captured(net, needs_tool):
    """Apply a plan (by backend) in a pod; removed afterwards."""
    needs_tool("conntrack")
    pods = []

    def apply(pod: str, backend: str, plan: CapturePlan | None = None):
        capture.apply(plan or in_pod_plan(CaptureConfig()), net.netns(pod), backend)
        pods.append(pod)

    yield apply
    for pod in pods:
        capture.cleanup(net.netns(pod))


def flush_conntrack(net, pod: str) -> None:
    subprocess.run(netns_command(net.netns(pod), ["conntrack", "-F"]), check=True, capture_output=True,
                   timeout=TIMEOUT)


def readable(sock: socket.socket, wait: float = 0.3) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def proxy_connection_after_flush(net, sockets) -> tuple[bytes, bool]:
    """The proxy's marked socket in `client` talks to `peer`:15008; conntrack in `client` is
    flushed; the peer speaks first. Returns what the proxy's socket then reads (b"": nothing)
    and whether the peer's side was reset."""
    server = sockets(open_listener_in_netns(net.netns("peer"), "0.0.0.0", 15008))
    # the proxy's inbound listener, marked as the agent's are: a redirected packet lands here
    sockets(open_listener_in_netns(net.netns("client"), "0.0.0.0", 15006, mark=PROXY_MARK))
    proxy = sockets(connect_marked((net.pods["peer"].ip, 15008), netns=net.netns("client")))
    remote, _ = server.accept()
    sockets(remote)
    proxy.sendall(b"ping")
    assert remote.recv(4) == b"ping"
    remote.sendall(b"pong")
    assert proxy.recv(4) == b"pong"
    flush_conntrack(net, "client")
    remote.sendall(b"after")
    got = proxy.recv(5) if readable(proxy, TIMEOUT) else b""
    remote.settimeout(0.3)
    try:
        reset = remote.recv(1) == b""
    except ConnectionResetError:
        reset = True
    except TimeoutError:
        reset = False
    return got, reset


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxys_connection_survives_a_conntrack_flush_when_the_peer_speaks_first(net, captured, sockets, backend):
    captured("client", backend)
    assert proxy_connection_after_flush(net, sockets) == (b"after", False)


def test_without_the_rule_the_pickup_is_redirected_and_resets_the_proxy(net, captured, sockets):
    """The failure the rule prevents (so the test above can fail)."""
    full = in_pod_plan(CaptureConfig())
    plan = CapturePlan(full.mode, tuple(r for r in full.rules if r.name != "in-skip-proxy-socket"), full.ipv6)
    captured("client", "nft", plan)
    assert proxy_connection_after_flush(net, sockets) == (b"", True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_application_traffic_stays_captured(net, captured, sockets, backend):
    """A new connection to an application listener that carries the proxy's mark, and a
    captured connection picked up mid-stream after a flush, both reach the proxy (15006),
    never the application."""
    captured("app", backend)
    ns = net.netns("app")
    proxy = sockets(open_listener_in_netns(ns, "0.0.0.0", 15006, mark=PROXY_MARK))
    marked_app = sockets(open_listener_in_netns(ns, "0.0.0.0", APP_PORT, mark=PROXY_MARK))
    plain_app = sockets(open_listener_in_netns(ns, "0.0.0.0", APP_PORT + 1))
    for port, app in ((APP_PORT, marked_app), (APP_PORT + 1, plain_app)):
        client = sockets(run_in_netns(net.netns("peer"), socket.create_connection,
                                      (net.pods["app"].ip, port), TIMEOUT))
        accepted, _ = proxy.accept()
        sockets(accepted)
        client.sendall(b"one")
        assert accepted.recv(3) == b"one"
        flush_conntrack(net, "app")
        client.sendall(b"two")  # picked up mid-stream: redirected again, to the same proxy socket
        assert accepted.recv(3) == b"two"
        accepted.sendall(b"ok")
        assert client.recv(2) == b"ok"
        assert not readable(app), f"application listener on {port} got a connection"
