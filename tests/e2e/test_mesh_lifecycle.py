"""Agent restart (fail closed, re-adoption), unenroll and uninstall on a real
two-node mesh, and a teardown that leaves nothing behind."""
from __future__ import annotations

import os
import subprocess

REQ = "istio_requests_total"


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_unenroll_then_uninstall_leave_zero_rules(shop):
    lab = shop.lab
    out = lab.cli("unenroll", "--netns", lab.topo.netns("client"), "--state-dir", lab.state_dir("node1")).stdout
    assert "removed" in out
    assert lab.nft_tables("client") == []
    # Enrolled pods keep theirs until uninstall.
    pods = [p for p in lab.pods.values() if p.enrolled and p.name != "client"]
    assert all(lab.nft_tables(p.name) == ["table inet nodeagent"] for p in pods)
    for node in lab.nodes:
        assert lab.stop_agent(node) == 0
        out = lab.cli("uninstall", "--state-dir", lab.state_dir(node)).stdout
        assert "(mode nftables)" in out
        assert not os.path.exists(lab.state_dir(node))
    for pod in lab.pods.values():
        assert lab.nft_tables(pod.name) == [], pod.name


def test_teardown_leaves_no_namespace_process_or_file(shop):
    lab = shop.lab
    made = set(lab.topo.namespaces)
    procs = [p.server for p in lab.pods.values() if p.server is not None] + [lab.ca_proc]
    assert made <= netns_names() and all(p.poll() is None for p in procs)
    assert lab.teardown() == []
    assert not made & netns_names()
    assert all(p.poll() is not None for p in procs)
    assert not os.path.exists(lab.dir)
