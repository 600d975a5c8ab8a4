"""Node probes (kubelet-style health checks) reach STRICT pods by default.

One node (+ the CA node) built once: pod ``web`` in namespace ``shop`` under a
STRICT PeerAuthentication, enrolled into a real ``nodeagent run``, and a
never-enrolled pod ``outsider``. For each capture mode the agent is started,
``web`` enrolled, and:

- an HTTP GET from the node's own namespace (curl there: a local socket of
  the node) reaches web's application uncaptured; the application sees the
  probe address 169.254.7.127 as its peer;
- the outsider's plaintext GET to the same port is still refused (STRICT):
  forwarded pod traffic is never SNATed;
- unenroll removes the node's SNAT rule (no pod left) and uninstall leaves no
  nodeagent rule in the node or the pod.

No ``--probe-sources`` is passed: this is the default.
"""
from __future__ import annotations

import os
import shutil

import pytest

from tests.e2e.conftest import save_logs
from tests.conftest import require

pytestmark = [pytest.mark.root, pytest.mark.slow]

PROBE = "169.254.7.127"
STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
spec:
  mtls:
    mode: STRICT
"""


@pytest.fixture(scope="module")
def lab(request):
    require(os.geteuid() == 0, "needs root (network namespaces, nftables)")
    for tool in ("nft", "nsenter", "curl", "ip", "iptables-nft-save"):
        require(shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None,
                f"needs the {tool} command")
    from nodeagent.meshlab import MeshLab

    lab = MeshLab(capture="nftables")
    failed = False
    try:
        lab.build(["node1"])
        web = lab.add_pod("node1", "web", namespace="shop", service_account="web", labels={"app": "web"},
                          port=8080)
        lab.add_pod("node1", "outsider", namespace="legacy", labels={"app": "outsider"}, port=8080)
        lab.write_config(STRICT)
        lab.place_all([web])
        lab.start_server(web)
        lab.wait_servers()
        yield lab
    except BaseException:
        failed = True
        raise
    finally:
        if failed or getattr(request.module, "_meshlab_failed", False):
            import warnings
            warnings.warn(f"e2e probe lab logs kept in {save_logs(lab)}")
        problems = lab.teardown()
        assert not problems, problems


def node_rules(lab, ns: str) -> list[str]:
    """Every nodeagent table (nft) and chain/jump line (both iptables backends) in a namespace."""
    out = [t for t in lab.nft_tables(ns) if "nodeagent" in t]
    for tool in ("iptables-nft-save", "iptables-legacy-save"):
        saved = lab.exec(ns, [tool, "-t", "nat"], check=True).stdout
        out += [line for line in saved.splitlines() if "NODEAGENT" in line]
    return out


@pytest.mark.parametrize("capture", ["nftables", "iptables", "ebpf"])
def test_node_probe_reaches_strict_pod_and_outsider_is_refused(lab, capture):
    if capture == "ebpf":
        from bpf.loader import unavailable_reason
        require(unavailable_reason() is None, f"eBPF capture unavailable: {unavailable_reason()}")
    web, node = lab.pods["web"], "node1"
    url = f"http://{web.ip}:{web.port}/healthz"
    lab.start_agent(node, capture=capture)
    try:
        lab.enroll(web)
        lab.wait_certificates(node)

        [probe] = lab.curl(node, url)
        assert probe.status == 200, (probe, lab.agent_log(node)[-2000:])
        assert probe.json()["pod"] == "web" and probe.json()["peer"] == PROBE, probe
        # kubelet probes repeatedly, on new connections: each one gets through
        assert [r.status for r in lab.curl(node, url, count=3)] == [200, 200, 200]

        [refused] = lab.curl("outsider", url)
        assert refused.status == 0 and refused.exit_code != 0, refused  # STRICT: plaintext captured, refused

        rules = node_rules(lab, node)
        if capture == "iptables":
            assert any("-j SNAT --to-source 169.254.7.127" in r and web.ip in r for r in rules), rules
        else:  # nftables, and eBPF's node plan (nft)
            assert "table inet nodeagent-node" in rules, rules

        lab.cli("unenroll", "--netns", lab.topo.netns("web"), "--state-dir", lab.state_dir(node))
        web.enrolled = False
        assert node_rules(lab, node) == []  # no pod left: no SNAT rule on the node
        [plain] = lab.curl(node, url)  # not enrolled any more: not captured, not rewritten
        assert plain.status == 200 and plain.json()["peer"] != PROBE, plain

        # Enrolled again, then the agent stops and `nodeagent uninstall` runs on the node.
        lab.enroll(web)
        assert node_rules(lab, node) != []
        assert lab.stop_agent(node) == 0
        out = lab.cli("uninstall", "--state-dir", lab.state_dir(node)).stdout
        assert f"(mode {capture})" in out, out
        web.enrolled = False
        assert node_rules(lab, node) == [] and node_rules(lab, "web") == []
    finally:
        lab.stop_agent(node)
