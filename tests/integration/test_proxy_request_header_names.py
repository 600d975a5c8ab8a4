"""Which request headers the Exchange sets aside or reads (Host, Content-Length,
Transfer-Encoding, Expect, x-request-id, hop-by-hop headers) is decided case-insensitively,
although a name is lower-cased only when its length is one of those headers' lengths; every
other header is forwarded as the client spelled it. And a routing plan knows its cluster as a
ClusterState (``ForwardPlan.state``), which the exchange's picks and records go through."""
from __future__ import annotations

import asyncio
import random

import pytest

from nodeagent.proxy.context import ListenerContext, PeerInfo, WorkloadIdentity
from nodeagent.proxy.http import Exchange, HttpDownstream
from nodeagent.proxy.runtime import ClusterState, ProxyRuntime
from nodeagent.telemetry import Telemetry
from policy.loader import load_text
from policy.snapshot import build_snapshot

HOST = "catalog.shop.svc.cluster.local"

CONFIG = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: catalog}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: catalog-v1, namespace: shop}
spec: {address: 127.0.0.2, ports: {http: 8080}, labels: {app: catalog, version: v1}}
"""


@pytest.fixture
def down():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loaded = load_text(CONFIG, "test.yaml")
    assert loaded.ok, loaded.errors
    snapshot = build_snapshot(loaded.resources)
    runtime = ProxyRuntime(lambda: snapshot, Telemetry(), rand=random.Random(7))
    runtime.loop = loop
    ctx = ListenerContext("explicit", WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}))
    yield HttpDownstream(runtime, ctx, PeerInfo(("127.0.0.1", 40000), ("127.0.0.1", 15001), None))
    asyncio.set_event_loop(None)
    loop.close()


def test_special_headers_are_recognised_in_any_case_and_others_kept_as_sent(down):
    headers = [
        (b"HOST", b"a.example"), (b"User-Agent", b"curl/8"), (b"Content-LENGTH", b"5"),
        (b"Accept", b"*/*"), (b"X-Request-ID", b"abc"), (b"x-request-id", b"second"),
        (b"EXPECT", b"100-Continue"), (b"Keep-Alive", b"timeout=5"), (b"tE", b"trailers"),
        (b"Proxy-Authorization", b"Basic eA=="), (b"Trailer", b"x"), (b"X-Envoy-Attempt-Count", b"3"),
        (b"Cookie", b"a=b"), (b"X-Request-Ie", b"same length, other name"),
    ]
    ex = Exchange(down, b"POST", b"/", headers, "1.1", True, False)
    assert ex.authority == b"a.example"
    assert ex.body_mode == 1 and ex.expect_continue
    assert ex.request_id == b"abc" and ex.id_line is None
    assert ex.headers == [
        (b"User-Agent", b"curl/8"), (b"content-length", b"5"), (b"Accept", b"*/*"),
        (b"X-Request-ID", b"abc"), (b"x-request-id", b"second"), (b"X-Envoy-Attempt-Count", b"3"),
        (b"Cookie", b"a=b"), (b"X-Request-Ie", b"same length, other name"),
    ]


def test_chunked_upgrade_and_empty_request_id_in_other_cases(down):
    headers = [(b"Host", b"b.example"), (b"Transfer-ENCODING", b"chunked"), (b"UPGRADE", b"websocket"),
               (b"Proxy-Connection", b"keep-alive"), (b"X-REQUEST-ID", b""), (b"Content-Type", b"text/plain")]
    ex = Exchange(down, b"POST", b"/", headers, "1.1", True, False)
    assert ex.authority == b"b.example" and ex.body_mode == 2 and not ex.expect_continue
    assert ex.request_id is None and ex.id_line is not None  # an empty id is replaced by a generated one
    assert ex.headers == [(b"Content-Type", b"text/plain")]  # no upgrade: its header is not forwarded
    ex = Exchange(down, b"GET", b"/", [(b"Host", b"c.example"), (b"Upgrade", b"websocket")], "1.1", True, True)
    assert ex.headers == [(b"Upgrade", b"websocket")]


def test_a_routing_plan_knows_its_cluster_state(down):
    ex = Exchange(down, b"GET", b"/", [(b"Host", HOST.encode())], "1.1", True, False)
    plan = down.runtime.plan(ex)
    assert isinstance(plan.cluster, ClusterState) and plan.state is plan.cluster
    assert ex.dest == plan.cluster.no_endpoint_labels
