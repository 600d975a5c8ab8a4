"""`nodeagent run --access-log PATH`: the agent's proxy writes one JSON line per request
(Envoy/Istio-like field names) for a captured pod's traffic. Root: a client pod in a
network namespace, captured with nftables into the agent's 15001 listener there, and a
server pod that is not enrolled (plaintext upstream)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from redirect.topology import Topology
from tests.integration.test_agent_daemon import PY, REPO, agents, cli  # noqa: F401  (fixture)
from tests.integration.test_agent_datapath import SERVER, curl, wait_for

MESH = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: shop}}
spec:
  hosts: [server.shop.svc.cluster.local]
  addresses: [10.250.99.1]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{address: {server_ip}}}]
"""


@pytest.fixture
def topology(needs_root, needs_tool):
    needs_tool("nft")
    needs_tool("nsenter")
    with Topology() as topo:
        yield topo


def test_access_log_line_per_request(agents, topology, tmp_path):
    topology.add_node("n1")
    client = topology.add_pod("n1", "client")
    server = topology.add_pod("n1", "server")
    topology.spawn("server", [sys.executable, "-c", SERVER, "8080"])
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(MESH.format(server_ip=server.ip))
    log_path = tmp_path / "access.log"
    state = tmp_path / "state"
    agent = agents(state, capture="nftables", config_dir=config, extra=("--access-log", str(log_path)))
    agent.wait_ready()
    assert wait_for(lambda: "ERR" not in curl(topology, f"http://{server.ip}:8080/")), "server did not start"
    cli(state, "enroll", "--netns", client.netns, "--name", "client", "--namespace", "shop",
        "--service-account", "client", "--labels", "app=client", "--ip", client.ip)
    assert log_path.read_text() == ""  # nothing captured yet: nothing logged

    reply = curl(topology, "http://10.250.99.1/reviews/1", host="server.shop.svc.cluster.local")
    assert reply == f"200 hello from server, you are {client.ip}", reply  # proxied from inside the client pod
    assert wait_for(lambda: log_path.read_text().endswith("\n"), timeout=5)
    (line,) = log_path.read_text().splitlines()  # one request, one line
    record = json.loads(line)
    assert {k: record[k] for k in ("method", "path", "protocol", "response_code", "response_flags", "authority",
                                   "upstream_host", "upstream_cluster", "source_workload", "source_namespace",
                                   "destination_service")} == {
        "method": "GET", "path": "/reviews/1", "protocol": "HTTP/1.1", "response_code": 200,
        "response_flags": "-", "authority": "server.shop.svc.cluster.local",
        "upstream_host": f"{server.ip}:8080", "upstream_cluster": "outbound|80||server.shop.svc.cluster.local",
        "source_workload": "client", "source_namespace": "shop",
        "destination_service": "server.shop.svc.cluster.local"}
    assert record["downstream_remote_address"].startswith(f"{client.ip}:")
    assert record["bytes_sent"] > 0 and record["duration"] >= 0 and record["start_time"].endswith("Z")
    # With the server pod enrolled too, the request is logged at both ends (one runtime serves
    # every workload): outbound at the client's pod, inbound at the server's.
    cli(state, "enroll", "--netns", server.netns, "--name", "server", "--namespace", "shop",
        "--service-account", "server", "--labels", "app=server", "--ip", server.ip)
    reply = curl(topology, "http://10.250.99.1/reviews/2", host="server.shop.svc.cluster.local")
    assert reply.startswith("200 hello from server"), reply
    assert wait_for(lambda: len(log_path.read_text().splitlines()) >= 3, timeout=5)
    records = [json.loads(x) for x in log_path.read_text().splitlines()[1:]]
    assert len(records) == 2 and all(r["path"] == "/reviews/2" and r["response_code"] == 200 for r in records)
    (outbound,) = [r for r in records if r["upstream_cluster"] == "outbound|80||server.shop.svc.cluster.local"]
    (inbound,) = [r for r in records if r is not outbound]
    assert outbound["source_workload"] == "client"
    assert inbound["upstream_host"] == f"{server.ip}:8080"  # the inbound side served the app in its pod
    assert inbound["downstream_remote_address"].startswith(f"{client.ip}:")
    # the inbound line names the caller from its verified certificate (the client pod is a
    # workload of this node, known to the agent by its enrollment), and the inbound cluster
    # as Envoy/Istio do
    assert {k: inbound[k] for k in ("upstream_cluster", "source_workload", "source_namespace",
                                    "source_principal")} == {
        "upstream_cluster": "inbound|8080||", "source_workload": "client", "source_namespace": "shop",
        "source_principal": "cluster.local/ns/shop/sa/client"}
    cli(state, "unenroll", "--netns", server.netns)
    cli(state, "unenroll", "--netns", client.netns)
    assert agent.stop() == 0


def test_access_log_path_that_cannot_be_opened_is_refused(tmp_path):
    where = tmp_path / "no-such-dir" / "access.log"
    proc = subprocess.run([PY, "-m", "nodeagent", "run", "--node", "node-1", "--state-dir", str(tmp_path / "s"),
                           "--capture", "none", "--config-dir", str(tmp_path), "--admin", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "--access-log", str(where)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"nodeagent: --access-log {where}: cannot open it for appending: No such file or directory" \
        in proc.stderr
