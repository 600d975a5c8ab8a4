"""Enrolling a target that does not exist is refused (a typo must not persist or mint
an identity), unless the caller asks to wait for it; and the flags of `nodeagent run`
that are refused before anything starts (--admin off loopback, --node).

The real agent as a subprocess (tests/integration/test_agent_daemon.py's harness)."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nodeagent.cli import UserError
from nodeagent.commands.run import check_admin_address, check_node_name
from tests.integration.test_agent_daemon import PY, REPO, agents, call, cli  # noqa: F401  (fixture)


def enroll(state: Path, *target: str, name: str = "web", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return cli(state, "enroll", *target, "--name", name, "--namespace", "shop", "--service-account", f"{name}-sa",
               *extra, check=False)


def assert_nothing_enrolled(agent, state: Path) -> None:
    assert call(state, {"op": "list"})["workloads"] == []
    assert json.loads((state / "workloads.json").read_text())["workloads"] == []
    assert agent.json("/certs")["certificates"] == []  # no identity minted


def test_missing_targets_are_refused_unless_waited_for(agents, tmp_path):
    state = tmp_path / "state"
    agent = agents(state)  # --capture none: the check does not depend on the capture mode
    agent.wait_ready()

    typo = enroll(state, "--netns", "no-such-pod-netns")
    assert typo.returncode == 1 and typo.stdout == "" and "Traceback" not in typo.stderr
    assert typo.stderr.startswith("nodeagent: network namespace /var/run/netns/no-such-pod-netns does not exist: "
                                  "shop/web not enrolled, no identity issued. Check the name (`ip netns list`), "
                                  "or pass --wait"), typo.stderr
    assert_nothing_enrolled(agent, state)

    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    wrong = enroll(state, "--netns", str(not_a_netns))
    assert wrong.returncode == 1
    assert f"nodeagent: {not_a_netns} is not a network namespace" in wrong.stderr

    cgroup = f"/nodeagent-test-{secrets.token_hex(3)}.slice/typo.service"
    missing_cgroup = enroll(state, "--cgroup", cgroup)
    assert missing_cgroup.returncode == 1
    assert f"nodeagent: cgroup {cgroup} does not exist (no directory " in missing_cgroup.stderr
    assert f"{cgroup}): shop/web not enrolled, no identity issued. Check the path" in missing_cgroup.stderr
    assert_nothing_enrolled(agent, state)

    # The wire protocol (the CNI plugin's call) refuses it the same way.
    reply = call(state, {"op": "enroll", "kind": "netns", "target": "no-such-pod-netns", "name": "web",
                         "namespace": "shop"})
    assert reply["ok"] is False and "does not exist" in reply["error"]
    assert call(state, {"op": "enroll", "kind": "netns", "target": "x", "name": "web", "namespace": "shop",
                        "wait": "yes"}) == {"ok": False, "error": "enroll: wait must be true or false, got 'yes'"}

    # A real namespace (this test's own, by /proc path) is enrolled.
    real = enroll(state, "--netns", f"/proc/{os.getpid()}/ns/net")
    assert real.returncode == 0 and real.stdout.startswith(f"added: shop/web on netns /proc/{os.getpid()}/ns/net")

    # --wait: enrolled ahead of its namespace (identity issued now; captured when it appears).
    ahead = enroll(state, "--netns", "pod-to-come", name="db", extra=("--wait",))
    assert ahead.returncode == 0 and ahead.stdout.startswith("added: shop/db on netns pod-to-come"), ahead.stderr
    assert sorted(w["name"] for w in call(state, {"op": "list"})["workloads"]) == ["db", "web"]
    # Re-enrolling it without --wait while the namespace is still missing: refused, and it says
    # the earlier enrollment stands.
    again = enroll(state, "--netns", "pod-to-come", name="db")
    assert again.returncode == 1 and "shop/db stays enrolled from before" in again.stderr
    assert agent.stop() == 0


def test_run_refuses_remote_admin_and_bad_node_names(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "nodeagent", "run", "--state-dir", str(tmp_path / "s"), "--capture", "none",
                               "--config-dir", str(tmp_path), "--metrics", "127.0.0.1:0",
                               "--readiness", "127.0.0.1:0", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=30)

    # The command refuses them (one process each: the wiring) ...
    proc = run("--node", "node-1", "--admin", "0.0.0.0:15000")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("nodeagent: --admin 0.0.0.0:15000 is not a loopback address: the admin API has "
                                  "no authentication"), proc.stderr
    assert "--admin-allow-remote" in proc.stderr
    proc = run("--node=Node_1", "--admin", "127.0.0.1:0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("nodeagent: --node 'Node_1' is not a valid node name"), proc.stderr
    # ... by these rules (in-process: no interpreter start per case).
    for admin in (("::", 15000), ("10.250.0.1", 15000), ("192.0.2.1", 1)):
        with pytest.raises(UserError, match="is not a loopback address"):
            check_admin_address(admin, allow_remote=False)
        check_admin_address(admin, allow_remote=True)
    for admin in (("127.0.0.1", 15000), ("127.0.0.2", 1), ("::1", 15000)):
        check_admin_address(admin, allow_remote=False)
    for node in ("Node-1", "node_1", "-node", "node-", "node..1", ".node", "a" * 254, ""):
        with pytest.raises(UserError, match="is not a valid node name"):
            check_node_name(node)
    for node in ("node-1", "n", "worker-1.example.com", "ip-10-0-0-1.ec2.internal", "a" * 253):
        check_node_name(node)
    assert not (tmp_path / "s").exists()  # refused before the state dir is touched


def test_remote_admin_when_allowed_explicitly(agents, tmp_path):
    # A valid node name with dots, and --admin-allow-remote with a loopback address: starts as usual.
    agent = agents(tmp_path / "state", extra=("--node", "worker-1.example.com", "--admin-allow-remote"))
    agent.wait_ready()
    assert agent.json("/healthz")["node"] == "worker-1.example.com"
    assert agent.stop() == 0
    # With a non-loopback address it goes on to bind it (here a port held by a socket that is
    # bound but never listens, so nothing is exposed): the bind error, not the loopback refusal.
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        port = held.getsockname()[1]
        proc = subprocess.run([PY, "-m", "nodeagent", "run", "--state-dir", str(tmp_path / "s"), "--capture", "none",
                               "--node", "node-1", "--config-dir", str(tmp_path), "--admin-allow-remote",
                               "--admin", f"0.0.0.0:{port}", "--metrics", "127.0.0.1:0",
                               "--readiness", "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"nodeagent: admin cannot listen on 0.0.0.0:{port}: Address already in use" in proc.stderr


def test_cgroup_that_does_not_exist_yet_is_named_then_captured_when_it_appears(agents, needs_root, needs_tool,
                                                                               tmp_path):
    """--capture nftables, --wait: the pending reason names the workload and the cgroup path
    (nft alone says "cgroupv2 path fails" under a caret); once the cgroup exists, the
    agent's retry applies the host capture."""
    needs_tool("nft")
    from redirect import cgroup2_mount

    mount = cgroup2_mount().rstrip("/")
    cgroup = f"/nodeagent-test-{secrets.token_hex(3)}"
    state = tmp_path / "state"
    agent = agents(state, capture="nftables")
    agent.wait_ready()
    try:
        out = enroll(state, "--cgroup", cgroup, name="batch", extra=("--wait",))
        assert out.returncode == 3, out.stdout + out.stderr
        assert "capture pending" in out.stdout
        assert (f"shop/batch (cgroup {cgroup}): nftables host capture not applied: cgroup {mount}{cgroup} of "
                f"shop/batch does not exist") in out.stderr, out.stderr
        assert "^^^" not in out.stderr  # nft's caret line is dropped once the cause is named
        os.mkdir(mount + cgroup)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            (w,) = call(state, {"op": "list"})["workloads"]
            if w["capture"] == "applied":
                break
            time.sleep(0.1)
        assert w["capture"] == "applied", agent.json("/workloads")
        ruleset = subprocess.run(["nft", "list", "table", "inet", "nodeagent"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
        assert cgroup.lstrip("/") in ruleset
        assert cli(state, "unenroll", "--cgroup", cgroup).returncode == 0
        assert agent.stop() == 0
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(mount + cgroup)
        subprocess.run(["nft", "delete", "table", "inet", "nodeagent"], capture_output=True, timeout=10)
