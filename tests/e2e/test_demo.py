"""`make demo` end to end: the live report (the demo checks its own results
and exits 1 on any surprise), Ctrl-C tearing everything down, and the
config-only mode without root."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def prefix_of(output: str) -> str:
    m = re.search(r"\(namespace (na[0-9a-f]+)-n\d+\)", output)
    assert m, output
    return m.group(1)


def demo(**kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nodeagent.demo"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.root
@pytest.mark.slow
def test_demo_reports_what_the_mesh_did_and_cleans_up(needs_root):
    proc = demo()
    try:
        out, _ = proc.communicate(timeout=100)  # under pytest's 120 s per test
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    for line in ("8 requests, end-user: jason   : reviews-v2 8",
                 "10 x GET /newcatalog/items    : catalog-v2 10",
                 "shop/shop-client GET reviews        -> HTTP 403 'RBAC: access denied'",
                 "marker in the request body on the wire       : not seen: the hop went over the 15008 tunnel",
                 "catalog-v1b 10.250.2.5:8080 EJECTED",
                 "everything as the configuration says"):
        assert line in out, f"{line!r} not in the demo's report:\n{out}"
    assert re.search(r"node2  destination shop/shop-client\s+reviews-v\d\s+403\s+mutual_tls", out), out
    # 8 requests for end-user tester, each delayed 2 s, each 200 or 503 (50 % aborted)
    assert len(re.findall(r"HTTP (?:200|503) after (?:[2-9]|\d\d)\.\d s", out)) == 8, out
    prefix = prefix_of(out)
    assert not [n for n in netns_names() if n.startswith(prefix + "-")]


@pytest.mark.root
@pytest.mark.slow
def test_demo_ctrl_c_tears_everything_down(needs_root):
    proc = demo()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("mesh up" in line for line in seen):
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        assert any("mesh up" in line for line in seen), "".join(seen)
        prefix = prefix_of("".join(seen))
        ours = sorted(n for n in netns_names() if n.startswith(prefix + "-"))
        assert len(ours) == 13  # 2 nodes + control + 10 pods
        pids = {int(p) for n in ours for p in subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                                             text=True, timeout=10).stdout.split()}
        assert len(pids) >= 11  # 2 agents, the CA, 8 pod servers
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=40)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    out = "".join(seen)
    assert proc.returncode == 130 and "interrupted: torn down" in out, out
    assert not [n for n in netns_names() if n.startswith(prefix + "-")]
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]


def test_demo_config_only_explains_what_would_be_enforced():
    # What the demo runs without root; --config-only asks for it as root too (no privilege needed).
    proc = subprocess.run([sys.executable, "-m", "nodeagent.demo", "--config-only"], cwd=REPO,
                          capture_output=True, text=True, timeout=100)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "the configuration pipeline only" in out
    assert "reviews.shop.svc.cluster.local:9080 -> 10.250.200.4" in out
    # the shop-client caller is denied on reviews; plaintext is refused by STRICT
    block = out.split("-- shop-client -> reviews", 1)[1].split("\n-- ", 1)[0]
    assert "Verdict: DENIED" in block, block
    block = out.split("-- productpage -> reviews as jason", 1)[1].split("\n-- ", 1)[0]
    assert "Verdict: ALLOWED" in block and "route jason" in block, block
    block = out.split("-- plaintext -> catalog-v2", 1)[1]
    assert "REFUSED (plaintext)" in block, block
