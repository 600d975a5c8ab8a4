"""VirtualService corsPolicy end to end: a real `nodeagent proxy` in front of a real upstream.

Preflights from an allowed origin are answered by the proxy (never reach the
upstream); actual requests get Access-Control-Allow-* on the upstream's response
when the origin matches and nothing otherwise; a disallowed origin's preflight is
forwarded (or answered without allow-origin under unmatchedPreflights: IGNORE);
routes without a policy are untouched; router local replies (503 UF) carry the
headers too; a fault delay comes before the preflight answer (Istio's filter order).
"""
from __future__ import annotations

import http.client
import socket
import time

import pytest

from tests.integration.proxy_harness import ProxyProcess
from tests.integration.test_proxy_lb_match import NS, fqdn, resource, service
from tests.integration.upstream import UpstreamServer

GOOD = "https://app.example.com"
DEV = "https://dev.example.net"
BAD = "https://evil.example.com"

CORS = """    corsPolicy:
      allowOrigins:
      - exact: https://app.example.com
      - prefix: https://dev.
      allowMethods: [GET, POST]
      allowHeaders: [x-a, x-b]
      exposeHeaders: [x-exp]
      maxAge: 1h
      allowCredentials: true
"""


def vs_http() -> str:
    dest = f"    route:\n    - destination:\n        host: {fqdn('web')}\n"
    return (
        f"  - match:\n    - uri:\n        prefix: /api\n{CORS}{dest}"
        f"  - match:\n    - uri:\n        prefix: /strict\n"
        f"    corsPolicy:\n      allowOrigins:\n      - exact: {GOOD}\n      allowMethods: [PUT]\n"
        f"      unmatchedPreflights: IGNORE\n{dest}"
        f"  - match:\n    - uri:\n        prefix: /slow\n"
        f"    fault:\n      delay:\n        fixedDelay: 0.3s\n        percentage:\n          value: 100\n"
        f"    corsPolicy:\n      allowOrigins:\n      - exact: {GOOD}\n{dest}"
        f"  - match:\n    - uri:\n        prefix: /down\n"
        f"    corsPolicy:\n      allowOrigins:\n      - exact: {GOOD}\n"
        f"    retries:\n      attempts: 0\n"
        f"    route:\n    - destination:\n        host: {fqdn('dead')}\n"
        f"  -{dest[3:]}"   # everything else: no corsPolicy
    )


class ClosedPort:
    """An address nothing listens on (connect fails at once)."""

    def __init__(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.address = s.getsockname()
        s.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    upstream = UpstreamServer("w0").start()
    d = tmp_path_factory.mktemp("cors")
    (d / "svc.yaml").write_text(
        service("web", [upstream]) + service("dead", [ClosedPort()])
        + resource("VirtualService", "web", f"  hosts:\n  - {fqdn('web')}\n  http:\n{vs_http()}")
        + resource("WorkloadEntry", "frontend", "  address: 127.0.0.1\n  labels:\n    app: frontend\n"))
    p = ProxyProcess(d, workload=f"{NS}/frontend", metrics=False).start()
    yield p, upstream
    p.stop()
    upstream.stop()


def call(port, method, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers={"Host": fqdn("web"), **(headers or {})})
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def acl(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def preflight_headers(origin, method="POST", extra=None):
    return {"Origin": origin, "Access-Control-Request-Method": method, **(extra or {})}


def test_preflight_from_an_allowed_origin_is_answered_by_the_proxy(proxy):
    p, upstream = proxy
    before = upstream.hits
    for origin in (GOOD, DEV + "/x"):
        status, headers, body = call(p.port, "OPTIONS", "/api/items", preflight_headers(origin))
        assert status == 200 and body == b""
        assert acl(headers) == {
            "access-control-allow-origin": origin,
            "access-control-allow-credentials": "true",
            "access-control-allow-methods": "GET,POST",
            "access-control-allow-headers": "x-a,x-b",
            "access-control-max-age": "3600",
        }
        assert "x-instance" not in headers
    assert upstream.hits == before  # never forwarded


def test_preflight_from_another_origin_is_forwarded(proxy):
    p, upstream = proxy
    before = upstream.hits
    status, headers, _ = call(p.port, "OPTIONS", "/api/items", preflight_headers(BAD))
    assert status == 200 and headers["x-instance"] == "w0"
    assert acl(headers) == {}
    assert upstream.hits == before + 1 and upstream.requests[-1]["method"] == "OPTIONS"


def test_unmatched_preflights_ignore_answers_without_allow_origin(proxy):
    p, upstream = proxy
    before = upstream.hits
    status, headers, _ = call(p.port, "OPTIONS", "/strict", preflight_headers(BAD, "PUT"))
    assert status == 200 and "x-instance" not in headers
    assert acl(headers) == {"access-control-allow-methods": "PUT"}
    status, headers, _ = call(p.port, "OPTIONS", "/strict", preflight_headers(GOOD, "PUT"))
    assert acl(headers) == {"access-control-allow-origin": GOOD, "access-control-allow-methods": "PUT"}
    assert upstream.hits == before


def test_options_without_request_method_is_not_a_preflight(proxy):
    p, upstream = proxy
    before = upstream.hits
    status, headers, _ = call(p.port, "OPTIONS", "/api/x", {"Origin": GOOD})
    assert status == 200 and headers["x-instance"] == "w0"
    assert headers["access-control-allow-origin"] == GOOD  # a CORS request, forwarded
    assert upstream.hits == before + 1


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_actual_request_from_an_allowed_origin_gets_the_headers(proxy, method):
    p, upstream = proxy
    status, headers, body = call(p.port, method, "/api/items", {"Origin": GOOD})
    assert status == 200 and headers["x-instance"] == "w0" and b'"instance": "w0"' in body
    assert acl(headers) == {
        "access-control-allow-origin": GOOD,
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "x-exp",
    }
    assert upstream.requests[-1]["headers"]["origin"] == GOOD  # the request itself is untouched


@pytest.mark.parametrize("headers", [{"Origin": BAD}, {}, {"Origin": ""}])
def test_actual_request_without_an_allowed_origin_gets_nothing(proxy, headers):
    p, _ = proxy
    status, resp, _ = call(p.port, "GET", "/api/items", headers)
    assert status == 200 and resp["x-instance"] == "w0"
    assert acl(resp) == {}


def test_a_route_without_cors_policy_is_untouched(proxy):
    p, upstream = proxy
    before = upstream.hits
    status, headers, _ = call(p.port, "OPTIONS", "/other", preflight_headers(GOOD))
    assert status == 200 and headers["x-instance"] == "w0" and acl(headers) == {}
    status, headers, _ = call(p.port, "GET", "/other", {"Origin": GOOD})
    assert acl(headers) == {}
    assert upstream.hits == before + 2


def test_router_local_replies_carry_the_headers(proxy):
    p, _ = proxy
    status, headers, _ = call(p.port, "GET", "/down", {"Origin": GOOD})
    assert status == 503
    assert headers["access-control-allow-origin"] == GOOD
    status, headers, _ = call(p.port, "GET", "/down", {"Origin": BAD})
    assert status == 503 and acl(headers) == {}


def test_fault_delay_runs_before_the_preflight_answer(proxy):
    p, upstream = proxy
    before = upstream.hits
    t0 = time.monotonic()
    status, headers, _ = call(p.port, "OPTIONS", "/slow", preflight_headers(GOOD))
    elapsed = time.monotonic() - t0
    assert status == 200 and headers["access-control-allow-origin"] == GOOD
    assert elapsed >= 0.3
    assert upstream.hits == before


def curl_h2(port, method, path, headers):
    """(status, lower-case headers) of one HTTP/2 (prior knowledge) request made by curl."""
    import subprocess
    args = ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "-X", method,
            "-H", f"Host: {fqdn('web')}"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run(args + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert lines[0].startswith("HTTP/2 "), lines
    status = int(lines[0].split()[1])
    return status, {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}


def test_http2_streams_get_the_same_cors_answers(proxy):
    p, upstream = proxy
    before = upstream.hits
    status, headers = curl_h2(p.port, "OPTIONS", "/api/items", preflight_headers(GOOD))
    assert status == 200 and "x-instance" not in headers
    assert acl(headers)["access-control-allow-origin"] == GOOD
    assert acl(headers)["access-control-allow-methods"] == "GET,POST"
    assert upstream.hits == before
    status, headers = curl_h2(p.port, "GET", "/api/items", {"Origin": GOOD})
    assert status == 200 and headers["x-instance"] == "w0"
    assert acl(headers) == {"access-control-allow-origin": GOOD, "access-control-allow-credentials": "true",
                            "access-control-expose-headers": "x-exp"}
    status, headers = curl_h2(p.port, "GET", "/api/items", {"Origin": BAD})
    assert status == 200 and acl(headers) == {}
