"""Traffic through a real two-node mesh: capture on both sides, routing,
load balancing and outlier detection across nodes, authorization by the
caller's real (mTLS) identity, STRICT mTLS, and what is on the wire.

Pods (see nodeagent.meshlab.SHOP_PLACEMENT): node1 runs productpage-v1,
ratings-v1, catalog-v1a, the enrolled ``client`` (shop/shop-client) and the
never-enrolled ``outsider`` (namespace legacy); node2 runs reviews-v1/v2/v3,
catalog-v1b (answers 503) and catalog-v2.
"""
from __future__ import annotations

import collections

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]


REQ = "istio_requests_total"


def versions(results) -> collections.Counter:
    return collections.Counter(r.json()["pod"] if r.status == 200 else r.status for r in results)


def test_plain_curl_is_captured_on_both_nodes(shop):
    lab = shop.lab
    src = dict(reporter="source", source_workload="client", destination_workload="catalog-v2",
               response_code="200")
    dst = dict(reporter="destination", source_principal="cluster.local/ns/shop/sa/shop-client",
               destination_workload="catalog-v2", response_code="200")
    before_src, before_dst = lab.count("node1", REQ, **src), lab.count("node2", REQ, **dst)

    [r] = shop.curl("client", "catalog", "/newcatalog/items")

    assert r.status == 200, r
    body = r.json()
    assert body["pod"] == "catalog-v2" and body["path"] == "/newcatalog/items"
    # The client dialled a virtual IP nobody listens on: only the agents can have answered.
    assert lab.count("node1", REQ, **src) == before_src + 1  # outbound, node1's agent
    assert lab.count("node2", REQ, **dst) == before_dst + 1  # inbound, node2's agent


def test_outlier_detection_ejects_the_failing_endpoint(shop):
    # catalog v1 = catalog-v1a (node1) + catalog-v1b (node2, always 503); LEAST_CONN;
    # consecutiveErrors: 5 (gateway errors). No retries in the route, so Istio's
    # default applies (2 retries, 503 retriable, on another host): the client sees
    # only v1a's 200s while v1b's 503s count towards its ejection.
    lab = shop.lab
    results = shop.curl("client", "catalog", "/items", count=30)
    assert versions(results) == {"catalog-v1a": 30}, [r.status for r in results]
    view = lab.admin("node1", "/endpoints")
    [cluster] = [c for c in view["clusters"] if c["cluster"] == "outbound|80|v1|catalog.shop.svc.cluster.local"]
    state = {e["address"]: e for e in cluster["endpoints"]}
    assert state[lab.pods["catalog-v1b"].ip]["ejected"] is True, cluster
    assert state[lab.pods["catalog-v1a"].ip]["ejected"] is False, cluster


def test_routing_by_path_across_nodes(shop):
    new = shop.curl("client", "catalog", "/newcatalog/x", count=12)
    assert versions(new) == {"catalog-v2": 12}
    old = shop.curl("client", "catalog", "/items", count=12)
    assert versions(old) == {"catalog-v1a": 12}


def test_weighted_and_header_routing_to_reviews_on_the_other_node(shop):
    jason = shop.curl("productpage-v1", "reviews", "/reviews", headers={"end-user": "jason"}, count=8)
    assert versions(jason) == {"reviews-v2": 8}
    split = versions(shop.curl("productpage-v1", "reviews", "/reviews", count=30))
    assert set(split) <= {"reviews-v1", "reviews-v2", "reviews-v3"} and split["reviews-v1"] >= 12, split


def test_authorization_by_the_callers_identity(shop):
    lab = shop.lab
    denied_at_node2 = dict(reporter="destination", response_code="403",
                           source_principal="cluster.local/ns/shop/sa/shop-client")
    before = lab.count("node2", REQ, **denied_at_node2)
    # reviews (node2) allows only productpage's service account, GET only.
    [ok] = shop.curl("productpage-v1", "reviews", "/reviews")
    assert ok.status == 200, ok
    [denied] = shop.curl("client", "reviews", "/reviews")
    assert denied.status == 403 and denied.body.strip() == "RBAC: access denied", denied
    [post] = shop.curl("productpage-v1", "reviews", "/reviews", method="POST", data="x")
    assert post.status == 403 and post.body.strip() == "RBAC: access denied", post
    # catalog denies DELETE to everyone and allows the rest.
    [delete] = shop.curl("client", "catalog", "/newcatalog/1", method="DELETE")
    assert delete.status == 403 and delete.body.strip() == "RBAC: access denied", delete
    assert shop.curl("client", "catalog", "/newcatalog/1")[0].status == 200
    # Decided by the destination node, on the identity the client certificate proved.
    assert lab.count("node2", REQ, **denied_at_node2) == before + 2


def test_strict_mtls_refuses_a_plaintext_client(shop):
    """STRICT (namespace shop) is what refuses the outsider: node2's agent accepts the
    captured plaintext connection and resets it, and logs that refusal for that very
    connection (the outsider's address and source port); with a PERMISSIVE
    PeerAuthentication for that pod the same outsider reaches the same pod (plaintext,
    counted by node2 as connection_security_policy "none"); once that is removed, STRICT
    refuses again.

    curl's exit code alone cannot tell a reset from other failures: a reset that lands
    before curl checks its non-blocking connect is reported as 7 ("Couldn't connect", as
    for a refused or unroutable address), later ones as 56 (or 55). So a small socket
    client run in the outsider's namespace reports the errno and its source port."""
    import json
    import os
    import sys
    import time

    lab = shop.lab
    target, outsider = lab.pods["catalog-v2"], lab.pods["outsider"]
    url = f"http://{target.ip}:{target.port}/newcatalog/direct"
    reason = f"refused: PeerAuthentication STRICT for shop/catalog-v2 port {target.port}: plaintext refused"
    plaintext_ok = dict(reporter="destination", destination_workload="catalog-v2", response_code="200",
                        connection_security_policy="none")
    probe_code = """if True:
        import errno, json, socket, sys
        s = socket.socket()
        s.settimeout(5)
        s.bind(("0.0.0.0", 0))
        out = {"local_port": s.getsockname()[1]}
        try:
            s.connect((sys.argv[1], int(sys.argv[2])))
            s.sendall(b"GET /newcatalog/direct HTTP/1.1\\r\\nHost: catalog\\r\\nConnection: close\\r\\n\\r\\n")
            data = s.recv(65536)
            out["outcome"] = "response" if data else "eof"
            out["first_line"] = data.split(b"\\r\\n")[0].decode("latin-1")
        except socket.timeout:
            out["outcome"] = "timeout"
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            out["outcome"] = "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else name
        print(json.dumps(out))
    """

    def log_lines() -> list[str]:
        return lab.agent_log("node2").splitlines()

    def probe() -> dict:
        since = len(log_lines())
        proc = lab.exec("outsider", [sys.executable, "-c", probe_code, target.ip, str(target.port)], timeout=15)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout), log_since=since)

    def refusals(port: int | None = None, since: int = 0) -> int:
        src = f"inbound shop/catalog-v2 <- {outsider.ip}:{port if port is not None else ''}"
        return sum(1 for line in log_lines()[since:] if src in line and line.endswith(reason))

    def until(fn, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value or time.monotonic() >= deadline:
                return value
            time.sleep(0.2)

    def assert_refused_by_strict(r: dict) -> None:
        assert r["outcome"] == "reset", r  # accepted (captured by node2's agent), then reset
        assert until(lambda: refusals(r["local_port"], r["log_since"]) == 1), \
            f"no STRICT refusal logged for {outsider.ip}:{r['local_port']}:\n{lab.agent_log('node2')[-2000:]}"

    # The outsider (namespace legacy, never enrolled) talks plaintext straight to the pod.
    assert_refused_by_strict(probe())
    before = refusals()
    [refused] = lab.curl("outsider", url)
    assert refused.status == 0 and refused.exit_code in (7, 55, 56), refused
    assert until(lambda: refusals() == before + 1), "curl's failure was node2's STRICT refusal"

    # Positive control: a workload-level PERMISSIVE for catalog-v2 (overrides the namespace's
    # STRICT). The same outsider, same address, now reaches the pod through node2's agent.
    override = os.path.join(lab.config_dir, "zz-permissive-catalog-v2.yaml")
    counted = lab.count("node2", REQ, **plaintext_ok)
    try:
        with open(override + ".tmp", "w") as fh:
            fh.write("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n"
                     "  name: catalog-v2-permissive\n  namespace: shop\nspec:\n  selector:\n"
                     "    matchLabels:\n      app: catalog\n      version: v2\n"
                     "  mtls:\n    mode: PERMISSIVE\n")
        os.replace(override + ".tmp", override)
        admitted = until(lambda: (lambda r: r if r["outcome"] == "response" else None)(probe()))
        assert admitted and admitted["first_line"] == "HTTP/1.1 200 OK", admitted
        assert refusals(admitted["local_port"], admitted["log_since"]) == 0
        [ok] = lab.curl("outsider", url)
        assert ok.status == 200 and ok.json()["pod"] == "catalog-v2" and ok.json()["path"] == "/newcatalog/direct", ok
        assert until(lambda: lab.count("node2", REQ, **plaintext_ok) >= counted + 2), \
            "node2's agent served both plaintext requests (connection_security_policy none)"
    finally:
        os.remove(override)
    # Restored: STRICT refuses the same connection again.
    again = until(lambda: (lambda r: r if r["outcome"] != "response" else None)(probe()))
    assert again, "STRICT was not restored"
    assert_refused_by_strict(again)

    # The same pod through the mesh, from an enrolled pod: both agents, mTLS.
    [ok] = shop.curl("client", "catalog", "/newcatalog/direct")
    assert ok.status == 200 and ok.json()["pod"] == "catalog-v2", ok
    assert ok.json()["body_bytes"] == 0


def test_mutual_tls_on_the_wire_between_nodes(shop):
    lab = shop.lab
    marker = b"MESHLAB-PLAINTEXT-MARKER-7f3a91"
    body = marker * 4
    target = lab.pods["catalog-v2"]
    with lab.sniff("node2", "node1") as wire:
        # Control: a UDP datagram (never captured) shows the sniffer sees plaintext on this link.
        lab.send_udp("client", target.ip, 9999, marker + b"-udp")
        [r] = shop.curl("client", "catalog", "/newcatalog/upload", method="POST", data=body.decode())
    assert r.status == 200 and r.json()["body_bytes"] == len(body), r  # the server got the body
    assert wire.contains(marker + b"-udp"), "the sniffer saw nothing on the node link"
    ports = wire.tcp_ports()
    assert 15008 in ports and target.port not in ports, sorted(ports)  # the tunnel, not the app port
    assert not wire.contains(marker * 2), "the request body crossed the node link in plaintext"
    assert lab.count("node2", REQ, reporter="destination", destination_workload="catalog-v2",
                     connection_security_policy="mutual_tls") >= 1
