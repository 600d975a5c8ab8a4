"""The CNI plugin script (deploy/cni/nodeagent-cni) against the real agent, with
the pod read from a real HTTP server standing in for the API server's pod GET."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.test_agent_daemon import REPO, agents, call  # noqa: F401  (fixture)

PLUGIN = REPO / "deploy" / "cni" / "nodeagent-cni"
PODS = {
    ("shop", "web-7d9f"): {"metadata": {"labels": {"app": "web", "version": "v2"}},
                           "spec": {"serviceAccountName": "web-sa"}},
}


@pytest.fixture
def api_server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            parts = self.path.strip("/").split("/")  # api v1 namespaces NS pods NAME
            pod = PODS.get((parts[3], parts[5])) if len(parts) == 6 else None
            body = json.dumps(pod or {"kind": "Status", "code": 404}).encode()
            self.send_response(200 if pod else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def run_plugin(command: str, conf: dict, netns: str = "", pod: tuple[str, str] = ("shop", "web-7d9f")):
    env = {**os.environ, "CNI_COMMAND": command, "CNI_NETNS": netns, "CNI_CONTAINERID": "abc123",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};K8S_POD_UID=u1"}
    return subprocess.run([sys.executable, str(PLUGIN)], input=json.dumps(conf), env=env, capture_output=True,
                          text=True, timeout=30)


def test_cni_add_del_check(agents, api_server, tmp_path):
    api, seen = api_server
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    state = tmp_path / "state"
    agent = agents(state)
    agent.wait_ready()
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.250.3.7/24", "interface": 0}, {"address": "fd00::7/64", "interface": 0}]}
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "nodeagent-cni",
            "state_dir": str(state), "nodeagent_bin": str(REPO / ".venv" / "bin" / "nodeagent"),
            "kubernetes": {"api": api, "token_file": str(token)}, "prevResult": prev}
    if not Path(conf["nodeagent_bin"]).exists():
        conf["nodeagent_bin"] = str(Path(sys.executable).parent / "nodeagent")

    version = run_plugin("VERSION", conf)
    assert json.loads(version.stdout)["supportedVersions"][-1] == "1.0.0"

    # ADD runs after the runtime created the pod's netns and the main plugin wired it, so the
    # netns exists: here a real one, this test process's (/proc/PID/ns/net, as some runtimes pass).
    netns = f"/proc/{os.getpid()}/ns/net"
    added = run_plugin("ADD", conf, netns=netns)
    assert added.returncode == 0, added.stdout + added.stderr
    assert json.loads(added.stdout) == prev  # a chained plugin passes the result on
    assert seen == [("/api/v1/namespaces/shop/pods/web-7d9f", "Bearer secret-token")]
    (w,) = call(state, {"op": "list"})["workloads"]
    assert (w["target"], w["name"], w["namespace"], w["service_account"], w["labels"], w["ips"]) == (
        netns, "web-7d9f", "shop", "web-sa", {"app": "web", "version": "v2"}, ["10.250.3.7", "fd00::7"])
    assert run_plugin("CHECK", conf, netns=netns).returncode == 0

    # DEL after the runtime dropped the netns: by pod name; DEL again is a no-op.
    deleted = run_plugin("DEL", conf, netns="")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert call(state, {"op": "list"})["workloads"] == []
    assert run_plugin("DEL", conf, netns=netns).returncode == 0
    missing = run_plugin("CHECK", conf, netns=netns)
    assert missing.returncode == 1 and "is not enrolled" in json.loads(missing.stdout)["msg"]

    # A netns that does not exist (the runtime removed it before ADD ran): the ADD fails with the
    # agent's reason and nothing is enrolled (kubelet retries the sandbox; no identity minted).
    gone = run_plugin("ADD", conf, netns="/var/run/netns/cni-gone-1234")
    assert gone.returncode == 1, gone.stdout + gone.stderr
    failure = json.loads(gone.stdout)
    assert failure["msg"] == "nodeagent-cni: enrolling shop/web-7d9f failed"
    assert "network namespace /var/run/netns/cni-gone-1234 does not exist" in failure["details"]
    assert call(state, {"op": "list"})["workloads"] == []

    # Excluded namespaces pass through; an unknown pod fails the ADD (fail closed).
    assert run_plugin("ADD", conf, netns="/var/run/netns/x", pod=("kube-system", "dns")).returncode == 0
    unknown = run_plugin("ADD", conf, netns="/var/run/netns/cni-9", pod=("shop", "ghost"))
    assert unknown.returncode == 1 and "cannot read pod shop/ghost" in json.loads(unknown.stdout)["msg"]
    unchained = run_plugin("ADD", {**conf, "prevResult": None}, netns="/var/run/netns/cni-9")
    assert unchained.returncode == 1 and "must be chained" in json.loads(unchained.stdout)["msg"]
    assert call(state, {"op": "list"})["workloads"] == []
    assert agent.stop() == 0
