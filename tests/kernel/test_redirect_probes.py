"""Node probe SNAT in real namespaces: ``node_plan`` in the node, ``in_pod_plan`` in the pod.

Topology: node n1 with pods `client` and `server`, node n2. The node plan is
applied in n1's namespace (the agent's, on a real node), the in-pod plan in
the server pod. A connection from n1's own socket reaches the application
with source 169.254.7.127; the same from a pod (forwarded by n1), from the
proxy's mark, or from another node is captured (lands on 15006).
"""
from __future__ import annotations

import os
import select
import socket

import pytest

from redirect import capture
from redirect.netns import connect_marked, open_listener_in_netns, run_command, run_in_netns
from redirect.plan import NODE_OWNER, OWNER, CaptureConfig, HostWorkload, host_plan, in_pod_plan, node_plan
from redirect.topology import Topology
from tests.conftest import require

TIMEOUT = 3.0
PROBE = "169.254.7.127"


@pytest.fixture(scope="module")
def net():
    require(os.geteuid() == 0, "needs root (network namespaces, nftables/iptables)")
    with Topology() as topo:
        topo.add_node("n1")
        topo.add_node("n2")
        topo.add_pod("n1", "client", "10.250.1.2")
        topo.add_pod("n1", "server", "10.250.1.3")
        yield topo


@pytest.fixture
def listening(net):
    """The server pod's application on :8080 and its inbound proxy listener on :15006."""
    ns = net.netns("server")
    socks = [open_listener_in_netns(ns, "0.0.0.0", port) for port in (8080, 15006)]
    for s in socks:
        s.settimeout(TIMEOUT)
    yield socks
    for s in socks:
        s.close()


@pytest.fixture
def cleaned(net):
    yield
    for name in ("n1", "server"):
        capture.cleanup(net.netns(name))


def arrival(app: socket.socket, inbound: socket.socket, conn: socket.socket) -> tuple[str, str]:
    """('app'|'proxy', the peer address the listener saw) for the connection just made."""
    ready, _, _ = select.select([app, inbound], [], [], TIMEOUT)
    assert ready, "the connection arrived nowhere"
    which = ready[0]
    accepted, peer = which.accept()
    accepted.close()
    conn.close()
    return ("app" if which is app else "proxy"), peer[0]


def connect_from(netns: str, address) -> socket.socket:
    return run_in_netns(netns, socket.create_connection, address, TIMEOUT)


@pytest.mark.parametrize("backend", ["nft", "iptables-nft", "iptables-legacy"])
def test_node_socket_reaches_the_app_as_the_probe_address(net, listening, cleaned, backend):
    app, inbound = listening
    node, server, client = net.nodes["n1"], net.pods["server"], net.pods["client"]
    capture.apply(in_pod_plan(), server.netns, backend)
    first = capture.apply(node_plan([server.ip, client.ip]), node.netns, backend)
    assert first.changed and capture.verify(node_plan([server.ip, client.ip]), node.netns, backend) == ()
    again = capture.apply(node_plan([client.ip, server.ip]), node.netns, backend)
    assert not again.changed and again.drift == ()  # same set, any order: nothing rewritten

    # kubelet-style: a socket of the node itself -> SNAT -> uncaptured, source = 169.254.7.127
    assert arrival(app, inbound, connect_from(node.netns, (server.ip, 8080))) == ("app", PROBE)
    # a pod on the same node: forwarded by n1, no local socket there -> captured, source kept
    assert arrival(app, inbound, connect_from(client.netns, (server.ip, 8080))) == ("proxy", client.ip)
    # the proxy's own socket on the node (mark 0x539) is not a probe -> captured
    marked = connect_marked((server.ip, 8080), netns=node.netns, timeout=TIMEOUT)
    kind, peer = arrival(app, inbound, marked)
    assert kind == "proxy" and peer != PROBE
    # another node's socket: n1 only forwards it -> captured
    assert arrival(app, inbound, connect_from(net.nodes["n2"].netns, (server.ip, 8080)))[0] == "proxy"

    # without the node plan the node's probe is captured like anything else
    assert capture.cleanup(node.netns) == (backend,)
    assert arrival(app, inbound, connect_from(node.netns, (server.ip, 8080)))[0] == "proxy"


def test_probe_snat_off_and_explicit_sources(net, listening, cleaned):
    app, inbound = listening
    node, server = net.nodes["n1"], net.pods["server"]
    # SNAT off: only --probe-sources (here the node's veth address) let the probe through
    config = CaptureConfig(probe_snat_v4=None, probe_snat_v6=None, node_probe_sources=(node.gateway,))
    capture.apply(in_pod_plan(config), server.netns)
    assert arrival(app, inbound, connect_from(node.netns, (server.ip, 8080))) == ("app", node.gateway)
    # default SNAT + the explicit source, both exempt
    capture.apply(in_pod_plan(CaptureConfig(node_probe_sources=(node.gateway,))), server.netns)
    capture.apply(node_plan([server.ip]), node.netns)
    assert arrival(app, inbound, connect_from(node.netns, (server.ip, 8080))) == ("app", PROBE)


def test_node_table_lives_beside_a_host_plan(net, cleaned, cgroup_dir):
    """The node plan and a host-mode plan in one namespace: each replaced and removed on its own."""
    node = net.nodes["n1"]
    mount, cgroup = cgroup_dir
    host = host_plan([HostWorkload("web", cgroup, 15101)], cgroup2_mount=mount)
    probes = node_plan(["10.250.1.3"])
    capture.apply(host, node.netns)
    capture.apply(probes, node.netns)
    assert not capture.apply(host, node.netns).changed  # the host plan does not see the node table as drift
    assert capture.verify(probes, node.netns) == ()
    for backend in ("iptables-nft", "iptables-legacy"):  # one owner in iptables, the other in nft
        capture.apply(probes, node.netns, backend)
        assert capture.verify(probes, node.netns, backend) == ()
        assert capture.verify(host, node.netns) == ()
    tables = run_command(node.netns, ["nft", "list", "tables"]).stdout.split()
    assert f"{NODE_OWNER}" not in tables and f"{OWNER}" in tables  # the node plan moved to legacy iptables
    capture.apply(probes, node.netns)  # back to nft: the legacy chains are swept
    saved = run_command(node.netns, ["iptables-legacy-save", "-t", "nat"]).stdout
    assert "NODEAGENT" not in saved
    assert capture.cleanup(node.netns, owners=(NODE_OWNER,)) == ("nft",)
    assert capture.verify(host, node.netns) == ()  # untouched
    assert capture.cleanup(node.netns) == ("nft",)
    left = run_command(node.netns, ["nft", "list", "tables"]).stdout
    assert "nodeagent" not in left  # (iptables-nft's own empty nat tables stay, see docs/capture.md)


def test_agent_node_probes_follow_the_pods(net, cleaned, caplog):
    """nodeagent.agent.probes.NodeProbes: pod addresses from --ip or read from the pod, one
    node plan for all, removed with the last pod; a pod with no route back is logged."""
    from nodeagent.agent.probes import NodeProbes
    from nodeagent.agent.workload import WorkloadSpec

    node, server, client = net.nodes["n1"], net.pods["server"], net.pods["client"]

    def spec(pod, ips=()):
        return WorkloadSpec("netns", pod.netns, pod.name, "shop", "default", ips=ips)

    probes = NodeProbes(netns=node.netns)
    probes.add(spec(server))  # no --ip: the pod's global addresses are read in its namespace
    probes.add(spec(client, (client.ip,)))
    assert probes.addresses() == (client.ip, server.ip)
    assert capture.verify(node_plan([client.ip, server.ip]), node.netns) == ()
    assert "no route to the probe address" not in caplog.text  # both route it via the node

    probes.discard(spec(server))
    assert capture.verify(node_plan([client.ip]), node.netns) == ()
    probes.discard(spec(client))
    assert "nodeagent" not in run_command(node.netns, ["nft", "list", "tables"]).stdout

    # A pod whose replies cannot reach the node (no default route) is named in the log.
    net.exec("client", ["ip", "route", "del", "default"])
    try:
        probes.add(spec(client, (client.ip,)))
    finally:
        net.exec("client", ["ip", "route", "add", "default", "via", client.gateway, "dev", "eth0"])
    assert f"no route to the probe address {PROBE}" in caplog.text and client.netns in caplog.text
    probes.uninstall()
    assert "nodeagent" not in run_command(node.netns, ["nft", "list", "tables"]).stdout


def test_node_probes_reapply_only_on_change_and_verify_repairs_drift(net, cleaned):
    """A full resync re-applies every pod: NodeProbes.add of a pod it already holds with the
    same addresses writes nothing (100 pods would otherwise mean 100 node-table loads per
    resync); verify(), called once per full resync, repairs drift."""
    from nodeagent.agent.probes import NodeProbes
    from nodeagent.agent.workload import WorkloadSpec

    node, client = net.nodes["n1"], net.pods["client"]
    spec = WorkloadSpec("netns", client.netns, client.name, "shop", "default", ips=(client.ip,))
    probes = NodeProbes(netns=node.netns)
    probes.add(spec)
    assert capture.verify(node_plan([client.ip]), node.netns) == ()
    run_command(node.netns, ["nft", "delete", "table", "inet", "nodeagent-node"])  # drift
    probes.add(spec)  # unchanged pod: no write
    assert "nodeagent-node" not in run_command(node.netns, ["nft", "list", "tables"]).stdout
    probes.verify()
    assert capture.verify(node_plan([client.ip]), node.netns) == ()
    probes.uninstall()
    assert "nodeagent" not in run_command(node.netns, ["nft", "list", "tables"]).stdout


@pytest.fixture
def v6_pair(needs_root):
    """A node and a pod namespace joined by a veth, IPv6 only: node fd00:251::1, pod fd00:251::5
    (default route via the node, which covers the IPv6 probe address)."""
    import secrets
    import subprocess

    names = [f"nap6{secrets.token_hex(3)}-{role}" for role in ("node", "pod")]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=5)

    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
            # no DAD: a tentative link-local address would hold the pod's first neighbour
            # solicitation for the gateway (the route back to the probe address) for ~1 s
            subprocess.run(["nsenter", f"--net=/run/netns/{name}", "sysctl", "-q", "-w",
                            "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"],
                           check=True, capture_output=True, timeout=5)
        node, pod = names
        ip("-n", node, "link", "add", "vp6", "type", "veth", "peer", "name", "eth0", "netns", pod)
        ip("-n", node, "addr", "add", "fd00:251::1/64", "dev", "vp6", "nodad")
        ip("-n", pod, "addr", "add", "fd00:251::5/64", "dev", "eth0", "nodad")
        ip("-n", node, "link", "set", "vp6", "up")
        ip("-n", pod, "link", "set", "eth0", "up")
        ip("-n", pod, "-6", "route", "add", "default", "via", "fd00:251::1", "dev", "eth0")
        yield node, pod
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=5)


@pytest.mark.parametrize("backend", ["nft", "iptables-nft"])
def test_ipv6_node_socket_reaches_the_app_as_the_v6_probe_address(v6_pair, backend):
    node, pod = v6_pair
    socks = [open_listener_in_netns(pod, "::", port) for port in (8080, 15006)]
    try:
        for s in socks:
            s.settimeout(TIMEOUT)
        app, inbound = socks
        capture.apply(in_pod_plan(), pod, backend)
        capture.apply(node_plan(["fd00:251::5"]), node, backend)
        conn = run_in_netns(node, socket.create_connection, ("fd00:251::5", 8080), TIMEOUT)
        assert arrival(app, inbound, conn) == ("app", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
        capture.cleanup(node)
        conn = run_in_netns(node, socket.create_connection, ("fd00:251::5", 8080), TIMEOUT)
        assert arrival(app, inbound, conn) == ("proxy", "fd00:251::1")
    finally:
        for s in socks:
            s.close()


def _node_table(ns) -> dict:
    """{"sets": {name: set(elements)}, "rules": {comment: handle}, "set_handles": {name: handle}}
    of the node's nodeagent-node table (nft)."""
    import json

    listing = json.loads(run_command(ns, ["nft", "-j", "list", "table", "inet", NODE_OWNER]).stdout)
    out: dict = {"sets": {}, "rules": {}, "set_handles": {}}
    for item in listing["nftables"]:
        if "set" in item:
            out["sets"][item["set"]["name"]] = set(item["set"].get("elem", []))
            out["set_handles"][item["set"]["name"]] = item["set"]["handle"]
        elif "rule" in item:
            out["rules"][item["rule"]["comment"]] = item["rule"]["handle"]
    return out


def test_node_probes_add_and_remove_one_pod_as_one_element(net, listening, cleaned, monkeypatch):
    """nft: the first pod applies the whole node table; every later pod is one element
    added to (or deleted from) its family's set, the rest of the table untouched (same
    rule and set handles: nothing reloaded), and the SNAT works for the pod added that way."""
    from nodeagent.agent import probes as probes_mod
    from nodeagent.agent.probes import NodeProbes
    from nodeagent.agent.workload import WorkloadSpec

    app, inbound = listening
    node, server, client = net.nodes["n1"], net.pods["server"], net.pods["client"]
    full = []
    real_apply = probes_mod.apply_plan
    monkeypatch.setattr(probes_mod, "apply_plan", lambda *a, **kw: full.append(a[0]) or real_apply(*a, **kw))
    capture.apply(in_pod_plan(), server.netns)

    def spec(pod):
        return WorkloadSpec("netns", pod.netns, pod.name, "shop", "default", ips=(pod.ip,))

    probes = NodeProbes(netns=node.netns)
    probes.add(spec(client))
    assert len(full) == 1
    before = _node_table(node.netns)
    assert before["sets"] == {"probe_pods4": {client.ip}, "probe_pods6": set()}

    probes.add(spec(server))
    assert len(full) == 1  # no full apply: one element
    after = _node_table(node.netns)
    assert after["sets"] == {"probe_pods4": {client.ip, server.ip}, "probe_pods6": set()}
    assert (after["rules"], after["set_handles"]) == (before["rules"], before["set_handles"])
    assert capture.verify(node_plan([client.ip, server.ip]), node.netns) == ()
    # the pod added as an element is SNATed: the node's probe reaches the app as the probe address
    assert arrival(app, inbound, connect_from(node.netns, (server.ip, 8080))) == ("app", PROBE)

    probes.add(spec(server))  # applying twice changes nothing
    assert _node_table(node.netns) == after and len(full) == 1

    probes.discard(spec(client))
    assert len(full) == 1
    gone = _node_table(node.netns)
    assert gone["sets"] == {"probe_pods4": {server.ip}, "probe_pods6": set()}
    assert (gone["rules"], gone["set_handles"]) == (before["rules"], before["set_handles"])
    assert capture.verify(node_plan([server.ip]), node.netns) == ()

    probes.discard(spec(server))  # the last pod: the table goes
    assert NODE_OWNER not in run_command(node.netns, ["nft", "list", "tables"]).stdout


def test_node_probes_drift_is_repaired(net, cleaned):
    """An element or the table deleted by hand: verify() (every full resync) repairs the
    first; an element update that cannot apply (its table or element is gone) falls back
    to the full read-compare-load."""
    from nodeagent.agent.probes import NodeProbes
    from nodeagent.agent.workload import WorkloadSpec

    node, server, client = net.nodes["n1"], net.pods["server"], net.pods["client"]

    def spec(pod):
        return WorkloadSpec("netns", pod.netns, pod.name, "shop", "default", ips=(pod.ip,))

    both = node_plan([client.ip, server.ip])
    probes = NodeProbes(netns=node.netns)
    probes.add(spec(client))
    probes.add(spec(server))
    run_command(node.netns, ["nft", "delete", "element", "inet", NODE_OWNER, "probe_pods4", f"{{ {server.ip} }}"])
    assert capture.verify(both, node.netns) == (f"set probe_pods4: elements differ (missing ['{server.ip}'])",)
    probes.verify()
    assert capture.verify(both, node.netns) == ()

    # an element deleted by hand, then its pod removed: the delete fails, the full apply repairs
    run_command(node.netns, ["nft", "delete", "element", "inet", NODE_OWNER, "probe_pods4", f"{{ {server.ip} }}"])
    probes.discard(spec(server))
    assert capture.verify(node_plan([client.ip]), node.netns) == ()
    # the table deleted by hand, then a pod added: the element add fails, the full apply repairs
    run_command(node.netns, ["nft", "delete", "table", "inet", NODE_OWNER])
    probes.add(spec(server))
    assert capture.verify(both, node.netns) == ()
    # a foreign element in our set is drift too
    run_command(node.netns, ["nft", "add", "element", "inet", NODE_OWNER, "probe_pods4", "{ 10.250.9.9 }"])
    assert capture.verify(both, node.netns) == ("set probe_pods4: elements differ (unexpected ['10.250.9.9'])",)
    probes.verify()
    assert capture.verify(both, node.netns) == ()
    probes.uninstall()
    assert "nodeagent" not in run_command(node.netns, ["nft", "list", "tables"]).stdout


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"])
def test_node_probes_on_iptables_follow_the_pods_and_repair(net, listening, cleaned, backend):
    """iptables has no sets: every change re-applies the node chain (one rule per pod
    address, compared in order); verify() repairs a flushed chain; uninstall leaves nothing."""
    from nodeagent.agent.probes import NodeProbes
    from nodeagent.agent.workload import WorkloadSpec

    app, inbound = listening
    node, server, client = net.nodes["n1"], net.pods["server"], net.pods["client"]
    capture.apply(in_pod_plan(), server.netns, backend)

    def spec(pod):
        return WorkloadSpec("netns", pod.netns, pod.name, "shop", "default", ips=(pod.ip,))

    probes = NodeProbes(backend=backend, netns=node.netns)
    probes.add(spec(client))
    probes.add(spec(server))
    both = node_plan([client.ip, server.ip])
    assert capture.verify(both, node.netns, backend) == ()
    assert arrival(app, inbound, connect_from(node.netns, (server.ip, 8080))) == ("app", PROBE)
    probes.add(spec(server))
    assert not capture.apply(both, node.netns, backend).changed  # applying twice changes nothing

    save = "iptables-legacy" if backend == "iptables-legacy" else "iptables-nft"
    run_command(node.netns, [save, "-t", "nat", "-F", "NODEAGENT_NODE-POSTROUTING"])  # drift
    assert capture.verify(both, node.netns, backend) != ()
    probes.verify()
    assert capture.verify(both, node.netns, backend) == ()

    probes.discard(spec(client))
    assert capture.verify(node_plan([server.ip]), node.netns, backend) == ()
    probes.uninstall()
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        assert "NODEAGENT" not in run_command(node.netns, [tool]).stdout, tool
    assert "nodeagent" not in run_command(node.netns, ["nft", "list", "tables"]).stdout


def test_node_probes_use_the_pod_view_read_in_another_visit(net, cleaned, monkeypatch):
    """NodeProbes.visit: pod_view read by a caller already inside the pod's namespace (the
    listeners' visit) is used by add() instead of a visit of its own; an unused or stale
    one is dropped by close()."""
    from nodeagent.agent import probes as probes_mod
    from nodeagent.agent.probes import NodeProbes
    from nodeagent.agent.workload import WorkloadSpec

    node, server = net.nodes["n1"], net.pods["server"]
    spec = WorkloadSpec("netns", server.netns, server.name, "shop", "default")  # no --ip: read in the pod
    probes = NodeProbes(netns=node.netns)
    look = probes.visit(spec)
    run_in_netns(server.netns, look)
    visits = []
    real = probes_mod.pod_view
    monkeypatch.setattr(probes_mod, "pod_view", lambda *a, **kw: visits.append(a) or real(*a, **kw))
    probes.add(spec)
    look.close()
    assert visits == [] and probes.addresses() == (server.ip,)
    assert capture.verify(node_plan([server.ip]), node.netns) == ()

    # not run (the listeners were open already), or not used: add() reads the pod itself
    probes.discard(spec)
    probes.visit(spec).close()
    probes.add(spec)
    assert len(visits) == 1 and probes.addresses() == (server.ip,)
    probes.uninstall()
