"""The proxy's per-request shortcuts decide exactly what the full path decides.

``ProxyRuntime.plan`` resolves (snapshot, listener, Host) once and shares one
ForwardPlan per static route destination; ``ClusterState`` skips re-recording
successes and asks no picker for a one-endpoint cluster. These tests drive the
real runtime, exchanges and snapshots (no sockets are needed to plan).
"""
from __future__ import annotations

import asyncio
import random

import pytest

from nodeagent.proxy.context import ListenerContext, PeerInfo, WorkloadIdentity
from nodeagent.proxy.http import Exchange, HttpDownstream, LocalReply
from nodeagent.proxy.runtime import ForwardPlan, ProxyRuntime
from nodeagent.telemetry import Telemetry
from policy.cluster import ClusterKey
from policy.loader import load_text
from policy.snapshot import build_snapshot

HOST = "catalog.shop.svc.cluster.local"

BASE = """apiVersion: networking.istio.io/v1
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
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: catalog-v2, namespace: shop}
spec: {address: 127.0.0.3, ports: {http: 8080}, labels: {app: catalog, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: frontend, namespace: shop}
spec: {address: 127.0.0.1, serviceAccount: frontend, labels: {app: frontend}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

ROUTES = BASE + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  http:
  - match: [{headers: {x-canary: {exact: "1"}}}]
    route: [{destination: {host: catalog.shop.svc.cluster.local, subset: v2}}]
  - match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new}
    route: [{destination: {host: catalog.shop.svc.cluster.local, subset: v2}}]
  - match: [{uri: {exact: /split}}]
    route:
    - {destination: {host: catalog.shop.svc.cluster.local, subset: v1}, weight: 50}
    - {destination: {host: catalog.shop.svc.cluster.local, subset: v2}, weight: 50}
  - route: [{destination: {host: catalog.shop.svc.cluster.local, subset: v1}}]
"""


def snapshot_of(text: str):
    loaded = load_text(text, "test.yaml")
    assert loaded.ok, loaded.errors
    return build_snapshot(loaded.resources)


class Snapshots:
    """The runtime's snapshot source; ``current`` is replaced as the store would."""

    def __init__(self, text: str) -> None:
        self.current = snapshot_of(text)

    def __call__(self):
        return self.current


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def make_runtime(text: str, loop) -> tuple[ProxyRuntime, Snapshots, HttpDownstream]:
    snaps = Snapshots(text)
    runtime = ProxyRuntime(snaps, Telemetry(), rand=random.Random(7))
    runtime.loop = loop
    ctx = ListenerContext("explicit", WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}))
    down = HttpDownstream(runtime, ctx, PeerInfo(("127.0.0.1", 40000), ("127.0.0.1", 15001), None))
    return runtime, snaps, down


def plan(down: HttpDownstream, path: bytes, *headers: tuple[bytes, bytes], host: bytes = HOST.encode()):
    return down.runtime.plan(Exchange(down, b"GET", path, [(b"Host", host), *headers], "1.1", True, False))


def test_header_match_is_decided_per_request(loop):
    _, _, down = make_runtime(ROUTES, loop)
    for _ in range(3):
        canary = plan(down, b"/items", (b"X-Canary", b"1"))
        plain = plan(down, b"/items", (b"X-Canary", b"0"))
        assert canary.cluster.key == ClusterKey(HOST, "v2", 80)
        assert plain.cluster.key == ClusterKey(HOST, "v1", 80)


def test_static_destination_shares_one_plan_until_the_snapshot_changes(loop):
    runtime, snaps, down = make_runtime(ROUTES, loop)
    first = plan(down, b"/items")
    assert isinstance(first, ForwardPlan) and first.path is None and first.authority is None
    assert plan(down, b"/items?page=2") is first
    snaps.current = snapshot_of(ROUTES.replace("- route: [{destination: {host: catalog.shop.svc.cluster.local, subset: v1}}]",
                                               "- route: [{destination: {host: catalog.shop.svc.cluster.local, subset: v2}}]"))
    after = plan(down, b"/items")
    assert after is not first and after.cluster.key == ClusterKey(HOST, "v2", 80)
    assert after.cluster.version == snaps.current.version


def test_rewritten_path_is_planned_per_request(loop):
    _, _, down = make_runtime(ROUTES, loop)
    a = plan(down, b"/old/a?x=1")
    b = plan(down, b"/old/b")
    assert (a.path, b.path) == (b"/new/a?x=1", b"/new/b")
    assert a is not b


def test_weighted_split_is_rolled_per_request(loop):
    _, _, down = make_runtime(ROUTES, loop)
    seen = {"v1": 0, "v2": 0}
    for _ in range(400):
        seen[plan(down, b"/split").cluster.key.subset] += 1
    assert 120 < seen["v1"] < 280 and seen["v1"] + seen["v2"] == 400


def test_unknown_host_is_404_nr_every_time(loop):
    _, _, down = make_runtime(ROUTES, loop)
    for _ in range(2):
        reply = plan(down, b"/", host=b"nowhere.shop.svc.cluster.local")
        assert isinstance(reply, LocalReply) and (reply.status, reply.flags) == (404, "NR")


def test_success_between_failures_still_resets_the_outlier_counters(loop):
    runtime, snaps, down = make_runtime(ROUTES, loop)
    state = plan(down, b"/items").cluster  # subset v1: one endpoint
    ep = state.pick(None, None)
    state.done(ep)
    for round_ in range(3):
        state.record(ep, 200, 1.0)
        state.record(ep, 200, 1.0)
        for _ in range(4):
            state.record(ep, 503, 1.0)
        assert ep.id not in state.ejected, round_
    # the snapshot changes: what was recorded before still counts the same way
    snaps.current = snapshot_of(ROUTES)
    state = plan(down, b"/items").cluster
    state.record(ep, 503, 2.0)
    assert ep.id in state.ejected  # the fifth consecutive 5xx
    assert state.pick(None, None) is None  # the only endpoint is ejected: no healthy upstream


def test_one_endpoint_cluster_honours_tried_and_counts_active_requests(loop):
    _, _, down = make_runtime(BASE, loop)  # no VirtualService: the default route, LEAST_REQUEST
    state = plan(down, b"/").cluster
    assert state.key == ClusterKey(HOST, None, 80) and len(state.endpoints) == 2
    assert plan(down, b"/other") is plan(down, b"/")  # the default route's plan is shared
    two = [state.pick(None, None) for _ in range(2)]  # two endpoints: the picker decides
    assert state.picker.active == {ep.id: two.count(ep) for ep in two}
    for ep in two:
        state.done(ep)
    assert state.picker.active == {}
    _, _, down = make_runtime(ROUTES, loop)
    single = plan(down, b"/items").cluster
    ep = single.pick(None, None)
    assert single.picker.active == {ep.id: 1}
    assert single.pick(None, [ep]) is None  # a retry must not go back to the endpoint it tried
    single.done(ep)
    assert single.picker.active == {}


def test_http_version_is_known_without_asking_the_parser_for_1_1(loop):
    """The engine infers HTTP/1.1 from keep-alive without a Connection header; every other
    case asks the parser. The version shows in the framing of the (local) reply."""
    runtime, _, down = make_runtime(ROUTES, loop)

    async def exchange_all() -> list[bytes]:
        server = await loop.create_server(lambda: HttpDownstream(runtime, down.ctx), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        heads = []
        try:
            for request in (b"GET / HTTP/1.0\r\nHost: nowhere\r\nProxy-Connection: keep-alive\r\n\r\n",
                            b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n",
                            b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: keep-alive\r\n\r\n",
                            b"GET / HTTP/1.0\r\nHost: nowhere\r\n\r\n"):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                await asyncio.wait_for(reader.readexactly(length), 5)
                heads.append(head.lower())
            assert await asyncio.wait_for(reader.read(), 5) == b""  # HTTP/1.0 without keep-alive: closed
        finally:
            writer.close()
            server.close()
            await server.wait_closed()
        return heads

    heads = loop.run_until_complete(exchange_all())
    assert all(h.startswith(b"http/1.1 404") for h in heads)
    assert b"connection: keep-alive" in heads[0]
    assert b"connection:" not in heads[1] and b"connection:" not in heads[2]
    assert b"connection: close" in heads[3]


def test_head_size_limit_is_exact_whether_counted_or_bounded(loop):
    """431 exactly when url + (name + value + 4) per header exceeds max_header_bytes or
    there are more than max_headers headers, whether the head comes in one read (bounded
    without counting while it cannot reach the limit) or in pieces (counted from where
    it could)."""
    from nodeagent.proxy.runtime import Limits

    runtime, _, down = make_runtime(ROUTES, loop)
    runtime.limits = Limits(max_header_bytes=120, max_headers=6)

    def request(pads: list[int]) -> tuple[bytes, int, int]:
        headers = [(b"Host", b"nowhere")] + [(b"X-P%d" % i, b"v" * n) for i, n in enumerate(pads)]
        # no space after the colon: the raw head is one byte per header smaller than the count
        raw = b"GET / HTTP/1.1\r\n" + b"".join(n + b":" + v + b"\r\n" for n, v in headers) + b"\r\n"
        return raw, 1 + sum(len(n) + len(v) + 4 for n, v in headers), len(headers)

    async def status_of(raw: bytes, split: int | None) -> bytes:
        server = await loop.create_server(lambda: HttpDownstream(runtime, down.ctx), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            if split is None:
                writer.write(raw)
            else:
                writer.write(raw[:split])
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(raw[split:])
            return (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))[:12]
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    # counted: 1 (url) + 15 (Host) + (8 + pad) per pad header, against the limit of 120
    cases = [[1], [95], [96], [97], [27, 27, 26], [27, 27, 27], [13, 13, 13, 13, 12], [13, 13, 13, 13, 13],
             [1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    seen = set()
    for pads in cases:
        raw, counted, count = request(pads)
        want = b"HTTP/1.1 431" if counted > 120 or count > 6 else b"HTTP/1.1 404"
        seen.add(want)
        # (a piece that leaves the head incomplete is also bounded by the bytes the parser
        # holds, a separate rule: the second piece here always completes the head)
        for split in (None, 20, 30):
            got = loop.run_until_complete(status_of(raw, split))
            assert got == want, (pads, counted, count, split, got)
    assert seen == {b"HTTP/1.1 431", b"HTTP/1.1 404"}
    # Many tiny headers: the count (5 per "X:" header) outgrows the raw bytes (4 per line).
    runtime.limits = Limits(max_header_bytes=120, max_headers=40)
    for k, want in ((20, b"HTTP/1.1 404"), (21, b"HTTP/1.1 431")):
        raw = b"GET / HTTP/1.1\r\nHost:nowhere\r\n" + b"X:\r\n" * k + b"\r\n"
        assert (16 + 5 * k > 120) == (want == b"HTTP/1.1 431") and len(raw) <= 120  # counted vs raw
        for split in (None, 20):
            assert loop.run_until_complete(status_of(raw, split)) == want, (k, split)
