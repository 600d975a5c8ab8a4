"""HTTP/1.1 engine behaviour through `nodeagent proxy`: streaming, keep-alive,
pipelining, 100-continue, HEAD, Upgrade, limits, garbage, TCP relay, and what the sniffer
of a grpc port hands to the HTTP engine (HTTP/1.x and the HTTP/2 preface)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded

from tests.integration.grpc_upstream import GrpcServer
from tests.integration.proxy_harness import ProxyProcess, metric_value, read_until_closed, service_config
from tests.integration.upstream import UpstreamServer, pattern_block

HOST = "echo.shop.svc.cluster.local"


class TcpEcho:
    """A plain TCP echo server (a non-HTTP service)."""

    def __init__(self, host: str = "127.0.0.21") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-http")
    echo = UpstreamServer("e0", host="127.0.0.31").start()
    tcp = TcpEcho()
    (d / "echo.yaml").write_text(service_config("echo", [echo]))
    (d / "db.yaml").write_text(service_config("db", [tcp], protocol="TCP", port_name="tcp", number=5432) + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: db
  namespace: shop
spec:
  host: db.shop.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
""")
    rpc = UpstreamServer("rpc0", host="127.0.0.32").start()
    (d / "rpc.yaml").write_text(service_config("rpc", [rpc], protocol="GRPC", port_name="grpc", number=9000))
    proxy = ProxyProcess(d, extra=(
        "--header-timeout", "1",
        "--forward", "127.0.0.1:0=db.shop.svc.cluster.local:5432",
        "--forward", "127.0.0.1:0=rpc.shop.svc.cluster.local:9000",
        "--forward", "127.0.0.1:0=echo.shop.svc.cluster.local:80",
    )).start()
    yield proxy, echo
    proxy.stop()
    echo.stop()
    rpc.stop()
    tcp.stop()


_READERS: dict = {}


def read_response(sock: socket.socket, head_only: bool = False) -> tuple:
    """Read one HTTP/1.1 response (content-length or chunked), keeping any bytes that
    belong to the next (pipelined) response for the next call."""
    reader = _READERS.get(sock)
    if reader is None:
        reader = _READERS[sock] = sock.makefile("rb")
    status = reader.readline().rstrip(b"\r\n")
    assert status, "connection closed before a response head"
    headers = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    if head_only:
        return status, headers, reader  # the caller reads the rest through the same buffer
    if "content-length" in headers:
        return status, headers, reader.read(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(reader.readline().strip(), 16)
            body += reader.read(size)
            reader.readline()
            if size == 0:
                return status, headers, body
    return status, headers, reader.read()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_keep_alive_reuses_client_and_upstream_connections(env):
    proxy, echo = env
    before = echo.connections
    sock = proxy.raw()
    for i in range(20):
        sock.sendall(f"GET /k{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        status, headers, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["path"] == f"/k{i}"
    sock.close()
    assert echo.connections - before <= 1, "upstream connection is pooled and kept alive"


def test_pipelined_requests_are_answered_in_order(env):
    proxy, _ = env
    sock = proxy.raw()
    # Different delays: a later request must not overtake an earlier one.
    reqs = b"".join(
        f"GET /p{i} HTTP/1.1\r\nHost: {HOST}\r\nx-delay: {0.2 if i == 0 else 0}\r\n\r\n".encode()
        for i in range(6)
    )
    sock.sendall(reqs)
    paths = []
    for _ in range(6):
        _, _, body = read_response(sock)
        paths.append(json.loads(body)["path"])
    sock.close()
    assert paths == [f"/p{i}" for i in range(6)]


def test_expect_100_continue(env):
    proxy, _ = env
    sock = proxy.raw()
    sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode())
    interim = sock.recv(65536)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(b"hello")
    status, _, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200")
    record = json.loads(body)
    assert record["body"] == "hello"
    assert "expect" not in record["headers"]
    sock.close()


def test_head_has_no_body_and_connection_stays_usable(env):
    proxy, _ = env
    sock = proxy.raw()
    sock.sendall(f"HEAD /h HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    status, headers, _ = read_response(sock, head_only=True)
    assert status.startswith(b"HTTP/1.1 200")
    assert headers["content-length"] == "1234"
    # Had the proxy sent a body after the HEAD response, it would be read as the next status line.
    sock.sendall(f"GET /after-head HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    status, _, body = read_response(sock)
    assert json.loads(body)["path"] == "/after-head"
    sock.close()


def test_upgrade_switches_to_a_raw_relay(env):
    proxy, echo = env
    sock = proxy.raw()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())
    status, headers, reader = read_response(sock, head_only=True)
    assert status.startswith(b"HTTP/1.1 101")
    assert headers["upgrade"] == "websocket"
    payload = b"\x81\x05hello-not-http\r\n\r\n" * 100
    sock.sendall(payload)
    assert reader.read(len(payload)) == payload
    sock.close()


def test_chunked_upload_of_50mb_streams_without_buffering(env):
    proxy, _ = env
    pid = proxy.proc.pid
    base = rss_kb(pid)
    sock = proxy.raw(timeout=30)
    sock.sendall(f"POST /big HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    block = bytes(range(256)) * 256  # 64 KiB
    sha = hashlib.sha256()
    peak = base
    for i in range(800):  # 50 MiB
        sock.sendall(b"%x\r\n%b\r\n" % (len(block), block))
        sha.update(block)
        if i % 100 == 0:
            peak = max(peak, rss_kb(pid))
    sock.sendall(b"0\r\n\r\n")
    status, _, body = read_response(sock)
    record = json.loads(body)
    assert record["body_len"] == 800 * 65536
    assert record["body_sha256"] == sha.hexdigest()
    assert peak - base < 20_000, f"proxy RSS grew by {peak - base} KiB while streaming 50 MiB"
    sock.close()


def test_chunked_download_of_50mb_streams_without_buffering(env):
    proxy, _ = env
    pid = proxy.proc.pid
    base = rss_kb(pid)
    sock = proxy.raw(timeout=30)
    sock.sendall(f"GET /bytes/52428800?chunked=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    status, headers, reader = read_response(sock, head_only=True)
    assert headers["transfer-encoding"] == "chunked"
    # Read slowly at first: the proxy must push back on the upstream, not buffer.
    time.sleep(0.5)
    mid = rss_kb(pid)
    total = 0
    while True:
        size = int(reader.readline().strip(), 16)
        total += len(reader.read(size))
        reader.readline()
        if size == 0:
            break
    assert total == 52428800
    assert mid - base < 20_000, f"proxy RSS grew by {mid - base} KiB with a stalled reader"
    sock.close()


def test_a_download_to_a_stalled_reader_arrives_whole_and_in_order(env):
    """The proxy writes straight to the client's socket while its transport holds nothing
    (upstream.wire_write) and through the transport once the kernel stops taking bytes: a
    reader that stalls, then reads, must still get every block once and in order."""
    proxy, _ = env
    total = 256 * 65536 + 123  # 16 MiB: more than the kernel buffers between proxy and client
    for chunked in ("0", "1"):
        sock = proxy.raw(timeout=30)
        sock.sendall(f"GET /bytes/{total}?pattern=1&chunked={chunked} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        time.sleep(0.3)  # stalled: the proxy's sends come back short, then EAGAIN
        status, headers, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200"), status
        expected = b"".join(pattern_block(i) for i in range(total // 65536 + 1))[:total]
        assert len(body) == total
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest(), "blocks lost or reordered"
        # the same connection then serves the next request (its transport drained)
        status, _, body = proxy_request_on(sock, "/after")
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body)["path"] == "/after"
        sock.close()


def proxy_request_on(sock: socket.socket, path: str) -> tuple:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    return read_response(sock)


def test_content_length_upload_and_chunked_response(env):
    proxy, _ = env
    status, headers, body = proxy.request("/cl", host=HOST, method="PUT", body=b"x" * 100_000,
                                          headers={"x-chunked-response": "1"})
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked"
    assert json.loads(body)["body_len"] == 100_000


def test_oversized_header_gets_431(env):
    proxy, _ = env
    sock = proxy.raw()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nx-big: {'a' * 70_000}\r\n\r\n".encode())
    assert read_until_closed(sock).startswith(b"HTTP/1.1 431")
    sock = proxy.raw()
    many = "".join(f"x-h{i}: v\r\n" for i in range(150))
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n{many}\r\n".encode())
    assert read_until_closed(sock).startswith(b"HTTP/1.1 431")


def test_an_error_answer_survives_unread_client_bytes(env):
    # The client is still sending (a 70 KB header, then more) when the proxy answers 431. The
    # proxy drains and drops the rest before closing (Envoy's delayed close): closing with
    # unread input would make the kernel reset the connection, destroying the 431 unread.
    proxy, _ = env
    for _ in range(3):
        sock = proxy.raw()
        errors = []

        def send():
            try:
                sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nx-big: {'a' * 70_000}".encode())
                sock.sendall(b"b" * 2_000_000)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431")
        sender.join(10)
        assert not sender.is_alive() and errors == []
        sock.close()


def test_slow_request_head_gets_408(env):
    proxy, _ = env
    sock = proxy.raw()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n".encode())  # never finished
    started = time.monotonic()
    data = read_until_closed(sock, limit=5)
    assert data.startswith(b"HTTP/1.1 408")
    assert 0.9 <= time.monotonic() - started < 3


def test_garbage_on_http_port_gets_400_and_proxy_keeps_serving(env):
    proxy, _ = env
    sock = proxy.raw()
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert read_until_closed(sock).startswith(b"HTTP/1.1 400")
    status, _, _ = proxy.request("/still-alive", host=HOST)
    assert status == 200


def test_tcp_service_is_relayed_as_opaque_bytes(env):
    proxy, _ = env
    sock = socket.create_connection(("127.0.0.1", proxy.ports[1]), timeout=5)
    payload = b"\x00\x01binary, not HTTP\xff" * 1000
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += sock.recv(65536)
    assert got == payload
    sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = proxy.metrics()
        if metric_value(text, "istio_tcp_connections_closed_total", destination_service="db.shop.svc.cluster.local") >= 1:
            break
        time.sleep(0.1)
    labels = dict(destination_service="db.shop.svc.cluster.local", request_protocol="tcp",
                  source_workload="frontend")
    assert metric_value(text, "istio_tcp_connections_opened_total", **labels) >= 1
    assert metric_value(text, "istio_tcp_connections_closed_total", **labels) >= 1
    assert metric_value(text, "istio_tcp_sent_bytes_total", **labels) >= len(payload)
    assert metric_value(text, "istio_tcp_received_bytes_total", **labels) >= len(payload)


def _h2_get(port: int, host: str, path: str, split: int) -> tuple:
    """One HTTP/2 prior-knowledge GET with the h2 library, the connection preface split over
    two writes after ``split`` bytes: the response's headers and body (None if no answer)."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", host), (":path", path)],
                      end_stream=True)
    wire = conn.data_to_send()
    headers, body = None, b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wire[:split])
        time.sleep(0.1)  # the sniffer holds the first bytes until the line is complete
        sock.sendall(wire[split:])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    headers = dict(event.headers)
                elif isinstance(event, DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    return headers, body
            sock.sendall(conn.data_to_send())
    return headers, body


def test_grpc_port_speaks_http1_when_the_client_does_and_http2_on_the_preface(env):
    proxy, _ = env
    port = proxy.ports[2]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /rpc HTTP/1.1\r\nHost: rpc\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200") and headers["x-instance"] == "rpc0"
    assert json.loads(body)["headers"]["host"] == "rpc"
    sock.close()
    # HTTP/2 prior knowledge is parsed by the proxy (not relayed to the upstream, which would
    # answer "HTTP/1.1 400"), even with the preface split over reads; the upstream here is an
    # HTTP/1.1 server, so the proxy's HTTP/2 connection to it fails: its own 503, in HTTP/2.
    for split in (3, 9, 15):
        headers, body = _h2_get(port, "rpc", "/rpc", split)
        assert headers is not None and headers[":status"] == "503", (split, headers)
        assert body.startswith(b"upstream connect error")
    # not the preface after all: relayed as bytes, as before
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"PRIX\r\n\r\n")
    reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400") and b"content-length: 0" in reply



def test_listener_bound_to_a_service_routes_whatever_the_host_header(env):
    proxy, echo = env
    sock = socket.create_connection(("127.0.0.1", proxy.ports[3]), timeout=5)
    sock.sendall(b"GET /bound HTTP/1.1\r\nHost: localhost:1234\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200") and headers["x-instance"] == echo.name
    assert json.loads(body)["headers"]["host"] == "localhost:1234"
    sock.close()


def test_close_delimited_upstream_body_is_complete_not_a_reset(env):
    proxy, _ = env
    sock = proxy.raw()
    for _ in range(2):  # the client connection stays usable
        sock.sendall(f"GET /eof HTTP/1.1\r\nHost: {HOST}\r\nx-close-delimited: 1\r\n\r\n".encode())
        status, headers, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200") and headers["transfer-encoding"] == "chunked"
        assert body == b"body-until-close" * 1000
    sock.close()


def test_tcp_max_connections_refuses_the_overflow(env):
    proxy, _ = env
    port = proxy.ports[1]

    def echo_once(sock) -> bool:
        try:
            sock.sendall(b"ping")
            return sock.recv(16) == b"ping"
        except OSError:
            return False

    first = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert echo_once(first)
    second = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert not echo_once(second), "a second connection exceeds maxConnections: 1"
    second.close()
    first.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        third = socket.create_connection(("127.0.0.1", port), timeout=5)
        ok = echo_once(third)
        third.close()
        if ok:
            break
        time.sleep(0.1)
    assert ok, "the slot is free again once the first connection closed"
    assert metric_value(proxy.metrics(), "istio_tcp_connections_opened_total",
                        destination_service="db.shop.svc.cluster.local", response_flags="UO") >= 1


def test_http10_keep_alive_and_close(env):
    proxy, _ = env
    sock = proxy.raw()
    sock.sendall(f"GET /ten HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n".encode())
    status, headers, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200") and headers["connection"] == "keep-alive"
    sock.sendall(f"GET /ten-again HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
    status, headers, body = read_response(sock)
    assert json.loads(body)["path"] == "/ten-again" and headers["connection"] == "close"
    sock.close()


@pytest.fixture(scope="module")
def grpc_env(tmp_path_factory):
    """A grpcio server behind a grpc port, its own proxy (a gRPC server in the test process
    for this test only: its threads would slow the other tests' clients)."""
    d = tmp_path_factory.mktemp("proxy-http-grpc")
    g = GrpcServer("g0", host="127.0.0.33").start()
    (d / "g.yaml").write_text(service_config("g", [g], protocol="GRPC", port_name="grpc", number=9001))
    proxy = ProxyProcess(d, extra=("--forward", "127.0.0.1:0=g.shop.svc.cluster.local:9001")).start()
    yield proxy
    proxy.stop()
    g.stop()


def test_grpc_client_on_a_forwarded_grpc_port_is_served_at_l7(grpc_env):
    """The connection to the grpc port (a listener bound to the service, as a captured one)
    starts with the HTTP/2 preface: the HTTP engine serves every call (grpc metrics, not TCP)."""
    proxy = grpc_env
    with grpc.insecure_channel(f"127.0.0.1:{proxy.ports[1]}") as channel:
        for _ in range(3):
            assert channel.unary_unary("/test.Echo/Which")(b"", timeout=5) == b"g0"
    text = proxy.metrics()
    labels = dict(destination_service="g.shop.svc.cluster.local")
    assert metric_value(text, "istio_requests_total", request_protocol="grpc", response_code="200",
                        grpc_response_status="0", **labels) == 3
    assert metric_value(text, "istio_tcp_connections_opened_total", **labels) == 0
