"""The whole node data path with the real agent (root): two pods in network
namespaces built by redirect's topology builder, both enrolled; a request from
the client pod is captured by the in-pod nftables rules into the agent's 15001
listener in that pod, routed by the proxy, sent through the mTLS tunnel from
the client pod's namespace to the server pod's 15008, admitted there by
PeerAuthentication/AuthorizationPolicy with the client's verified identity and
served to the application. A DENY policy written to the config dir then
refuses it (403 for HTTP, closed for TCP), without a restart."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from redirect.topology import Topology
from tests.integration.test_agent_daemon import agents, cli, http_get  # noqa: F401  (fixture)

SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from server, you are " + self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""

CLIENT = """
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Host": sys.argv[2]} if len(sys.argv) > 2 else {})
try:
    with urllib.request.urlopen(request, timeout=5) as r:
        print(r.status, r.read().decode())
except Exception as e:
    print("ERR", type(e).__name__, e)
"""


def mesh_yaml(server_ip: str, service_account: str | None = "server") -> str:
    sa = f", serviceAccount: {service_account}" if service_account else ""
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: shop}}
spec:
  hosts: [server.shop.svc.cluster.local]
  addresses: [10.250.99.1]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{app: server}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: shop}}
spec: {{address: {server_ip}, labels: {{app: server}}{sa}}}
"""


STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""

DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [%s/32]}}]
"""


@pytest.fixture
def topology(needs_root, needs_tool):
    needs_tool("nft")
    needs_tool("nsenter")
    with Topology() as topo:
        yield topo


def curl(topo: Topology, url: str, host: str | None = None) -> str:
    return topo.exec("client", [sys.executable, "-c", CLIENT, url, *([host] if host else [])],
                     timeout=15).stdout.strip()


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_request_through_both_pods_listeners_and_policy(agents, topology, tmp_path):
    topology.add_node("n1")
    client = topology.add_pod("n1", "client")
    server = topology.add_pod("n1", "server")
    topology.spawn("server", [sys.executable, "-c", SERVER, "8080"])
    topology.spawn("server", [sys.executable, "-c", SERVER, "9090"])  # in no ServiceEntry: passthrough
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_yaml(server.ip))
    state = tmp_path / "state"
    agent = agents(state, capture="nftables", config_dir=config)
    agent.wait_ready()
    for port in (8080, 9090):
        assert wait_for(lambda: "ERR" not in curl(topology, f"http://{server.ip}:{port}/")), "server did not start"

    for pod, sa in ((client, "client"), (server, "server")):
        cli(state, "enroll", "--netns", pod.netns, "--name", pod.name, "--namespace", "shop",
            "--service-account", sa, "--labels", f"app={pod.name}", "--ip", pod.ip)
    listeners = {entry["workload"]: entry["listeners"] for entry in agent.json("/workloads")["listeners"]}
    assert {"0.0.0.0:15001 (outbound)", "0.0.0.0:15006 (plaintext)", "0.0.0.0:15008 (tunnel)"} <= \
        set(listeners["shop/server"])
    assert listeners["shop/client"] == listeners["shop/server"]  # each in its own namespace

    # By service VIP (only the proxy knows it: routed by the ServiceEntry)...
    host = "server.shop.svc.cluster.local"
    reply = curl(topology, "http://10.250.99.1/", host=host)
    assert reply == f"200 hello from server, you are {server.ip}", reply  # relayed inside the server pod
    # ... and to a port of the pod that no service declares (passed through as bytes).
    reply = curl(topology, f"http://{server.ip}:9090/")
    assert reply == f"200 hello from server, you are {server.ip}", reply

    status, metrics = http_get(agent.metrics, "/metrics")
    assert status == 200
    requests = [line for line in metrics.splitlines() if line.startswith("istio_requests_total{")]
    assert any('source_workload="client"' in line and 'destination_service="server.shop.svc.cluster.local"' in line
               and 'response_code="200"' in line and 'reporter="source"' in line for line in requests), requests
    # Between the two pods the request went through the mTLS tunnel: the server side saw the
    # client's certificate (source_principal) and reports mutual_tls.
    inbound = [line for line in requests if 'reporter="destination"' in line]
    assert any('cluster.local/ns/shop/sa/client"' in line.split("source_principal=")[1].split(",")[0]
               and 'connection_security_policy="mutual_tls"' in line for line in inbound), inbound
    (server_listeners,) = [e for e in agent.json("/workloads")["listeners"] if e["workload"] == "shop/server"]
    assert server_listeners["tunnel"]["accepted"] >= 1
    endpoints = agent.json("/endpoints")
    (cluster,) = [c for c in endpoints["clusters"] if c["cluster"] == "outbound|80||server.shop.svc.cluster.local"]
    assert [(e["address"], e["identity"], e["ejected"]) for e in cluster["endpoints"]] == [
        (server.ip, "spiffe://cluster.local/ns/shop/sa/server", False)]

    # A DENY policy lands in the watched config dir: the next connection is refused at the server pod.
    (config / "deny.yaml").write_text(DENY % client.ip)
    assert wait_for(lambda: agent.json("/config_dump")["version"] == 2)
    reply = curl(topology, "http://10.250.99.1/", host=host)
    assert reply == "ERR HTTPError HTTP Error 403: Forbidden", reply  # RBAC: access denied, at the server pod
    assert "denied by DENY policy shop/deny-client" in agent.logs()
    reply = curl(topology, f"http://{server.ip}:9090/")  # opaque TCP: refused at connect
    assert reply.startswith("ERR RemoteDisconnected") or reply.startswith("ERR ConnectionResetError"), reply

    # Unenrolling the server removes its capture and listeners. Its WorkloadEntry still names a
    # service account, so the client's side still insists on mTLS to it: with no tunnel listening
    # the request fails (503), it is never sent in plaintext.
    cli(state, "unenroll", "--netns", server.netns)
    assert topology.exec("server", ["nft", "list", "tables"]).stdout.strip() == ""
    reply = curl(topology, "http://10.250.99.1/", host=host)
    assert reply == "ERR HTTPError HTTP Error 503: Service Unavailable", reply
    # With the client unenrolled too, nothing is captured: the pods talk directly again.
    cli(state, "unenroll", "--netns", client.netns)
    reply = curl(topology, f"http://{server.ip}:9090/")
    assert reply == f"200 hello from server, you are {client.ip}", reply
    assert agent.stop() == 0


def test_ebpf_capture_outbound_through_the_agent(agents, topology, tmp_path, needs_tool):
    """--capture ebpf: the client's connect() goes to the agent's 15001 in its namespace, through
    the mTLS tunnel to the server pod, whose inbound the sk_lookup program steers to the proxy."""
    from bpf.loader import unavailable_reason
    from tests.conftest import require

    require(unavailable_reason() is None, f"eBPF capture unavailable: {unavailable_reason()}")
    topology.add_node("n1")
    client = topology.add_pod("n1", "client")
    server = topology.add_pod("n1", "server")
    topology.spawn("server", [sys.executable, "-c", SERVER, "8080"])
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_yaml(server.ip))
    state = tmp_path / "state"
    pin_dir = f"/sys/fs/bpf/naagt-{tmp_path.name[-12:]}"
    agent = agents(state, capture="ebpf", config_dir=config, extra=("--bpf-pin-dir", pin_dir))
    try:
        agent.wait_ready(timeout=60)
        assert wait_for(lambda: "ERR" not in curl(topology, f"http://{server.ip}:8080/")), "server did not start"
        # Not enrolled: the VIP means nothing without the proxy.
        assert curl(topology, "http://10.250.99.1/", host="server.shop.svc.cluster.local").startswith("ERR")
        for pod in (client, server):
            out = cli(state, "enroll", "--netns", pod.netns, "--name", pod.name, "--namespace", "shop",
                      "--service-account", pod.name, "--labels", f"app={pod.name}", "--ip", pod.ip).stdout
            assert "capture applied, certificate issued" in out, out
            print(f"\nenroll with eBPF capture: {out.rsplit('certificate issued, ', 1)[1].strip().rstrip(')')}")
        reply = curl(topology, "http://10.250.99.1/", host="server.shop.svc.cluster.local")
        assert reply == f"200 hello from server, you are {server.ip}", reply  # served inside the server pod
        status, metrics = http_get(agent.metrics, "/metrics")
        assert 'source_workload="client"' in metrics
        assert 'connection_security_policy="mutual_tls"' in metrics
        # A plaintext connection into the server pod (not through a tunnel) is steered to 15006 too:
        # unenroll the client, then STRICT refuses it.
        cli(state, "unenroll", "--netns", client.netns)
        assert curl(topology, f"http://{server.ip}:8080/").startswith("200 hello from server")
        (config / "strict.yaml").write_text(STRICT)
        assert wait_for(lambda: agent.json("/config_dump")["version"] == 2)
        assert wait_for(lambda: curl(topology, f"http://{server.ip}:8080/").startswith("ERR"))
        assert agent.stop() == 0
        assert Path(pin_dir, "links").is_dir()  # programs stay attached while the agent is down
    finally:
        agent.stop()
        out = _uninstall(state, pin_dir)
    assert out.returncode == 0, out.stderr


def test_host_mode_cgroup_workload_with_ebpf(agents, needs_root, tmp_path):
    """A host service (a cgroup, no pod) enrolled with --cgroup: its outbound connects
    go to its own listener on 127.0.0.1, which names it as the source workload."""
    import secrets
    import subprocess

    from bpf.loader import cgroup2_root, unavailable_reason
    from tests.conftest import require

    require(unavailable_reason() is None, f"eBPF capture unavailable: {unavailable_reason()}")
    root = cgroup2_root()
    require(root is not None, "needs cgroup v2")
    from tests.integration.test_agent_daemon import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER.replace('"0.0.0.0"', '"127.0.0.77"'), str(port)])
    cgroup = f"naagt-{secrets.token_hex(3)}"
    cgroup_dir = Path(root, cgroup)
    cgroup_dir.mkdir()
    config = tmp_path / "config"
    config.mkdir()
    # No service account on the WorkloadEntry: the local server is not a mesh workload (plaintext).
    (config / "mesh.yaml").write_text(mesh_yaml("127.0.0.77", service_account=None)
                                      .replace("targetPort: 8080", f"targetPort: {port}"))
    state = tmp_path / "state"
    pin_dir = f"/sys/fs/bpf/naagt-{secrets.token_hex(3)}"
    agent = agents(state, capture="ebpf", config_dir=config, extra=("--bpf-pin-dir", pin_dir))
    client_cmd = (f"echo $$ > {cgroup_dir}/cgroup.procs && exec {sys.executable} -c '{CLIENT}' "
                  f"http://10.250.99.1/ server.shop.svc.cluster.local")
    try:
        agent.wait_ready(timeout=60)
        out = cli(state, "enroll", "--cgroup", f"/{cgroup}", "--name", "batch", "--namespace", "ops",
                  "--service-account", "batch", "--labels", "app=batch")
        assert "capture applied" in out.stdout, out.stdout
        (listener,) = agent.json("/workloads")["listeners"]
        assert listener["workload"] == "ops/batch" and listener["listeners"] == ["127.0.0.1:15100 (outbound)"]
        assert wait_for(lambda: _connects(("127.0.0.77", port))), "server did not start"
        reply = subprocess.run(["sh", "-c", client_cmd], capture_output=True, text=True, timeout=20).stdout.strip()
        assert reply == "200 hello from server, you are 127.0.0.1", reply
        status, metrics = http_get(agent.metrics, "/metrics")
        assert 'source_workload="batch"' in metrics and 'source_workload_namespace="ops"' in metrics
        cli(state, "unenroll", "--cgroup", f"/{cgroup}")
        reply = subprocess.run(["sh", "-c", client_cmd], capture_output=True, text=True, timeout=20).stdout.strip()
        assert reply.startswith("ERR"), reply  # the VIP means nothing without the proxy
        assert agent.stop() == 0
    finally:
        agent.stop()
        server.kill()
        server.wait()
        out = _uninstall(state, pin_dir)
        for _ in range(50):
            try:
                cgroup_dir.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert out.returncode == 0, out.stderr
    assert not cgroup_dir.exists()


def _connects(address) -> bool:
    import socket

    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return False
    return True


def _uninstall(state: Path, pin_dir: str):
    """`nodeagent uninstall` (its result is asserted by the caller); whatever it left
    behind is removed here so a failed test never leaves programs attached."""
    from bpf.loader import EbpfCapture

    out = cli(state, "uninstall", check=False)
    left = Path(pin_dir).exists()
    if left:
        EbpfCapture(pin_dir).cleanup()
    assert not left, f"uninstall left {pin_dir} behind: {out.stdout}{out.stderr}"
    return out
