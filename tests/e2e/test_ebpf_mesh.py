"""The two-node mesh of tests/e2e with ``--capture ebpf`` instead of nftables.

Same harness (nodeagent.meshlab, the shop sample on node1/node2 + a CA node),
each agent with a pin directory of its own. The traffic scenarios of
test_mesh_traffic.py run here unchanged against this eBPF mesh (imported:
the module's ``shop`` fixture below replaces the nftables one), then the
eBPF specifics: what is attached where, agent restarts that never let a
connection bypass the proxy (refused, as with nftables: outbound inside the
client pod, inbound by the destination pod's kernel until the agent listens
again), and uninstall leaving nothing
pinned or attached.
"""
from __future__ import annotations

import os
import time

import pytest

from tests.conftest import require
from tests.e2e.conftest import _preconditions
# the nftables scenarios, run again on this module's eBPF mesh
from tests.e2e.test_mesh_traffic import (  # noqa: F401
    test_authorization_by_the_callers_identity,
    test_mutual_tls_on_the_wire_between_nodes,
    test_plain_curl_is_captured_on_both_nodes,
    test_routing_by_path_across_nodes,
    test_strict_mtls_refuses_a_plaintext_client,
)

REQ = "istio_requests_total"
SK_LOOKUP = 36
CGROUP_ATTACH_TYPES = (3, 10, 11, 21)   # sock_ops, inet4/6 connect, getsockopt


def _ebpf_lab():
    from nodeagent.meshlab import MeshLab

    return MeshLab(capture="ebpf")   # one --bpf-pin-dir per node agent (MeshLab.pin_dir)


@pytest.fixture(scope="module")
def shop():
    _preconditions()
    from bpf.loader import unavailable_reason
    require(unavailable_reason() is None, f"eBPF capture unavailable: {unavailable_reason()}")
    from nodeagent.meshlab import start_shop

    lab = _ebpf_lab()
    try:
        yield start_shop(lab)
    finally:
        problems = lab.teardown()
        for node in lab.nodes:   # also when a test failed half-way
            if os.path.exists(lab.pin_dir(node)):
                problems.append(f"{lab.pin_dir(node)} left behind")
        assert not problems, problems


def sk_lookup_programs(lab, pod: str) -> list[int]:
    from bpf import sys as bpfsys

    fd = os.open(f"/run/netns/{lab.topo.netns(pod)}", os.O_RDONLY)
    try:
        return bpfsys.prog_query(fd, SK_LOOKUP)
    finally:
        os.close(fd)


def linked_program_ids(pin_dir: str) -> set[int]:
    from bpf import sys as bpfsys

    ids = set()
    for name in os.listdir(f"{pin_dir}/links"):
        fd = bpfsys.obj_get(f"{pin_dir}/links/{name}")
        try:
            ids.add(bpfsys.link_info(fd)[1])
        finally:
            os.close(fd)
    return ids


def cgroup_root_programs() -> set[int]:
    from bpf import sys as bpfsys
    from bpf.loader import cgroup2_root

    fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {p for t in CGROUP_ATTACH_TYPES for p in bpfsys.prog_query(fd, t)}
    finally:
        os.close(fd)


def test_capture_is_ebpf_in_every_pod_and_no_nft_table(shop):
    lab = shop.lab
    for node in lab.nodes:
        links = set(os.listdir(f"{lab.pin_dir(node)}/links"))
        assert {"na_connect4", "na_connect6", "na_sockops", "na_getsockopt"} <= links, links
        here = [p for p in lab.pods.values() if p.node == node and p.enrolled]
        assert {f"na_inbound_{cookie}" for cookie in _cookies(lab, here)} <= links
        assert linked_program_ids(lab.pin_dir(node)) - set(_all_sk_lookup(lab)) <= cgroup_root_programs()
    for pod in lab.pods.values():
        assert lab.nft_tables(pod.name) == [], pod.name
        assert len(sk_lookup_programs(lab, pod.name)) == (1 if pod.enrolled else 0), pod.name


def _cookies(lab, pods) -> list[int]:
    from bpf.netns import netns_cookie

    return [netns_cookie(f"/run/netns/{lab.topo.netns(p.name)}") for p in pods]


def _all_sk_lookup(lab) -> list[int]:
    return [p for pod in lab.pods.values() for p in sk_lookup_programs(lab, pod.name)]


def test_agent_restarts_never_let_a_connection_bypass_the_proxy(shop):
    lab = shop.lab
    target = lab.pods["catalog-v2"]   # on node2
    direct = f"http://{target.ip}:{target.port}/newcatalog/direct"
    programs = _all_sk_lookup(lab)

    # node2's agent down: inbound to its pods is refused by their kernel (sk_lookup finds
    # no proxy listener), never handed to the application, from an outsider or through the mesh.
    assert lab.stop_agent("node2") == 0
    [r] = lab.curl("outsider", direct, max_time=2)
    assert r.status == 0 and r.exit_code == 7, r   # 7: couldn't connect
    [r] = shop.curl("client", "catalog", "/newcatalog/x", max_time=3)
    assert r.status != 200, r
    lab.start_agent("node2")
    lab.wait_certificates("node2")
    before = lab.count("node2", REQ, reporter="destination", destination_workload="catalog-v2",
                       response_code="200")
    [r] = shop.curl("client", "catalog", "/newcatalog/again")
    assert r.status == 200 and r.json()["pod"] == "catalog-v2", r
    assert lab.count("node2", REQ, reporter="destination", destination_workload="catalog-v2",
                     response_code="200") == before + 1
    # the outsider's plaintext reaches the NEW agent's 15006 again (which refuses it: STRICT)
    [r] = lab.curl("outsider", direct, max_time=3)
    assert r.status == 0 and r.exit_code != 0, r
    outsider = lab.pods["outsider"].ip
    assert _eventually(lambda: f"inbound shop/catalog-v2 <- {outsider}:" in lab.agent_log("node2")
                       and "plaintext refused" in lab.agent_log("node2")), lab.agent_log("node2")[-2000:]

    # node1's agent down: the client's connects go to its (closed) 15001: refused in its own namespace.
    assert lab.stop_agent("node1") == 0
    for url in (direct, shop.url("catalog", "/newcatalog/x")[0]):
        [r] = lab.curl("client", url, max_time=3)
        assert r.status == 0 and r.exit_code == 7, r   # 7: couldn't connect
    lab.start_agent("node1")
    lab.wait_certificates("node1")
    [r] = shop.curl("client", "catalog", "/newcatalog/back")
    assert r.status == 200 and r.json()["pod"] == "catalog-v2", r
    # the per-pod programs were re-adopted in place (swapped into the same links), not duplicated
    assert len(_all_sk_lookup(lab)) == len(programs)


def _eventually(check, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_uninstall_leaves_nothing_pinned_or_attached(shop):
    lab = shop.lab
    ours = set(_all_sk_lookup(lab))
    for node in lab.nodes:
        ours |= linked_program_ids(lab.pin_dir(node))
    for node in lab.nodes:
        assert lab.stop_agent(node) == 0
        out = lab.cli("uninstall", "--state-dir", lab.state_dir(node)).stdout
        assert "(mode ebpf)" in out, out
        assert not os.path.exists(lab.pin_dir(node))
    assert _all_sk_lookup(lab) == []
    assert cgroup_root_programs().isdisjoint(ours)
    # with nothing captured, the outsider reaches the application directly
    target = lab.pods["catalog-v2"]
    [r] = lab.curl("outsider", f"http://{target.ip}:{target.port}/newcatalog/plain", max_time=3)
    assert r.status == 200 and r.json()["pod"] == "catalog-v2", r
