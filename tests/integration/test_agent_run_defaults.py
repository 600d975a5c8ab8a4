"""`nodeagent run` defaults that users rely on: capture is nftables unless asked (issue #5;
eBPF only with --capture ebpf or auto), admin on 127.0.0.1:15000, metrics :15020,
readiness :15021, access log off."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time

from nodeagent.cli import build_parser
from tests.integration.test_agent_daemon import PY, REPO, free_port, http_get


def test_parser_defaults():
    args = build_parser().parse_args(["run"])
    assert (args.capture, args.admin, args.metrics, args.readiness, args.access_log, args.admin_allow_remote) == (
        "nftables", "127.0.0.1:15000", "0.0.0.0:15020", "0.0.0.0:15021", None, False)
    assert build_parser().parse_args(["run", "--access-log"]).access_log == "-"  # no value: stdout
    for mode in ("auto", "ebpf", "iptables", "none"):
        assert build_parser().parse_args(["run", "--capture", mode]).capture == mode


def test_agent_without_capture_flag_uses_nftables(needs_root, needs_tool, tmp_path):
    needs_tool("nft")
    ready = free_port()
    admin = free_port()
    config = tmp_path / "config"
    config.mkdir()
    log = open(tmp_path / "agent.log", "w")
    proc = subprocess.Popen([PY, "-m", "nodeagent", "run", "--node", "node-1", "--state-dir", str(tmp_path / "state"),
                             "--config-dir", str(config), "--admin", f"127.0.0.1:{admin}",
                             "--metrics", f"127.0.0.1:{free_port()}", "--readiness", f"127.0.0.1:{ready}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            with contextlib.suppress(OSError):
                if http_get(ready, "/healthz/ready", timeout=0.5)[0] == 200:
                    break
            time.sleep(0.05)
        status, body = http_get(admin, "/workloads")
        assert status == 200 and json.loads(body)["capture_mode"] == "nftables", body
        state = json.loads((tmp_path / "state" / "workloads.json").read_text())
        assert state["capture"] == "nftables"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log.close()
