"""The two-node mesh with ``--capture iptables`` (owned NODEAGENT-* chains in
each pod's nat table) instead of the nftables default: the traffic scenarios
of test_mesh_traffic.py run unchanged on it, then unenroll/uninstall must leave
no nodeagent chain or jump in any pod."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import shop_fixture
# the nftables scenarios, run again on this module's iptables mesh
from tests.e2e.test_mesh_traffic import (  # noqa: F401
    test_authorization_by_the_callers_identity,
    test_mutual_tls_on_the_wire_between_nodes,
    test_outlier_detection_ejects_the_failing_endpoint,
    test_plain_curl_is_captured_on_both_nodes,
    test_routing_by_path_across_nodes,
    test_strict_mtls_refuses_a_plaintext_client,
    test_weighted_and_header_routing_to_reviews_on_the_other_node,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


shop = shop_fixture("iptables")


def nodeagent_rules(lab, pod: str) -> list[str]:
    lines = []
    for tool in ("iptables-nft-save", "iptables-legacy-save"):
        out = lab.exec(pod, [tool, "-t", "nat"], check=True).stdout
        lines += [line for line in out.splitlines() if "NODEAGENT" in line or "nodeagent" in line]
    return lines


def test_capture_is_iptables_and_unenroll_uninstall_remove_it(shop):
    lab = shop.lab
    enrolled = [p for p in lab.pods.values() if p.enrolled]
    for pod in enrolled:
        rules = nodeagent_rules(lab, pod.name)
        assert any("-j REDIRECT --to-ports 15001" in r for r in rules), rules
        assert "table inet nodeagent" not in lab.nft_tables(pod.name)  # no nftables capture table
    lab.cli("unenroll", "--netns", lab.topo.netns("client"), "--state-dir", lab.state_dir("node1"))
    assert nodeagent_rules(lab, "client") == []
    for node in lab.nodes:
        assert lab.stop_agent(node) == 0
        assert "(mode iptables)" in lab.cli("uninstall", "--state-dir", lab.state_dir(node)).stdout
    for pod in enrolled:
        assert nodeagent_rules(lab, pod.name) == [], pod.name
