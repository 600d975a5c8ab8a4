"""`nodeagent proxy --workers 2`: outlier detection and connection-pool limits are
counted once per cluster across the workers, as Envoy counts them across its threads.

Real proxy processes, real loopback upstreams. Requests are spread over both workers
deterministically: client keep-alive connections are opened until each worker (told
apart by the access log's ``worker`` pid) holds some, then the test chooses the
connection, hence the worker, of every request.
"""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from tests.integration.proxy_harness import ProxyProcess, catalog_config, metric_value, service_config
from tests.integration.upstream import UpstreamServer

CATALOG = "catalog.shop.svc.cluster.local"
POOL = "pool.shop.svc.cluster.local"


def connections_by_worker(proxy: ProxyProcess, host: str, path: str, per_worker: int) -> list[list]:
    """``per_worker`` keep-alive client connections on each of the proxy's two workers."""
    by_worker: dict[int, list] = {}
    spare = []
    for _ in range(60):
        if len(by_worker) == 2 and all(len(c) >= per_worker for c in by_worker.values()):
            break
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        seen = len(proxy.stdout)
        conn.request("GET", path, headers={"host": host})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        deadline = time.monotonic() + 3
        while len(proxy.stdout) <= seen and time.monotonic() < deadline:
            time.sleep(0.01)
        worker = json.loads(proxy.stdout[seen])["worker"]
        group = by_worker.setdefault(worker, [])
        (group if len(group) < per_worker else spare).append(conn)
    for conn in spare:
        conn.close()
    groups = list(by_worker.values())
    assert len(groups) == 2 and all(len(g) >= per_worker for g in groups), "the kernel never spread us"
    return groups


def get(conn, path: str, host: str, headers: dict | None = None):
    conn.request("GET", path, headers={"host": host, **(headers or {})})
    resp = conn.getresponse()
    resp.read()
    return resp.status, resp.getheader("x-instance")


@pytest.fixture
def catalog(tmp_path):
    servers = [UpstreamServer(n, host=h).start() for n, h in
               (("v1a", "127.0.0.81"), ("v1b", "127.0.0.82"), ("v2", "127.0.0.83"))]
    (tmp_path / "catalog.yaml").write_text(catalog_config(*servers))
    proxy = ProxyProcess(tmp_path, workers=2, access_log=True).start()
    yield proxy, {s.name: s for s in servers}
    proxy.stop()
    for s in servers:
        s.stop()


def test_outlier_ejection_counts_errors_of_both_workers(catalog):
    proxy, servers = catalog
    v1a, v1b = servers["v1a"], servers["v1b"]
    (a,), (b,) = connections_by_worker(proxy, CATALOG, "/newcatalog", 1)
    v1a.status = 503
    # Errors 1-3 go through worker A, 4 and 5 through worker B: counted per worker,
    # neither would reach consecutiveErrors 5. Retries move each failed try to v1b,
    # so clients only see 200s.
    hits_by_worker = [0, 0]
    for _ in range(200):
        w = 0 if v1a.hits < 3 else 1
        before = v1a.hits
        assert get((a, b)[w], "/", CATALOG) == (200, "v1b")
        hits_by_worker[w] += v1a.hits - before
        if v1a.hits >= 5:
            break
    # An error report waits for the parent, which tells every worker of the ejection
    # before it answers: a sequential client sees exactly the 1-worker count.
    assert hits_by_worker == [3, 2], f"ejected after {v1a.hits} errors (per worker: {hits_by_worker})"
    ejected_at = time.monotonic()
    time.sleep(0.05)
    for _ in range(10):  # requests racing the 5th error would have landed by now
        assert get(a, "/", CATALOG) == (200, "v1b")
        assert get(b, "/", CATALOG) == (200, "v1b")
    assert v1a.hits == 5
    while time.monotonic() - ejected_at < 1.5:
        assert get(a, "/", CATALOG) == (200, "v1b")
        assert get(b, "/", CATALOG) == (200, "v1b")
    assert v1a.hits == 5, "an ejected endpoint receives nothing from either worker"
    v1a.status = 200
    # baseEjectionTime 2s, readmitted at the first 1s-interval sweep after it (the parent's sweep).
    deadline = time.monotonic() + 5
    while v1a.hits == 5 and time.monotonic() < deadline:
        get(a, "/", CATALOG)
        get(b, "/", CATALOG)
        time.sleep(0.05)
    readmitted_after = time.monotonic() - ejected_at
    assert v1a.hits > 5, "v1a is readmitted after the ejection time"
    assert 1.9 <= readmitted_after <= 4.5
    seen_a = {get(a, "/", CATALOG)[1] for _ in range(10)}
    seen_b = {get(b, "/", CATALOG)[1] for _ in range(10)}
    assert seen_a == seen_b == {"v1a", "v1b"}, "both workers use the readmitted endpoint"
    assert v1b.hits > 0


def test_concurrent_clients_on_both_workers_overshoot_by_at_most_their_in_flight_requests(catalog):
    proxy, servers = catalog
    v1a = servers["v1a"]
    groups = connections_by_worker(proxy, CATALOG, "/newcatalog", 2)
    clients = [c for g in groups for c in g]
    v1a.status = 503
    statuses = []

    def client(conn):
        for _ in range(40):
            statuses.append(get(conn, "/", CATALOG))
            if v1a.hits >= 5:
                break

    threads = [threading.Thread(target=client, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert set(statuses) == {(200, "v1b")}
    # Every client has at most one request outstanding and a request tries v1a at most
    # once (the retry excludes it): the requests the other three clients had already
    # sent when the 5th error landed are the only possible extra hits.
    assert 5 <= v1a.hits <= 5 + len(clients) - 1, v1a.hits
    hits = v1a.hits
    for _ in range(5):
        for conn in clients:
            assert get(conn, "/", CATALOG) == (200, "v1b")
    assert v1a.hits == hits, "ejected in every worker"


POOL_DR = f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: pool
  namespace: shop
spec:
  host: {POOL}
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
"""


@pytest.fixture
def pool_dir(tmp_path):
    server = UpstreamServer("pool", host="127.0.0.84").start()
    (tmp_path / "pool.yaml").write_text(service_config("pool", [server]) + POOL_DR)
    yield tmp_path, server
    server.stop()


def concurrent(conns, host: str) -> list[int]:
    """One slow request per connection, started 30 ms apart, all in flight together."""
    results = []

    def call(conn):
        results.append(get(conn, "/", host, {"x-delay": "0.6"})[0])

    threads = [threading.Thread(target=call, args=(c,)) for c in conns]
    for t in threads:
        t.start()
        time.sleep(0.03)
    for t in threads:
        t.join(10)
    return sorted(results)


def test_pool_limits_count_connections_and_pending_of_both_workers(pool_dir):
    d, server = pool_dir
    with ProxyProcess(d, workers=1, access_log=True) as one:
        conns = [http.client.HTTPConnection("127.0.0.1", one.port, timeout=10) for _ in range(6)]
        single = concurrent(conns, POOL)
    assert single == [200, 200, 503, 503, 503, 503]
    with ProxyProcess(d, workers=2, access_log=True) as two:
        # Each worker now holds one idle upstream connection (maxConnections is already
        # exceeded by one: Envoy's rule below).
        groups = connections_by_worker(two, POOL, "/", 3)
        time.sleep(0.2)
        interleaved = [c for pair in zip(*groups) for c in pair]  # worker A, B, A, B, A, B
        split = concurrent(interleaved, POOL)
        time.sleep(0.2)
        text = two.metrics()
    # Per-worker counting gave 4 x 200. Counted per cluster: one connection and one
    # pending request in all, plus Envoy's rule that a pool with no connection of its
    # own (here: the second worker's) may open one: at most workers - 1 more 200s.
    assert split == [200, 200, 200, 503, 503, 503], split
    assert metric_value(text, "istio_requests_total", destination_service=POOL,
                        response_code="503", response_flags="UO") == 3
