"""Fixes from a curl review of `nodeagent proxy` (outbound), each against real loopback upstreams:

1. request targets are normalized (Istio's BASE normalization) before routing and forwarded
   normalized; a target Envoy rejects (``%00``) answers 400;
2. a request in flight is bound by the stream idle timeout (408 before any response byte,
   else a reset), and its upstream connection is released, not pooled; Upgrade tunnels
   have an idle timeout too;
3. a Host port the service does not have gets 404 NR;
4. the first try carries ``x-envoy-attempt-count: 1``;
5. opaque TCP relays have the tunnel (Envoy TCP proxy) idle timeout.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.context import ListenerContext, WorkloadIdentity
from nodeagent.proxy.http import HttpDownstream
from nodeagent.proxy.runtime import Limits, ProxyRuntime, needs_normalizing
from nodeagent.telemetry import Telemetry
from policy.authz import normalize_path
from policy.loader import load_text
from policy.snapshot import build_snapshot
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


HOLD_DR = """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: hold
  namespace: shop
spec:
  host: hold.shop.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
"""


class StallingUpstream:
    """Answers every request with a head promising 100 bytes, sends 10 of them, then stalls
    (keeps the connection open without sending anything more)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.address = self.sock.getsockname()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            buf = b""
            while b"\r\n\r\n" not in buf:
                part = conn.recv(65536)
                if not part:
                    break
                buf += part
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"s" * 10)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


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
    hold = UpstreamServer("h0", host="127.0.0.45").start()
    (d / "hold.yaml").write_text(service_config("hold", [hold]) + HOLD_DR)
    stall = StallingUpstream("127.0.0.46")
    (d / "stall.yaml").write_text(service_config("stall", [stall]))
    proxy = ProxyProcess(d, extra=("--stream-idle-timeout", "1")).start()
    try:
        yield proxy, ratings, hold
    finally:
        proxy.stop()
        stall.stop()
        for server in (ratings, catalog, multi, admin, hold):
            server.stop()


def echo(resp) -> dict:
    status, headers, body = resp
    assert status == 200, (status, body)
    return json.loads(body)


# --- 1. path normalization ------------------------------------------------

def test_dot_segments_are_resolved_before_routing_and_forwarded_resolved(env):
    proxy = env[0]
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
    proxy, ratings = env[:2]
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
    proxy = env[0]
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



# --- 2. stream idle timeout -------------------------------------------------

HOLD = "hold.shop.svc.cluster.local"


def wait_for(check, limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_a_stalled_request_body_gets_408_and_frees_its_upstream_connection(env):
    """--stream-idle-timeout 1: a POST announcing 100 bytes and sending 2
    used to hang forever holding the one connection maxConnections allows."""
    proxy, _, hold = env
    assert echo(proxy.request("/warm", host=HOLD))["instance"] == "h0"
    sock = proxy.raw(timeout=6)
    try:
        started = time.monotonic()
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\nab" % HOLD.encode())
        got = read_until_closed(sock, 6)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert b"connection: close" in got.lower() and got.endswith(b"stream timeout\n")
    assert 0.9 <= elapsed < 3.0, elapsed
    # the upstream connection was closed, not pooled mid-request
    assert wait_for(lambda: hold.open_connections == 0), hold.open_connections
    # ... so the single allowed connection is free for the next request
    assert echo(proxy.request("/after", host=HOLD))["path"] == "/after"
    m = proxy.metrics()
    assert metric_value(m, "istio_requests_total", response_code="408", response_flags="SI") >= 1


def test_a_slow_upstream_gets_408_before_any_response_byte(env):
    proxy = env[0]
    started = time.monotonic()
    status, headers, body = proxy.request("/slow", host=HOLD, headers={"x-delay": "4"}, timeout=6)
    assert status == 408 and body == b"stream timeout\n"
    assert time.monotonic() - started < 3.0


def test_progress_restarts_the_stream_idle_timeout(env):
    """A body trickling in slower than the whole timeout, but never idle for it, goes through."""
    proxy = env[0]
    sock = proxy.raw(timeout=6)
    try:
        sock.sendall(b"POST /trickle HTTP/1.1\r\nHost: %s\r\nContent-Length: 6\r\n\r\n" % HOLD.encode())
        for part in (b"ab", b"cd", b"ef"):
            time.sleep(0.6)
            sock.sendall(part)  # 1.8 s in all, never 1 s without a byte
        sock.settimeout(6)
        head = sock.recv(65536)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(head.split(b"\r\n\r\n", 1)[1])["body"] == "abcdef"


def test_a_stalled_response_is_reset_after_its_first_bytes(env):
    proxy = env[0]
    sock = proxy.raw(timeout=6)
    try:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: stall.shop.svc.cluster.local\r\n\r\n")
        got = bytearray()
        ended = None
        while ended is None:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                ended = "reset"
                break
            if not part:
                ended = "closed"
            got += part
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    # the head and the 10 bytes were relayed; then, with nothing more for 1 s, the connection
    # is reset (not a 408: the response had started), short of the 100 bytes promised
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 100" in head, got
    assert body == b"s" * 10
    assert ended == "reset"
    assert 0.9 <= elapsed < 3.0, elapsed


def _tunnel_runtime(upstream, limits: Limits):
    loaded = load_text(service_config("ws", [upstream]), "ws.yaml")
    assert loaded.ok, loaded.errors
    snapshot = build_snapshot(loaded.resources)
    runtime = ProxyRuntime(lambda: snapshot, Telemetry(), limits)
    ctx = ListenerContext("explicit", WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}))
    return runtime, ctx


def test_an_idle_upgrade_tunnel_is_closed_a_busy_one_is_not():
    """Upgrade tunnels get the tunnel idle timeout (Envoy's TCP idle timeout, 1 h by default;
    here 1 s), counted from the last byte either way; the stream idle timeout (60 s here)
    does not apply to them once upgraded."""
    upstream = UpstreamServer("ws0", host="127.0.0.47").start()
    loop = asyncio.new_event_loop()
    try:
        async def main():
            runtime, ctx = _tunnel_runtime(upstream, Limits(stream_idle_timeout=60, tunnel_idle_timeout=1))
            runtime.start()
            server = await asyncio.get_running_loop().create_server(
                lambda: HttpDownstream(runtime, ctx), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]

            async def upgrade():
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /ws HTTP/1.1\r\nHost: ws.shop.svc.cluster.local\r\n"
                             b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 101 "), head
                return reader, writer

            async def busy():
                reader, writer = await upgrade()
                for i in range(6):  # 2.4 s, never idle for 1 s
                    await asyncio.sleep(0.4)
                    writer.write(b"ping%d" % i)
                    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"ping%d" % i
                writer.close()

            async def idle():
                reader, writer = await upgrade()
                writer.write(b"hello")
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
                started = time.monotonic()
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
                writer.close()
                return time.monotonic() - started

            try:
                _, elapsed = await asyncio.gather(busy(), idle())
                assert 0.9 <= elapsed < 2.5, elapsed
                assert await asyncio.wait_for(_until(lambda: upstream.open_connections == 0), 5)
            finally:
                server.close()
                await runtime.close()

        loop.run_until_complete(main())
    finally:
        loop.close()
        upstream.stop()


async def _until(check) -> bool:
    while not check():
        await asyncio.sleep(0.02)
    return True


# --- 4. x-envoy-attempt-count -----------------------------------------------

def test_the_first_try_carries_attempt_count_1(env):
    proxy = env[0]
    for path, host in (("/public/a", RATINGS), ("/", "catalog.shop.svc.cluster.local"),
                       ("/", "multi.shop.svc.cluster.local:9000")):
        got = echo(proxy.request(path, host=host))
        assert got["headers"].get("x-envoy-attempt-count") == "1", (host, got["headers"])
    # a POST body still follows the head intact
    got = echo(proxy.request("/public/p", host=RATINGS, method="POST", body=b"x" * 1000))
    assert got["headers"]["x-envoy-attempt-count"] == "1" and got["body_len"] == 1000


# --- 5. TCP relay idle timeout ------------------------------------------------

def test_an_idle_tcp_relay_is_closed_a_busy_one_is_not():
    """Opaque TCP relays get the tunnel idle timeout too (Envoy's TCP proxy idle_timeout,
    1 h by default; here 1 s), counted from the last byte either way, and closing the client
    side closes the upstream side."""
    from nodeagent.proxy.tcp import DispatchProtocol

    service_upstream = UpstreamServer("ws0", host="127.0.0.48").start()  # the config's one service
    loop = asyncio.new_event_loop()
    try:
        async def main():
            upstream_open = []

            async def echo_back(reader, writer):
                upstream_open.append(writer)
                try:
                    while data := await reader.read(65536):
                        writer.write(data)
                finally:
                    upstream_open.remove(writer)
                    writer.close()

            echo_server = await asyncio.start_server(echo_back, "127.0.0.48", 0)
            target = echo_server.sockets[0].getsockname()[:2]
            runtime, _ = _tunnel_runtime(service_upstream, Limits(stream_idle_timeout=60, tunnel_idle_timeout=1))
            ctx = ListenerContext("forward", WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}),
                                  fixed_destination=target)  # not a mesh service: a plain relay
            runtime.start()
            server = await asyncio.get_running_loop().create_server(
                lambda: DispatchProtocol(runtime, ctx), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]

            async def busy():
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                for i in range(6):  # 2.4 s, never idle for 1 s
                    await asyncio.sleep(0.4)
                    writer.write(b"ping%d" % i)
                    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"ping%d" % i
                writer.close()

            async def idle():
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello")
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
                started = time.monotonic()
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
                writer.close()
                return time.monotonic() - started

            try:
                _, elapsed = await asyncio.gather(busy(), idle())
                assert 0.9 <= elapsed < 2.5, elapsed
                assert await asyncio.wait_for(_until(lambda: not upstream_open), 5)
            finally:
                server.close()
                echo_server.close()
                await runtime.close()

        loop.run_until_complete(main())
    finally:
        loop.close()
        service_upstream.stop()
