"""The JSON access log (``--access-log``) through a real `nodeagent proxy`: one line
per opaque TCP connection and one per HTTP request, every field checked against
what the test itself did (bytes it sent and received, how long it held the
connection, which address it used, which upstream answered).

tests/integration/test_proxy_ops.py checks a few fields of an HTTP line; this file
checks the whole line, for HTTP and for the TCP relay (``--forward`` on a TCP port):

- TCP: ``protocol`` TCP, ``response_flags`` ``-``/``UF``, ``bytes_received`` = what
  the client sent, ``bytes_sent`` = what the client received (Envoy's downstream
  byte counts), ``duration`` = how long the connection lived, ``upstream_host``,
  ``upstream_cluster`` as ``outbound|PORT||HOST``, ``downstream_remote_address`` =
  the client's own address, ``start_time`` = when it connected (UTC, to the second);
  written when the connection closes, whichever side closes first;
- HTTP: every documented field (docs/proxy.md, Telemetry).
"""
from __future__ import annotations

import calendar
import http.client
import json
import socket
import threading
import time

import pytest

from tests.integration.istio_yaml import NS, fqdn, service
from tests.integration.proxy_harness import ProxyProcess, read_until_closed
from tests.integration.upstream import UpstreamServer

REPLY = 2500   # bytes the TCP server answers once it has read REQUEST bytes
REQUEST = 1000
GREETING = b"220 server-first greeting\r\n"
GREETING_DELAY = 0.15
HOLD = 0.3     # seconds the client keeps the TCP connection open after the exchange
SLACK = 1.0    # scheduling tolerance for durations, seconds
EARLY = 0.01   # the proxy's clock is read once per event-loop iteration, in whole ms


class SizedServer:
    """TCP server: reads REQUEST bytes, answers REPLY bytes, then waits for the client to
    close. With ``greeting`` it is server-first instead: sends it and closes at once."""

    def __init__(self, host: str, greeting: bytes | None = None) -> None:
        self.greeting = greeting
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.peers: list[tuple[str, int]] = []  # the proxy's upstream-side addresses
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                if self.greeting is not None:
                    # Not at once: the relay must have finished connecting first, see
                    # test_one_tcp_line_per_connection for why.
                    time.sleep(GREETING_DELAY)
                    conn.sendall(self.greeting)
                    return
                got = 0
                while got < REQUEST:
                    part = conn.recv(65536)
                    if not part:
                        return
                    got += len(part)
                conn.sendall(b"r" * REPLY)
                while conn.recv(65536):
                    pass
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class ClosedPort:
    def __init__(self, host: str) -> None:
        with socket.socket() as s:
            s.bind((host, 0))
            self.address = s.getsockname()


def tcp_service(name: str, address, number: int) -> str:
    return service(name, [address], protocol="TCP", port_name="tcp", number=number)


def http_config(server: UpstreamServer) -> str:
    host, port = server.address
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: web
  namespace: {NS}
spec:
  hosts:
  - {fqdn("web")}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  workloadSelector:
    labels:
      app: web
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: web-0
  namespace: {NS}
spec:
  address: {host}
  ports:
    http: {port}
  labels:
    app: web
    version: v3
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: {NS}
spec:
  host: {fqdn("web")}
  subsets:
  - name: v3
    labels:
      version: v3
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: {NS}
spec:
  hosts:
  - {fqdn("web")}
  http:
  - name: bytes-route
    match:
    - uri:
        prefix: /bytes
    route:
    - destination:
        host: {fqdn("web")}
        subset: v3
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: frontend
  namespace: {NS}
spec:
  address: 127.0.0.1
  serviceAccount: frontend
  labels:
    app: frontend
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-access-log")
    sized = SizedServer("127.0.9.1")
    greeter = SizedServer("127.0.9.2", greeting=GREETING)
    dead = ClosedPort("127.0.9.3")
    web = UpstreamServer("web0", host="127.0.9.4").start()
    (d / "config.yaml").write_text(tcp_service("db", sized.address, 5432) + tcp_service("smtp", greeter.address, 25)
                                   + tcp_service("gone", dead.address, 6379) + http_config(web))
    proxy = ProxyProcess(d, metrics=False, access_log=True, extra=(
        "--forward", f"127.0.0.1:0={fqdn('db')}:5432",
        "--forward", f"127.0.0.1:0={fqdn('smtp')}:25",
        "--forward", f"127.0.0.1:0={fqdn('gone')}:6379",
    )).start()
    try:
        yield proxy, {"db": sized, "smtp": greeter, "gone": dead, "web": web}
    finally:
        proxy.stop()
        sized.stop()
        greeter.stop()
        web.stop()


def records(proxy) -> list[dict]:
    out = []
    for line in list(proxy.stdout):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"an access-log line is not JSON: {line!r}") from None
    return out


def wait_records(proxy, predicate, want: int = 1, timeout: float = 3.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(proxy) if predicate(r)]
        if len(found) >= want or time.monotonic() >= deadline:
            return found
        time.sleep(0.02)


def start_time(rec: dict) -> float:
    """``start_time`` (``YYYY-MM-DDTHH:MM:SSZ``, UTC) as a Unix time."""
    return calendar.timegm(time.strptime(rec["start_time"], "%Y-%m-%dT%H:%M:%SZ"))


TCP_FIELDS = {"start_time", "protocol", "response_flags", "bytes_received", "bytes_sent", "duration",
              "upstream_host", "upstream_cluster", "upstream_transport_failure_reason", "downstream_remote_address"}
HTTP_FIELDS = {"start_time", "method", "path", "protocol", "response_code", "response_flags", "bytes_received",
               "bytes_sent", "duration", "authority", "upstream_host", "upstream_cluster",
               "upstream_transport_failure_reason", "route_name",
               "downstream_remote_address", "source_workload", "source_namespace", "destination_service",
               "user_agent", "request_id", "attempts", "worker"}


def test_tcp_connection_line_client_closes(env):
    proxy, servers = env
    server = servers["db"]
    wall, started = time.time(), time.monotonic()
    sock = socket.create_connection(("127.0.0.1", proxy.ports[1]), timeout=5)
    me = "%s:%d" % sock.getsockname()
    try:
        sock.sendall(b"q" * REQUEST)
        got = 0
        while got < REPLY:
            part = sock.recv(65536)
            assert part, "the relay closed early"
            got += len(part)
        time.sleep(HOLD)
        assert not wait_records(proxy, lambda r: r.get("downstream_remote_address") == me, timeout=0.1), \
            "the line is written when the connection ends, not before"
    finally:
        sock.close()
    lived = time.monotonic() - started
    [rec] = wait_records(proxy, lambda r: r.get("downstream_remote_address") == me)
    assert set(rec) == TCP_FIELDS, sorted(rec)
    assert rec["protocol"] == "TCP" and rec["response_flags"] == "-", rec
    assert rec["bytes_received"] == REQUEST and rec["bytes_sent"] == REPLY, rec
    assert rec["upstream_host"] == "%s:%d" % server.address, rec
    assert rec["upstream_cluster"] == f"outbound|5432||{fqdn('db')}", rec
    assert (HOLD - EARLY) * 1000 <= rec["duration"] <= (lived + SLACK) * 1000, (rec, lived)
    assert int(wall) - 1 <= start_time(rec) <= wall + 1, (rec, wall)


def test_tcp_connection_line_server_closes_first(env):
    """A server-first protocol: the upstream sends a greeting and closes; the relay closes
    the client; the line counts the greeting as sent and nothing received."""
    proxy, servers = env
    sock = socket.create_connection(("127.0.0.1", proxy.ports[2]), timeout=5)
    me = "%s:%d" % sock.getsockname()
    try:
        data = read_until_closed(sock, 5)
    finally:
        sock.close()
    assert data == GREETING
    [rec] = wait_records(proxy, lambda r: r.get("downstream_remote_address") == me)
    assert set(rec) == TCP_FIELDS, sorted(rec)
    assert rec["response_flags"] == "-", rec
    assert rec["bytes_sent"] == len(GREETING) and rec["bytes_received"] == 0, rec
    assert rec["upstream_host"] == "%s:%d" % servers["smtp"].address, rec
    assert rec["upstream_cluster"] == f"outbound|25||{fqdn('smtp')}", rec
    assert (GREETING_DELAY - EARLY) * 1000 <= rec["duration"] <= (GREETING_DELAY + SLACK) * 1000, rec


def test_tcp_connection_line_upstream_refused(env):
    proxy, servers = env
    sock = socket.create_connection(("127.0.0.1", proxy.ports[3]), timeout=5)
    me = "%s:%d" % sock.getsockname()
    try:
        sock.sendall(b"PING\r\n")
        try:
            assert read_until_closed(sock, 5) == b""
        except ConnectionResetError:
            pass  # closed with the client's bytes unread: a reset is a close too
    finally:
        sock.close()
    [rec] = wait_records(proxy, lambda r: r.get("downstream_remote_address") == me)
    assert rec["protocol"] == "TCP" and rec["response_flags"] == "UF", rec
    assert rec["bytes_sent"] == 0, rec
    assert rec["bytes_received"] in (0, 6), rec  # the client's bytes may arrive before the refusal or not
    assert rec["upstream_host"] == "%s:%d" % servers["gone"].address, rec
    assert rec["upstream_cluster"] == f"outbound|6379||{fqdn('gone')}", rec


def test_one_tcp_line_per_connection(env):
    """Client-first exchanges, the client closing first. (A server that sends and closes
    while the relay is still connecting to it, with the client closing in that same window,
    is a relay that never closes: reported as a bug, kept out of this file.)"""
    proxy, _ = env
    mine = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", proxy.ports[1]), timeout=5)
        mine.append("%s:%d" % sock.getsockname())
        sock.sendall(b"q" * REQUEST)
        got = 0
        while got < REPLY:
            part = sock.recv(65536)
            assert part
            got += len(part)
        sock.close()
    recs = wait_records(proxy, lambda r: r.get("downstream_remote_address") in mine, want=3)
    time.sleep(0.2)
    recs = [r for r in records(proxy) if r.get("downstream_remote_address") in mine]
    assert sorted(r["downstream_remote_address"] for r in recs) == sorted(mine), recs
    assert all(r["bytes_received"] == REQUEST and r["bytes_sent"] == REPLY for r in recs), recs


def test_http_request_line_has_every_field(env):
    proxy, servers = env
    web = servers["web"]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        wall, started = time.time(), time.monotonic()
        conn.connect()
        me = "%s:%d" % conn.sock.getsockname()
        body = b"b" * 123
        conn.request("POST", "/bytes/4321?x=1", body=body, headers={
            "Host": fqdn("web"), "user-agent": "access-log-test/1", "x-request-id": "rid-42", "x-delay": "0.3"})
        resp = conn.getresponse()
        payload = resp.read()
        elapsed = time.monotonic() - started
        assert resp.status == 200 and len(payload) == 4321
        assert resp.getheader("x-instance") == "web0"
    finally:
        conn.close()
    [rec] = wait_records(proxy, lambda r: r.get("request_id") == "rid-42")
    assert set(rec) == HTTP_FIELDS, sorted(set(rec) ^ HTTP_FIELDS)
    assert rec["method"] == "POST" and rec["path"] == "/bytes/4321?x=1", rec
    assert rec["protocol"] == "HTTP/1.1", rec
    assert rec["response_code"] == 200 and rec["response_flags"] == "-", rec
    assert rec["bytes_received"] == 123 and rec["bytes_sent"] == 4321, rec
    assert (0.3 - EARLY) * 1000 <= rec["duration"] <= (elapsed + EARLY) * 1000, (rec, elapsed)
    assert rec["authority"] == fqdn("web"), rec
    assert rec["upstream_host"] == "%s:%d" % web.address, rec
    assert rec["upstream_cluster"] == f"outbound|80|v3|{fqdn('web')}", rec
    assert rec["route_name"] == "bytes-route", rec
    assert rec["downstream_remote_address"] == me, rec
    assert rec["source_workload"] == "frontend" and rec["source_namespace"] == NS, rec
    assert rec["destination_service"] == fqdn("web"), rec
    assert rec["user_agent"] == "access-log-test/1", rec
    assert rec["attempts"] == 1, rec
    assert rec["worker"] == proxy.proc.pid, rec  # one worker: the proxy process itself
    assert int(wall) - 1 <= start_time(rec) <= wall + 1, (rec, wall)


def test_http_byte_counts_are_body_bytes_without_chunk_framing(env):
    """Envoy's BYTES_RECEIVED / BYTES_SENT count body bytes: a chunked upload of 300 + 700
    bytes is 1000 received, a chunked download of 70000 bytes is 70000 sent."""
    proxy, _ = env
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("POST", "/bytes/70000?chunked=1", body=iter([b"a" * 300, b"b" * 700]), encode_chunked=True,
                     headers={"Host": fqdn("web"), "x-request-id": "rid-chunked"})
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked" and len(payload) == 70000
    [rec] = wait_records(proxy, lambda r: r.get("request_id") == "rid-chunked")
    assert rec["bytes_received"] == 1000 and rec["bytes_sent"] == 70000, rec
