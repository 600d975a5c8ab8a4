"""The catalog rules from the seed, end to end through `nodeagent proxy` and real upstreams.

ServiceEntry catalog + WorkloadEntries v1a, v1b, v2 + VirtualService
(/newcatalog prefix -> subset v2, else v1) + DestinationRule (LEAST_CONN,
consecutiveErrors 5, interval 1s, baseEjectionTime 2s).
"""
from __future__ import annotations

import json
import time

import pytest

from tests.integration.proxy_harness import ProxyProcess, catalog_config
from tests.integration.upstream import UpstreamServer


class TimedUpstream(UpstreamServer):
    """An upstream that also notes when it answers each request (``hit_times``, time.monotonic)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hit_times: list[float] = []

    async def _respond(self, req, parser, writer) -> bool:
        # noted before the response is written, so before the proxy can record its outcome
        self.hit_times.append(time.monotonic())
        return await super()._respond(req, parser, writer)


@pytest.fixture
def catalog(tmp_path):
    servers = [TimedUpstream(n, host=h).start() for n, h in
               (("v1a", "127.0.0.11"), ("v1b", "127.0.0.12"), ("v2", "127.0.0.13"))]
    (tmp_path / "catalog.yaml").write_text(catalog_config(*servers))
    proxy = ProxyProcess(tmp_path).start()
    yield proxy, {s.name: s for s in servers}
    proxy.stop()
    for s in servers:
        s.stop()


def instance(resp) -> str:
    return resp[1]["x-instance"]


def test_newcatalog_reaches_only_v2_and_the_rest_only_v1(catalog):
    proxy, servers = catalog
    for path in ("/newcatalog", "/newcatalog/items?id=3", "/newcatalogue"):
        for _ in range(5):
            status, headers, body = proxy.request(path)
            assert status == 200
            assert headers["x-instance"] == "v2"
            assert json.loads(body)["path"] == path
    seen = set()
    for path in ("/", "/catalog", "/new", "/items/newcatalog"):
        for _ in range(6):
            status, headers, _ = proxy.request(path)
            assert status == 200
            seen.add(headers["x-instance"])
    assert seen == {"v1a", "v1b"}


def test_absolute_form_target_is_routed_like_curl_x(catalog):
    proxy, _ = catalog
    sock = proxy.raw()
    sock.sendall(b"GET http://catalog.shop.svc.cluster.local/newcatalog HTTP/1.1\r\nHost: ignored\r\n"
                 b"Connection: close\r\n\r\n")
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    sock.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b"x-instance: v2" in data


def test_failing_v1_endpoint_is_ejected_then_readmitted(catalog):
    proxy, servers = catalog
    v1a, v1b = servers["v1a"], servers["v1b"]
    v1a.status = 503
    # Retries (Istio's default: 2 on 503) move each failed try to the healthy endpoint,
    # so clients only see 200s while v1a collects consecutive errors.
    for _ in range(100):
        status, headers, _ = proxy.request("/")
        assert status == 200
        assert headers["x-instance"] == "v1b"
        if v1a.hits >= 5:
            break
    assert v1a.hits == 5, "five consecutive gateway errors eject the endpoint"
    # The proxy ejects v1a when it reads the 5th 503, which v1a wrote after noting its time:
    # the ejection starts after ejected_at, so nothing may reach v1a before ejected_at + 2s
    # (baseEjectionTime); readmission comes at the first 1s-interval sweep at or after that.
    # (The proxy's event-loop clock has a 1 ms resolution: 10 ms are left for it.)
    ejected_at = v1a.hit_times[4]
    readmission_allowed = ejected_at + 2.0 - 0.01
    sent = 0
    while time.monotonic() < readmission_allowed:
        status, headers, _ = proxy.request("/")
        sent += 1
        assert (status, headers["x-instance"]) == (200, "v1b"), f"{time.monotonic() - ejected_at:.3f} s after ejection"
        time.sleep(0.005)
    assert sent >= 5, f"only {sent} requests during the ejection window"
    during = [t - ejected_at for t in v1a.hit_times[5:] if t < readmission_allowed]
    assert during == [], f"the ejected endpoint received requests {during} s after its ejection"
    hits_at_ejection = 5
    v1a.status = 200
    deadline = time.monotonic() + 5
    while v1a.hits == hits_at_ejection and time.monotonic() < deadline:
        proxy.request("/")
        time.sleep(0.05)
    assert v1a.hits > hits_at_ejection, "v1a is readmitted after the ejection time"
    readmitted_after = v1a.hit_times[5] - ejected_at
    assert 2.0 - 0.01 <= readmitted_after <= 4.5
    # Both serve again. LEAST_CONN is Envoy's LEAST_REQUEST: with equal weights each pick
    # draws two endpoints at random and keeps the less loaded, so whatever the active counts
    # each endpoint is picked with p >= 1/4 (both draws land on it). Missing one of the two in
    # 80 picks has p <= 2 * (3/4)**80 ~ 2e-10 (10 picks at equal load missed one ~0.2% of runs).
    seen = set()
    for _ in range(80):
        seen.add(instance(proxy.request("/")))
        if len(seen) == 2:
            break
    assert seen == {"v1a", "v1b"}
