"""Agent restart (fail closed, re-adoption), unenroll and uninstall on a real
two-node mesh, and a teardown that leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

REQ = "istio_requests_total"


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_agent_restart_fails_closed_then_readopts(shop):
    lab = shop.lab
    target = lab.pods["catalog-v2"]
    direct = f"http://{target.ip}:{target.port}/newcatalog/direct"
    [before] = shop.curl("client", "catalog", "/newcatalog/before")
    assert before.status == 200 and before.json()["pod"] == "catalog-v2", before
    tables_before = lab.nft_tables("client")
    assert tables_before == ["table inet nodeagent"]

    assert lab.stop_agent("node1") == 0
    # Stopped agent: the rules stay, nothing listens on 15001 in the pod, so the
    # connection is refused inside the client's own namespace; it never reaches
    # the server directly (neither by the pod IP nor by the service address).
    for url in (direct, shop.url("catalog", "/newcatalog/x")[0]):
        [r] = lab.curl("client", url, max_time=3)
        assert r.status == 0 and r.exit_code == 7, r  # 7: couldn't connect
    assert lab.nft_tables("client") == tables_before

    lab.start_agent("node1")
    listed = json.loads(lab.cli("workloads", "--json", "--state-dir", lab.state_dir("node1")).stdout)
    enrolled_here = sorted(p.name for p in lab.pods.values() if p.node == "node1" and p.enrolled)
    assert sorted(w["name"] for w in listed) == enrolled_here
    assert all(w["capture"] == "applied" for w in listed), listed
    lab.wait_certificates("node1")
    # Traffic flows again, counted by the new agent process.
    [r] = shop.curl("client", "catalog", "/newcatalog/again")
    assert r.status == 200 and r.json()["pod"] == "catalog-v2", r
    assert lab.count("node1", REQ, reporter="source", source_workload="client", response_code="200") == 1
    assert lab.nft_tables("client") == tables_before  # re-adopted, not duplicated


def test_destination_agent_down_nothing_reaches_the_pod_then_resumes(shop):
    lab = shop.lab
    target = lab.pods["catalog-v2"]
    assert lab.stop_agent("node2") == 0
    # Plaintext straight to the pod: its prerouting rule sends it to 15006, where
    # nothing listens now: refused in the pod's namespace, the app never sees it.
    [plain] = lab.curl("outsider", f"http://{target.ip}:{target.port}/newcatalog/x", max_time=3)
    assert plain.status == 0 and plain.exit_code == 7, plain
    # Through the mesh: node1's agent finds no tunnel listener on node2's pod.
    [meshed] = shop.curl("client", "catalog", "/newcatalog/x", max_time=5)
    assert meshed.status == 503 and '"pod"' not in meshed.body, meshed
    assert lab.nft_tables("catalog-v2") == ["table inet nodeagent"]
    lab.start_agent("node2")
    lab.wait_certificates("node2")
    [r] = shop.curl("client", "catalog", "/newcatalog/again")
    assert r.status == 200 and r.json()["pod"] == "catalog-v2", r
    assert lab.count("node2", REQ, reporter="destination", destination_workload="catalog-v2",
                     response_code="200", connection_security_policy="mutual_tls") == 1


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
