"""The agent with real kernel capture (nftables) in network namespaces this test
creates: enroll applies the in-pod rules, they survive an agent stop (fail
closed), a restart re-adopts them, unenroll and uninstall remove them."""
from __future__ import annotations

import contextlib
import secrets
import statistics
import subprocess
import time

import pytest

from nodeagent.agent.server import AgentClient
from tests.integration.test_agent_daemon import agents, cli, enroll_args  # noqa: F401  (fixture)


def nft_tables(netns: str) -> list[str]:
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{netns}", "--", "nft", "list", "tables"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.fixture
def namespaces(needs_root, needs_tool):
    needs_tool("nft")
    needs_tool("nsenter")
    made: list[str] = []

    def make(count: int) -> list[str]:
        prefix = f"naagt{secrets.token_hex(3)}"
        for i in range(count):
            name = f"{prefix}-{i}"
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
            made.append(name)
        return made[-count:]

    yield make
    for name in made:
        with contextlib.suppress(Exception):
            subprocess.run(["ip", "netns", "del", name], timeout=10)


def test_capture_applied_kept_while_down_readopted_and_removed(agents, namespaces, tmp_path):
    pods = namespaces(6)
    state = tmp_path / "state"
    agent = agents(state, capture="nftables", extra=("--exclude-outbound-ports", "5555",
                                                     "--probe-sources", "169.254.7.127"))
    agent.wait_ready()

    out = cli(state, *enroll_args("web", pods[0], "10.250.0.2"))
    assert "(capture applied, certificate issued," in out.stdout
    assert nft_tables(pods[0]) == ["table inet nodeagent"]
    ruleset = subprocess.run(["nsenter", f"--net=/var/run/netns/{pods[0]}", "--", "nft", "list", "table", "inet",
                              "nodeagent"], capture_output=True, text=True, timeout=10, check=True).stdout
    assert "5555" in ruleset and "169.254.7.127" in ruleset  # the --exclude-*/--probe-sources flags

    # Latency of an enroll round trip including the nft apply (verify + load + other-backend check).
    client = AgentClient(state / "agent.sock")
    samples, capture = [], []
    for i, pod in enumerate(pods[1:]):
        started = time.perf_counter()
        reply = client.call({"op": "enroll", "kind": "netns", "target": pod, "name": f"w{i}", "namespace": "shop",
                             "service_account": "sa", "ips": [f"10.250.2.{i + 1}"]})
        samples.append((time.perf_counter() - started) * 1000)
        capture.append(reply["capture_ms"])
        assert reply["ok"] and reply["capture"] == "applied", reply
    print(f"\nenroll round trip with nftables capture ({len(samples)}): p50 {statistics.median(samples):.1f} ms "
          f"(listeners + rules {statistics.median(capture):.1f} ms), max {max(samples):.1f} ms")

    # A netns that does not exist is refused (a typo); with --wait it is enrolled, capture
    # pending, in the retry set, health Degraded until it appears, then captured.
    later = f"{pods[0]}-later"
    typo = cli(state, *enroll_args("ghost", later, "10.250.0.99"), check=False)
    assert typo.returncode == 1 and f"network namespace /var/run/netns/{later} does not exist" in typo.stderr
    assert agent.json("/workloads")["retry"] == []
    missing = cli(state, *enroll_args("ghost", later, "10.250.0.99", "--wait"), check=False)
    assert missing.returncode == 3 and "capture is not applied yet" in missing.stderr
    assert f"shop/ghost (netns {later}): " in missing.stderr  # the reason names the workload
    view = agent.json("/workloads")
    assert [r["target"] for r in view["retry"]] == [later]
    assert agent.json("/healthz")["status"] == "Degraded"
    subprocess.run(["ip", "netns", "add", later], check=True, timeout=10)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and agent.json("/workloads")["retry"]:
            time.sleep(0.1)
        assert agent.json("/workloads")["retry"] == [] and nft_tables(later) == ["table inet nodeagent"]
        cli(state, "unenroll", "--netns", later)
        assert nft_tables(later) == []
    finally:
        subprocess.run(["ip", "netns", "del", later], timeout=10)

    # Stopped agent: the rules stay (fail closed).
    assert agent.stop() == 0
    assert nft_tables(pods[0]) == ["table inet nodeagent"]

    # Restart: re-adopted, capture re-applied idempotently (still exactly one table).
    agent2 = agents(state, capture="nftables")
    agent2.wait_ready()
    listed = AgentClient(state / "agent.sock").call({"op": "list"})["workloads"]
    assert sorted(w["target"] for w in listed) == sorted(pods)
    assert all(w["capture"] == "applied" for w in listed)
    assert nft_tables(pods[0]) == ["table inet nodeagent"]

    cli(state, "unenroll", "--netns", pods[0])
    assert nft_tables(pods[0]) == []
    assert agent2.stop() == 0

    # Uninstall: every enrolled namespace is cleaned, the state dir goes.
    out = cli(state, "uninstall")
    assert "capture removed for 5 workload(s) (mode nftables)" in out.stdout
    for pod in pods:
        assert nft_tables(pod) == []
    assert not state.exists()


def test_a_pod_gone_without_unenroll_is_reported_and_its_listeners_closed(agents, namespaces, tmp_path):
    (pod,) = namespaces(1)
    state = tmp_path / "state"
    agent = agents(state, capture="nftables", extra=("--resync-interval", "0.3"))
    agent.wait_ready()
    cli(state, *enroll_args("web", pod, "10.250.0.2"))
    assert [e["workload"] for e in agent.json("/workloads")["listeners"]] == ["shop/web"]
    subprocess.run(["ip", "netns", "del", pod], check=True, timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and agent.json("/workloads")["listeners"]:
        time.sleep(0.1)
    view = agent.json("/workloads")
    assert view["listeners"] == []
    assert view["enrolled"][0]["capture"] == "pending"
    assert "does not exist (pod gone?)" in view["retry"][0]["last_error"]
    assert agent.json("/healthz")["status"] == "Degraded"
    cli(state, "unenroll", "--workload", "shop/web")
    assert agent.json("/healthz")["status"] == "OK"
    assert agent.stop() == 0


def test_changing_the_capture_mode_removes_the_previous_rules(agents, namespaces, tmp_path):
    (pod,) = namespaces(1)
    state = tmp_path / "state"
    agent = agents(state, capture="nftables")
    agent.wait_ready()
    cli(state, *enroll_args("web", pod, "10.250.0.2"))
    assert nft_tables(pod) == ["table inet nodeagent"]
    assert agent.stop() == 0
    agent = agents(state, capture="none")  # e.g. an operator turns transparent capture off
    agent.wait_ready()
    assert nft_tables(pod) == []
    listed = AgentClient(state / "agent.sock").call({"op": "list"})["workloads"]
    assert [(w["name"], w["capture"]) for w in listed] == [("web", "none")]  # still enrolled
    assert "capture mode changed from nftables to none" in agent.logs()
    assert agent.stop() == 0
