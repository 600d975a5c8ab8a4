"""Host mode inbound (root): a host service in a cgroup, enrolled with
``--cgroup PATH --ports P``, has the connections to its port P captured into
the agent's ONE host inbound listener (15006), where the original destination
port names the workload; PeerAuthentication and AuthorizationPolicy apply, and
the proxy connects to the app with mark 0x539.

The "host" is a node network namespace built by ``redirect.topology`` (the
agent runs inside it, so its host nftables table never touches this machine's
own ruleset); the client is a pod on that node, connecting to the node's
address (prerouting sees it arrive on the pod's veth)."""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from redirect.topology import Topology
from tests.integration.test_agent_daemon import REPO, cli
from tests.integration.test_agent_datapath import CLIENT, SERVER

GET = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://127.0.0.1:" + sys.argv[1] + sys.argv[2], timeout=2) as r:
        print(r.read().decode())
except Exception as e:
    print("ERR", type(e).__name__, e)
"""

DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: ops}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [%s/32]}}]
"""

STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: ops}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
"""

APP_PORT = 8080


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.fixture
def node(needs_root, needs_tool):
    from bpf.loader import cgroup2_root
    from tests.conftest import require

    needs_tool("nft")
    needs_tool("nsenter")
    root = cgroup2_root()
    require(root is not None, "needs cgroup v2")
    cgroup_dir = Path(root, f"naagt-{secrets.token_hex(3)}")
    cgroup_dir.mkdir()
    try:
        with Topology() as topo:
            topo.add_node("n1")
            topo.add_pod("n1", "client")
            yield topo, cgroup_dir
    finally:
        for _ in range(50):
            try:
                cgroup_dir.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert not cgroup_dir.exists()


def test_host_workload_inbound_through_the_agent(node, tmp_path):
    topo, cgroup_dir = node
    host_ip = topo.nodes["n1"].gateway  # the node's own address, as the pod sees it
    client_ip = topo.pods["client"].ip
    cgroup = "/" + cgroup_dir.name
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text("")
    state = tmp_path / "state"
    admin, metrics = 15400, 15401  # inside the node namespace: nothing else listens there
    log_path = tmp_path / "agent.log"

    # The app: a host service in its own cgroup, on the node.
    topo.spawn("n1", ["sh", "-c", f"echo $$ > {cgroup_dir}/cgroup.procs && exec {sys.executable} -c '{SERVER}' "
                                  f"{APP_PORT}"])
    with open(log_path, "w") as log:
        agent = topo.spawn("n1", [sys.executable, "-m", "nodeagent", "run", "--node", "node-1", "--state-dir",
                                  str(state), "--capture", "nftables", "--admin", f"127.0.0.1:{admin}",
                                  "--metrics", f"127.0.0.1:{metrics}", "--readiness", "127.0.0.1:15402",
                                  "--config-dir", str(config)],
                           cwd=REPO, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def get(port: int, path: str) -> str:
        return topo.exec("n1", [sys.executable, "-c", GET, str(port), path], timeout=10).stdout.strip()

    def curl() -> str:
        return topo.exec("client", [sys.executable, "-c", CLIENT, f"http://{host_ip}:{APP_PORT}/"],
                         timeout=15).stdout.strip()

    def config_version() -> int:
        text = get(admin, "/config_dump")
        return -1 if text.startswith("ERR") else json.loads(text)["version"]

    try:
        assert wait_for(lambda: not get(admin, "/workloads").startswith("ERR"), 20), log_path.read_text()
        direct = f"200 hello from server, you are {client_ip}"
        assert wait_for(lambda: curl() == direct), curl()  # not enrolled: the client reaches the app directly

        out = cli(state, "enroll", "--cgroup", cgroup, "--name", "web", "--namespace", "ops",
                  "--service-account", "web", "--labels", "app=web", "--ports", str(APP_PORT))
        assert "capture applied" in out.stdout, out.stdout
        (listener,) = json.loads(get(admin, "/workloads"))["listeners"]
        assert listener["workload"] == "ops/web"
        assert listener["listeners"][:2] == ["127.0.0.1:15100 (outbound)",
                                             f"0.0.0.0:15006 (host inbound for port {APP_PORT})"], listener
        rules = topo.exec("n1", ["nft", "list", "ruleset"]).stdout
        assert f"tcp dport {APP_PORT} redirect to :15006" in rules, rules

        # Captured: the app now sees the proxy (the node's address), not the client.
        reply = curl()
        assert reply == f"200 hello from server, you are {host_ip}", (reply, log_path.read_text())
        text = get(metrics, "/metrics")
        inbound = [line for line in text.splitlines()
                   if line.startswith("istio_tcp_connections_opened_total{") and 'reporter="destination"' in line]
        assert any('destination_workload="web"' in line and 'destination_workload_namespace="ops"' in line
                   and 'connection_security_policy="none"' in line for line in inbound), inbound

        # AuthorizationPolicy DENY for this workload: refused at connect.
        (config / "deny.yaml").write_text(DENY % client_ip)
        assert wait_for(lambda: config_version() == 2)
        reply = curl()
        assert reply.startswith(("ERR RemoteDisconnected", "ERR ConnectionResetError", "ERR URLError")), reply
        assert "denied by DENY policy ops/deny-client" in log_path.read_text()
        (config / "deny.yaml").unlink()
        assert wait_for(lambda: config_version() == 3)
        assert curl() == f"200 hello from server, you are {host_ip}"

        # STRICT: a plaintext connection is refused.
        (config / "strict.yaml").write_text(STRICT)
        assert wait_for(lambda: config_version() == 4)
        reply = curl()
        assert reply.startswith(("ERR RemoteDisconnected", "ERR ConnectionResetError", "ERR URLError")), reply
        assert f"PeerAuthentication STRICT for ops/web port {APP_PORT}: plaintext refused" in log_path.read_text()
        (config / "strict.yaml").unlink()
        assert wait_for(lambda: config_version() == 5)

        # Unenroll: the rule and the shared listener are gone; the client reaches the app directly.
        cli(state, "unenroll", "--cgroup", cgroup)
        assert "15006" not in topo.exec("n1", ["nft", "list", "ruleset"]).stdout
        assert json.loads(get(admin, "/workloads"))["listeners"] == []
        assert curl() == direct
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except Exception:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, log_path.read_text()
