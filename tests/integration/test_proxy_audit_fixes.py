"""Fixes from a curl review of `nodeagent proxy` (outbound), each against real loopback upstreams:

1. request targets are normalized (Istio's BASE normalization) before routing and forwarded
   normalized; a target Envoy rejects (``%00``) answers 400;
2. a request in flight is bound by the stream idle timeout (408 before any response byte,
   else a reset), and its upstream connection is released, not pooled; Upgrade tunnels
   have an idle timeout too;
3. a Host port the service does not have gets 404 NR;
4. the first try carries ``x-envoy-attempt-count: 1``.
"""
from __future__ import annotations

import json
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.runtime import needs_normalizing
from policy.authz import normalize_path
from tests.integration.proxy_harness import ProxyProcess, metric_value, read_until_closed, service_config
from tests.integration.upstream import UpstreamServer

RATINGS = "ratings.shop.svc.cluster.local"

RATINGS_VS = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
  namespace: shop
spec:
  hosts:
  - ratings.shop.svc.cluster.local
  http:
  - match:
    - uri:
        prefix: /api/v1
    rewrite:
      uri: /v2
    route:
    - destination:
        host: ratings.shop.svc.cluster.local
  - match:
    - uri:
        prefix: /public
    route:
    - destination:
        host: ratings.shop.svc.cluster.local
"""


def two_port_config(http, admin) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: multi
  namespace: shop
spec:
  hosts:
  - multi.shop.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 9000
    name: http-admin
    protocol: HTTP
  workloadSelector:
    labels:
      app: multi
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: multi-0
  namespace: shop
spec:
  address: 127.0.0.42
  ports:
    http: {http.port}
    http-admin: {admin.port}
  labels:
    app: multi
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-audit")
    ratings = UpstreamServer("r0", host="127.0.0.41").start()
    catalog = UpstreamServer("c0", host="127.0.0.43").start()
    multi = UpstreamServer("m-http", host="127.0.0.42").start()
    admin = UpstreamServer("m-admin", host="127.0.0.42").start()
    (d / "ratings.yaml").write_text(service_config("ratings", [ratings]) + RATINGS_VS)
    (d / "catalog.yaml").write_text(service_config("catalog", [catalog]))
    (d / "multi.yaml").write_text(two_port_config(multi, admin))
    proxy = ProxyProcess(d, extra=("--idle-timeout", "1")).start()
    try:
        yield proxy, ratings
    finally:
        proxy.stop()
        for server in (ratings, catalog, multi, admin):
            server.stop()


def echo(resp) -> dict:
    status, headers, body = resp
    assert status == 200, (status, body)
    return json.loads(body)


# --- 1. path normalization ------------------------------------------------

def test_dot_segments_are_resolved_before_routing_and_forwarded_resolved(env):
    proxy, _ = env
    # /api/v1/../../admin is /admin: no route (it used to match /api/v1 and go out as /v2/../../admin)
    for path in ("/api/v1/../../admin", "/api/v1/%2e%2e/%2E%2E/admin", "/api/v1/..\\..\\admin",
                 "/public/./../admin"):
        status, headers, body = proxy.request(path, host=RATINGS)
        assert status == 404, (path, status, body)
    # /x/../api/v1/a is /api/v1/a: routed and rewritten (it used to get 404 NR)
    assert echo(proxy.request("/x/../api/v1/a", host=RATINGS))["path"] == "/v2/a"
    assert echo(proxy.request("/api/v1/./b/%2e/c?q=../x", host=RATINGS))["path"] == "/v2/b/c?q=../x"
    # forwarded normalized without a rewrite too; %2f stays encoded, slashes are not merged
    assert echo(proxy.request("/public/a/%2E%2e/%61%2Db%2fc//d", host=RATINGS))["path"] == "/public/a-b%2fc//d"
    assert echo(proxy.request("/public/x#frag", host=RATINGS))["path"] == "/public/x"
    # absolute-form (explicit proxy, curl -x --path-as-is)
    sock = proxy.raw()
    try:
        sock.sendall(b"GET http://%s/api/v1/../../admin HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                     % (RATINGS.encode(), RATINGS.encode()))
        assert read_until_closed(sock).startswith(b"HTTP/1.1 404 ")
    finally:
        sock.close()


def test_a_path_envoy_rejects_answers_400(env):
    proxy, ratings = env
    before = ratings.hits
    status, _, _ = proxy.request("/public/a%00b", host=RATINGS)
    assert status == 400
    status, _, _ = proxy.request("/public/a%00b", host=RATINGS)  # the memoized verdict too
    assert status == 400
    assert ratings.hits == before
    assert echo(proxy.request("/public/ok", host=RATINGS))["path"] == "/public/ok"


_SAFE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF, blacklist_characters=".%\\#"), max_size=40)


@settings(max_examples=600, deadline=None)
@given(_SAFE)
def test_skipping_normalization_is_exact(rest):
    """The hot path skips normalize_path when needs_normalizing() is False: for such a target
    (starting with /) normalization must be the identity, including //, ? and ;."""
    target = "/" + rest
    raw = target.encode("latin-1")
    if not needs_normalizing(raw):
        assert normalize_path(target, keep_query=True) == target


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "", ".", "..", "%2e", "%2E%2e", "b\\c", "?q=.", "#f", "%41", "//"]),
                max_size=8))
def test_targets_that_change_are_always_normalized(parts):
    target = "/" + "/".join(parts)
    if normalize_path(target, keep_query=True) != target:
        assert needs_normalizing(target.encode("latin-1"))


# --- 3. Host ports ---------------------------------------------------------

def test_a_host_port_the_service_lacks_has_no_route(env):
    proxy, _ = env
    catalog, multi = "catalog.shop.svc.cluster.local", "multi.shop.svc.cluster.local"
    for host in (catalog + ":8080", "catalog.shop:8080", multi + ":8080", multi + ":9001"):
        status, _, body = proxy.request("/", host=host)
        assert status == 404, (host, status, body)
    assert echo(proxy.request("/", host=catalog))["instance"] == "c0"
    assert echo(proxy.request("/", host=catalog + ":80"))["instance"] == "c0"
    assert echo(proxy.request("/", host="catalog"))["instance"] == "c0"
    assert echo(proxy.request("/", host=multi))["instance"] == "m-http"
    assert echo(proxy.request("/", host=multi + ":80"))["instance"] == "m-http"
    assert echo(proxy.request("/", host=multi + ":9000"))["instance"] == "m-admin"
    m = proxy.metrics()
    assert metric_value(m, "istio_requests_total", response_code="404", response_flags="NR") >= 4
