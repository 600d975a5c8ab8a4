"""VirtualService tcp/tls routes on the node agent's captured outbound path (root):
a client pod enrolled with nftables capture dials a service VIP; SO_ORIGINAL_DST
gives the agent's 15001 listener the VIP, the tcp route splits 80/20 between two
server pods, and a tls route picks a backend by the ClientHello's SNI."""
from __future__ import annotations

import json
import sys
import time

import pytest

from redirect.topology import Topology
from tests.integration.l4_backends import self_signed
from tests.integration.test_agent_daemon import agents, cli, http_get  # noqa: F401  (fixture)

# One TCP answer per connection: NAME|plain|DATA, or NAME|tls|DATA after a TLS handshake
# when a certificate is given and the client's first byte is a handshake record.
SERVER = """
import socket, ssl, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
ctx = None
if len(sys.argv) > 3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(128)
def serve(c):
    c.settimeout(5)
    try:
        mode = "plain"
        if ctx is not None and c.recv(1, socket.MSG_PEEK) == b"\\x16":
            c = ctx.wrap_socket(c, server_side=True); mode = "tls"
        data = c.recv(4096)
        c.sendall(("%s|%s|" % (name, mode)).encode() + data)
    except Exception:
        pass
    finally:
        c.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# N connections to ADDR:PORT (plain, or TLS with SNI when given); prints the answers' names.
CLIENT = """
import json, socket, ssl, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sni = sys.argv[4] if len(sys.argv) > 4 else None
out = []
for i in range(n):
    try:
        s = socket.create_connection((addr, port), timeout=5)
        if sni is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(s, server_hostname=sni)
        s.sendall(b"hi")
        data = b""
        while True:
            part = s.recv(4096)
            if not part:
                break
            data += part
        s.close()
        out.append(data.decode(errors="replace"))
    except Exception as e:
        out.append("ERR " + type(e).__name__)
print(json.dumps(out))
"""


def mesh_yaml(v1_ip: str, v2_ip: str) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  hosts: [tcp-echo.shop.svc.cluster.local]
  addresses: [10.250.99.2]
  ports: [{{number: 9000, name: tcp, protocol: TCP}}, {{number: 9443, name: tls, protocol: TLS}}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{app: tcp-echo}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo-v1, namespace: shop}}
spec: {{address: {v1_ip}, labels: {{app: tcp-echo, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo-v2, namespace: shop}}
spec: {{address: {v2_ip}, labels: {{app: tcp-echo, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  host: tcp-echo
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  hosts: [tcp-echo, v2.tcp-echo.example]
  tls:
  - match: [{{sniHosts: [v2.tcp-echo.example]}}]
    route: [{{destination: {{host: tcp-echo, subset: v2, port: {{number: 9443}}}}}}]
  tcp:
  - match: [{{port: 9000}}]
    route:
    - {{destination: {{host: tcp-echo, subset: v1}}, weight: 80}}
    - {{destination: {{host: tcp-echo, subset: v2}}, weight: 20}}
  - route: [{{destination: {{host: tcp-echo, subset: v1, port: {{number: 9443}}}}}}]
"""


@pytest.fixture
def topology(needs_root, needs_tool):
    needs_tool("nft")
    needs_tool("nsenter")
    with Topology() as topo:
        yield topo


def calls(topo: Topology, addr: str, port: int, n: int, sni: str | None = None) -> list[str]:
    out = topo.exec("client", [sys.executable, "-c", CLIENT, addr, str(port), str(n), *([sni] if sni else [])],
                    timeout=60).stdout
    return json.loads(out)


def test_captured_tcp_split_and_tls_sni_route(agents, topology, tmp_path):
    topology.add_node("n1")
    client = topology.add_pod("n1", "client")
    v1 = topology.add_pod("n1", "echo1")
    v2 = topology.add_pod("n1", "echo2")
    cert, key = self_signed(tmp_path, ["v2.tcp-echo.example"])
    for pod, name in ((v1, "v1"), (v2, "v2")):
        topology.spawn(pod.name, [sys.executable, "-c", SERVER, name, "9000"])
        topology.spawn(pod.name, [sys.executable, "-c", SERVER, name, "9443", str(cert), str(key)])
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_yaml(v1.ip, v2.ip))
    state = tmp_path / "state"
    agent = agents(state, capture="nftables", config_dir=config)
    agent.wait_ready()
    deadline = time.monotonic() + 10
    while calls(topology, v2.ip, 9443, 1) != ["v2|plain|hi"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the servers are up (not captured yet: the client is not enrolled)
    cli(state, "enroll", "--netns", client.netns, "--name", "client", "--namespace", "shop",
        "--labels", "app=client", "--ip", client.ip)

    n = 100
    answers = calls(topology, "10.250.99.2", 9000, n)
    counts = {name: sum(a == f"{name}|plain|hi" for a in answers) for name in ("v1", "v2")}
    assert counts["v1"] + counts["v2"] == n, answers
    # Binomial(100, 0.2): mean 20, sigma 4; +-20 is 5 sigma
    assert abs(counts["v2"] - 20) <= 20, counts

    # TLS port: the SNI picks subset v2; without a matching SNI the tcp catch-all (v1)
    assert calls(topology, "10.250.99.2", 9443, 3, sni="v2.tcp-echo.example") == ["v2|tls|hi"] * 3
    assert calls(topology, "10.250.99.2", 9443, 3, sni="other.example") == ["v1|tls|hi"] * 3

    status, metrics = http_get(agent.metrics, "/metrics")
    assert status == 200
    opened = {}
    for line in metrics.splitlines():
        if line.startswith("istio_tcp_connections_opened_total{") and 'source_workload="client"' in line:
            version = line.split('destination_version="')[1].split('"')[0]
            opened[version] = opened.get(version, 0) + float(line.rsplit(" ", 1)[1])
    assert opened == {"v1": counts["v1"] + 3, "v2": counts["v2"] + 3}, opened
    cli(state, "unenroll", "--netns", client.netns)
    assert agent.stop() == 0
