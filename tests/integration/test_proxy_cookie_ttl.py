"""consistentHash.httpCookie with a ttl, end to end: a real `nodeagent proxy` in front of
four real upstreams.

A request without the cookie gets ``Set-Cookie`` (Envoy's generated cookie: a value
derived from the downstream connection, ``Max-Age`` from the ttl, the path, HttpOnly)
and is hashed on that value, so every later request that carries the cookie reaches
the endpoint that served the first one. ``ttl: 0s`` makes a session cookie (no
Max-Age); without a ttl nothing is generated (Envoy: no hash, a random endpoint).
"""
from __future__ import annotations

import http.client
import re
from collections import Counter

import pytest

from tests.integration.proxy_harness import ProxyProcess
from tests.integration.test_proxy_lb_match import NS, destination_rule, fqdn, resource, service
from tests.integration.upstream import UpstreamServer

COOKIE_RE = re.compile(r'^sticky="([0-9a-f]{16})"(.*)$')


def cookie_rule(name: str, ttl: str | None) -> str:
    ttl_line = f"          ttl: {ttl}\n" if ttl is not None else ""
    return destination_rule(name, "    loadBalancer:\n      consistentHash:\n        httpCookie:\n"
                                  f"          name: sticky\n          path: /app\n{ttl_line}")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    servers = [UpstreamServer(f"s{i}").start() for i in range(4)]
    d = tmp_path_factory.mktemp("cookie")
    config = resource("WorkloadEntry", "frontend", "  address: 127.0.0.1\n  labels:\n    app: frontend\n")
    for name, ttl in (("sticky", "60s"), ("session", "0s"), ("nottl", None)):
        config += service(name, servers) + cookie_rule(name, ttl)
    # the session service's route also has a corsPolicy: both hooks on one response
    config += resource("VirtualService", "session", f"  hosts:\n  - {fqdn('session')}\n  http:\n"
                       "  - corsPolicy:\n      allowOrigins:\n      - exact: https://app.example.com\n"
                       f"    route:\n    - destination:\n        host: {fqdn('session')}\n")
    (d / "svc.yaml").write_text(config)
    p = ProxyProcess(d, workload=f"{NS}/frontend", metrics=False).start()
    yield p
    p.stop()
    for s in servers:
        s.stop()


def get(conn, host, cookie=None, extra=None):
    headers = {"Host": fqdn(host), **(extra or {})}
    if cookie is not None:
        headers["Cookie"] = cookie
    conn.request("GET", "/app/x", headers=headers)
    r = conn.getresponse()
    r.read()
    get.last = r
    return r.getheader("x-instance"), r.getheader("set-cookie")


def test_first_request_gets_a_cookie_and_later_requests_stick(proxy):
    served = Counter()
    for client in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        instance, set_cookie = get(conn, "sticky")
        conn.close()
        m = COOKIE_RE.match(set_cookie or "")
        assert m, set_cookie
        assert m.group(2) == "; Max-Age=60; Path=/app; HttpOnly"
        value = m.group(1)
        served[instance] += 1
        # every later request with the cookie, over new connections, reaches the same endpoint
        for _ in range(15):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            again, again_cookie = get(conn, "sticky", f'other=1; sticky="{value}"')
            conn.close()
            assert again == instance
            assert again_cookie is None  # the client has the cookie: nothing is generated
        # the unquoted form a client may send back hashes the same
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        assert get(conn, "sticky", f"sticky={value}")[0] == instance
        conn.close()
    assert sum(served.values()) == 6


def test_one_connection_gets_one_cookie_value(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    first = [get(conn, "sticky") for _ in range(5)]
    conn.close()
    assert len({c for _, c in first}) == 1 and len({i for i, _ in first}) == 1
    other = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    _, cookie = get(other, "sticky")
    other.close()
    assert cookie != first[0][1]  # another connection (another port) gets another value


def test_cookies_spread_over_the_endpoints(proxy):
    # 40 connections -> 40 cookie values hashed on the ring of 4 endpoints: more than one
    # endpoint is used (all 40 on one endpoint has probability 4 * 0.25^40)
    seen = set()
    for _ in range(40):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        seen.add(get(conn, "sticky")[0])
        conn.close()
    assert len(seen) > 1


def test_ttl_zero_makes_a_session_cookie(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    instance, set_cookie = get(conn, "session")
    conn.close()
    m = COOKIE_RE.match(set_cookie or "")
    assert m and m.group(2) == "; Path=/app; HttpOnly"
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        assert get(conn, "session", f"sticky={m.group(1)}") == (instance, None)
        conn.close()


def test_without_ttl_no_cookie_is_generated(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    results = [get(conn, "nottl") for _ in range(20)]
    conn.close()
    assert all(c is None for _, c in results)
    # no cookie and no ttl: a random point per request, so the requests spread (all 20 on
    # one of 4 endpoints has probability 4 * 0.25^20)
    assert len({i for i, _ in results}) > 1
    # with the cookie, it sticks
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    assert len({get(conn, "nottl", "sticky=abc")[0] for _ in range(10)}) == 1
    conn.close()


def test_http2_stream_gets_the_cookie_and_sticks(proxy):
    import subprocess

    def curl(cookie=None):
        args = ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "-H", f"Host: {fqdn('sticky')}"]
        if cookie:
            args += ["-H", f"Cookie: {cookie}"]
        out = subprocess.run(args + [f"http://127.0.0.1:{proxy.port}/app/h2"], capture_output=True, text=True,
                             timeout=20)
        assert out.returncode == 0, out.stderr
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in
                       (l.partition(":") for l in out.stdout.splitlines()[1:] if l.strip()))
        return headers["x-instance"], headers.get("set-cookie")

    instance, set_cookie = curl()
    m = COOKIE_RE.match(set_cookie or "")
    assert m and m.group(2) == "; Max-Age=60; Path=/app; HttpOnly"
    for _ in range(5):
        assert curl(f'sticky="{m.group(1)}"') == (instance, None)


def test_cookie_and_cors_on_one_response(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    instance, set_cookie = get(conn, "session", extra={"Origin": "https://app.example.com"})
    assert COOKIE_RE.match(set_cookie or "")
    assert get.last.getheader("access-control-allow-origin") == "https://app.example.com"
    instance2, set_cookie2 = get(conn, "session", extra={"Origin": "https://other.example.com"})
    assert set_cookie2 == set_cookie and instance2 == instance
    assert get.last.getheader("access-control-allow-origin") is None
    conn.close()
