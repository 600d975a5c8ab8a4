"""VirtualService / DestinationRule behaviour through `nodeagent proxy`: timeouts,
retries, faults, mirror, header operations, rewrite, redirect, pool overflow."""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.integration.proxy_harness import ProxyProcess, metric_value, service_config
from tests.integration.upstream import UpstreamServer

SERVICES = {  # name -> loopback addresses of its upstream instances
    "slow": ["127.0.0.41"],
    "retry": ["127.0.0.42", "127.0.0.43"],
    "abort": ["127.0.0.44"],
    "half": ["127.0.0.45"],
    "delay": ["127.0.0.46"],
    "mirrored": ["127.0.0.47"],
    "shadow": ["127.0.0.48"],
    "headers": ["127.0.0.49"],
    "rewrite": ["127.0.0.50"],
    "pool": ["127.0.0.51"],
    "limited": ["127.0.0.53"],
    "pertry": ["127.0.0.54", "127.0.0.55"],
    "halfmirrored": ["127.0.0.56"],
    "halfshadow": ["127.0.0.57"],
}


def fqdn(name: str) -> str:
    return f"{name}.shop.svc.cluster.local"


def vs(name: str, http: str) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: shop
spec:
  hosts:
  - {fqdn(name)}
  http:
{http}"""


ROUTES = "".join([
    vs("slow", f"""  - timeout: 0.5s
    route:
    - destination:
        host: {fqdn("slow")}
"""),
    vs("retry", f"""  - retries:
      attempts: 2
      perTryTimeout: 2s
      retryOn: 5xx
    route:
    - destination:
        host: {fqdn("retry")}
"""),
    vs("abort", f"""  - fault:
      abort:
        httpStatus: 418
        percentage:
          value: 100
    route:
    - destination:
        host: {fqdn("abort")}
"""),
    vs("half", f"""  - fault:
      abort:
        httpStatus: 503
        percentage:
          value: 50
    route:
    - destination:
        host: {fqdn("half")}
"""),
    vs("delay", f"""  - fault:
      delay:
        fixedDelay: 0.3s
        percentage:
          value: 100
    route:
    - destination:
        host: {fqdn("delay")}
"""),
    vs("mirrored", f"""  - route:
    - destination:
        host: {fqdn("mirrored")}
    mirror:
      host: {fqdn("shadow")}
    mirrorPercentage:
      value: 100
"""),
    vs("headers", f"""  - headers:
      request:
        set:
          x-set: set-value
        add:
          x-added: added-value
        remove:
        - x-remove-me
      response:
        set:
          x-resp-set: r1
        add:
          x-resp-added: r2
        remove:
        - content-type
    route:
    - destination:
        host: {fqdn("headers")}
"""),
    vs("rewrite", f"""  - match:
    - uri:
        prefix: /moved
    redirect:
      uri: /elsewhere
      authority: other.example
      redirectCode: 301
  - match:
    - uri:
        prefix: /old
    rewrite:
      uri: /new
      authority: rewritten.example
    route:
    - destination:
        host: {fqdn("rewrite")}
"""),
])

ROUTES += vs("halfmirrored", f"""  - route:
    - destination:
        host: {fqdn("halfmirrored")}
    mirror:
      host: {fqdn("halfshadow")}
    mirrorPercentage:
      value: 50
""")
ROUTES += vs("pertry", f"""  - retries:
      attempts: 2
      perTryTimeout: 0.3s
      retryOn: 5xx
    route:
    - destination:
        host: {fqdn("pertry")}
""")

POOL_DR = f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: pool
  namespace: shop
spec:
  host: {fqdn("pool")}
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: limited
  namespace: shop
spec:
  host: {fqdn("limited")}
  trafficPolicy:
    connectionPool:
      tcp:
        connectTimeout: 0.5s
      http:
        maxRequestsPerConnection: 2
        idleTimeout: 0.5s
"""


class ClosedPort:
    """An address where nothing listens (connection refused)."""

    def __init__(self, host: str) -> None:
        import socket
        with socket.socket() as s:
            s.bind((host, 0))
            self.address = s.getsockname()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-policy")
    servers = {}
    for name, hosts in SERVICES.items():
        servers[name] = [UpstreamServer(f"{name}{i}", host=h).start() for i, h in enumerate(hosts)]
        (d / f"{name}.yaml").write_text(service_config(name, servers[name]))
    (d / "dead.yaml").write_text(service_config("dead", [ClosedPort("127.0.0.52")]))
    (d / "routes.yaml").write_text(ROUTES + POOL_DR)
    proxy = ProxyProcess(d, access_log=True).start()
    yield proxy, servers
    proxy.stop()
    for group in servers.values():
        for s in group:
            s.stop()


def eventually(check, timeout: float = 5.0, interval: float = 0.02):
    """Poll ``check()`` until it returns a true value or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def logged(proxy, authority_prefix: str, predicate) -> bool:
    """Whether an access-log line for ``authority_prefix`` satisfying ``predicate`` appears (polled)."""
    return eventually(lambda: any(predicate(r) for r in access_lines(proxy, authority_prefix)))


def metric_reaches(proxy, expected: float, name: str, **labels) -> float:
    """The metric's value once it reaches ``expected`` (polled), or after the poll's timeout."""
    eventually(lambda: metric_value(proxy.metrics(), name, **labels) >= expected)
    return metric_value(proxy.metrics(), name, **labels)


def access_lines(proxy, authority_prefix: str) -> list[dict]:
    out = []
    for line in proxy.stdout:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if str(rec.get("authority", "")).startswith(authority_prefix):
            out.append(rec)
    return out


def test_route_timeout_gives_504_ut(env):
    proxy, _ = env
    started = time.monotonic()
    status, _, body = proxy.request("/", host=fqdn("slow"), headers={"x-delay": "3"})
    elapsed = time.monotonic() - started
    assert status == 504
    assert b"upstream request timeout" in body
    assert 0.45 <= elapsed < 1.5
    status, _, _ = proxy.request("/", host=fqdn("slow"))
    assert status == 200
    assert logged(proxy, fqdn("slow"), lambda r: r["response_flags"] == "UT" and r["response_code"] == 504)


def test_retries_go_to_another_endpoint(env):
    proxy, servers = env
    bad, good = servers["retry"]
    bad.status = 503
    try:
        for _ in range(10):
            status, headers, body = proxy.request("/r", host=fqdn("retry"))
            assert status == 200
            assert headers["x-instance"] == good.name
        assert bad.hits >= 1, "some first tries went to the failing endpoint and were retried"
        retried = [r for r in good.requests if r["headers"].get("x-envoy-attempt-count") != "1"]
        assert retried and all(r["headers"]["x-envoy-attempt-count"] == "2" for r in retried)
        # A body that was fully received is replayed on the retry.
        status, headers, body = proxy.request("/r", host=fqdn("retry"), method="POST", body=b"payload")
        assert status == 200
        assert json.loads(body)["body"] == "payload"
    finally:
        bad.status = 200


def test_fault_abort_and_its_percentage(env):
    proxy, servers = env
    for _ in range(5):
        status, _, body = proxy.request("/", host=fqdn("abort"))
        assert status == 418
        assert b"fault filter abort" in body
    assert servers["abort"][0].hits == 0
    codes = [proxy.request("/", host=fqdn("half"))[0] for _ in range(200)]
    aborted = codes.count(503)
    assert set(codes) <= {200, 503}
    assert 60 <= aborted <= 140, f"50% abort gave {aborted}/200"
    assert servers["half"][0].hits == 200 - aborted
    assert logged(proxy, fqdn("half"), lambda r: r["response_flags"] == "FI")


def test_fault_delay(env):
    proxy, servers = env
    started = time.monotonic()
    status, _, _ = proxy.request("/", host=fqdn("delay"))
    assert status == 200
    assert time.monotonic() - started >= 0.3
    assert logged(proxy, fqdn("delay"), lambda r: r["response_flags"] == "DI")


def test_mirror_sends_a_shadow_copy(env):
    proxy, servers = env
    shadow = servers["shadow"][0]
    status, headers, body = proxy.request("/m?x=1", host=fqdn("mirrored"), method="POST", body=b"mirror-me")
    assert status == 200
    assert headers["x-instance"] == "mirrored0"
    deadline = time.monotonic() + 3
    while not shadow.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert shadow.requests, "the mirror received a copy"
    copy = shadow.requests[-1]
    assert copy["path"] == "/m?x=1"
    assert copy["headers"]["host"] == fqdn("mirrored") + "-shadow"
    assert copy["body_len"] == len(b"mirror-me")


def test_mirror_percentage(env):
    proxy, servers = env
    shadow = servers["halfshadow"][0]
    for _ in range(200):
        assert proxy.request("/", host=fqdn("halfmirrored"))[0] == 200
    deadline = time.monotonic() + 3
    last = -1
    while shadow.hits != last and time.monotonic() < deadline:
        last = shadow.hits
        time.sleep(0.2)
    assert 60 <= shadow.hits <= 140, f"mirrorPercentage 50 mirrored {shadow.hits}/200"


def test_header_operations(env):
    proxy, _ = env
    status, headers, body = proxy.request(
        "/h", host=fqdn("headers"), headers={"x-set": "original", "x-remove-me": "1", "x-keep": "k"})
    assert status == 200
    seen = json.loads(body)["headers"]
    assert seen["x-set"] == "set-value"
    assert seen["x-added"] == "added-value"
    assert "x-remove-me" not in seen
    assert seen["x-keep"] == "k"
    assert headers["x-resp-set"] == "r1"
    assert headers["x-resp-added"] == "r2"
    assert "content-type" not in headers


def test_rewrite_and_redirect(env):
    proxy, _ = env
    status, headers, body = proxy.request("/old/thing?q=1", host=fqdn("rewrite"))
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/new/thing?q=1"
    assert seen["headers"]["host"] == "rewritten.example"
    status, headers, _ = proxy.request("/moved/x", host=fqdn("rewrite"))
    assert status == 301
    assert headers["location"] == "http://other.example/elsewhere"


def test_connection_pool_overflow_gives_503_uo(env):
    proxy, servers = env
    results = []

    def call():
        results.append(proxy.request("/", host=fqdn("pool"), headers={"x-delay": "0.6"})[0])

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.03)
    for t in threads:
        t.join(10)
    # one request on the single connection, one pending, the rest overflow.
    assert sorted(results) == [200, 200, 503, 503, 503]
    assert servers["pool"][0].connections == 1
    assert metric_reaches(proxy, 3, "istio_requests_total", destination_service=fqdn("pool"),
                          response_code="503", response_flags="UO") == 3


def test_unknown_host_is_404_nr(env):
    proxy, _ = env
    status, _, _ = proxy.request("/", host="nothing.shop.svc.cluster.local")
    assert status == 404
    assert metric_reaches(proxy, 1, "istio_requests_total", response_code="404", response_flags="NR") >= 1


def test_connect_failure_gives_503_uf(env):
    proxy, _ = env
    status, _, body = proxy.request("/", host=fqdn("dead"))
    assert status == 503
    assert b"connection failure" in body
    assert metric_reaches(proxy, 1, "istio_requests_total", destination_service=fqdn("dead"),
                          response_code="503", response_flags="UF") == 1


def test_max_requests_per_connection_and_idle_timeout(env):
    proxy, servers = env
    server = servers["limited"][0]
    for _ in range(6):
        assert proxy.request("/", host=fqdn("limited"))[0] == 200
    assert server.connections == 3, "two requests per upstream connection"
    proxy.request("/", host=fqdn("limited"))  # opens a 4th, which then idles
    idle_from = time.monotonic()
    # idleTimeout 0.5s: the proxy closes the idle connection (the upstream sees it go)
    assert eventually(lambda: server.open_connections == 0), "the idle upstream connection was closed"
    assert time.monotonic() - idle_from >= 0.45, "not before idleTimeout"
    before = server.connections
    assert proxy.request("/", host=fqdn("limited"))[0] == 200
    assert server.connections == before + 1, "the idle connection was closed; a new one is opened"


def test_per_try_timeout_moves_to_another_endpoint(env):
    proxy, servers = env
    slow, fast = servers["pertry"]
    slow.delay = 2.0
    try:
        for _ in range(6):
            started = time.monotonic()
            status, headers, _ = proxy.request("/", host=fqdn("pertry"))
            assert (status, headers["x-instance"]) == (200, fast.name)
            assert time.monotonic() - started < 1.0
        assert slow.hits >= 1, "some first tries went to the slow endpoint and timed out"
    finally:
        slow.delay = 0.0
