"""x-request-id through a real `nodeagent proxy` (HTTP/1.1 and HTTP/2) and through two agents
joined by the mTLS tunnel: generated when the client sent none (or an empty one), kept when
it sent one, the same on retries and mirrors, forwarded exactly once, and in every access-log
line, local replies included; both agents of a mesh hop log the same id (docs/proxy.md,
"x-request-id")."""
from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import socket
import threading
import time
import uuid

import grpc
import httptools
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded

from nodeagent.identity.ca import CADirectory
from nodeagent.telemetry import AccessLog
from tests.integration.grpc_upstream import GrpcServer
from tests.integration.proxy_harness import ProxyProcess, service_config
from tests.integration.test_mesh_grpc import G_HOST, grpc_service
from tests.integration.test_mesh_loopback import ALLOW_ONLY_A, B_ADDR, Mesh, get

pytestmark = pytest.mark.timeout(60)

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NS = "shop"


def fqdn(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


class RecordingUpstream:
    """An HTTP/1.1 upstream on loopback that keeps every request's header lines as received
    (repeated headers stay repeated) and answers ``status`` with the body ``ok``."""

    def __init__(self, host: str, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []  # (path, [(lower name, value)])
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        done: list[tuple[str, list]] = []
        current: dict = {}

        class Callbacks:
            def on_message_begin(self_inner):
                current.update(url=b"", headers=[])

            def on_url(self_inner, url):
                current["url"] += url

            def on_header(self_inner, name, value):
                current["headers"].append((name.decode().lower(), value.decode("latin-1")))

            def on_message_complete(self_inner):
                done.append((current["url"].decode(), current["headers"]))

        parser = httptools.HttpRequestParser(Callbacks())
        conn.settimeout(10)
        with conn:
            try:
                while not self._stop.is_set():
                    data = conn.recv(65536)
                    if not data:
                        return
                    parser.feed_data(data)
                    while done:
                        self.requests.append(done.pop(0))
                        conn.sendall(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % self.status)
            except (OSError, httptools.HttpParserError):
                return

    def ids(self, path: str) -> list[list[str]]:
        """The x-request-id values of each request for ``path``, in arrival order."""
        return [[v for n, v in headers if n == "x-request-id"] for p, headers in self.requests if p == path]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def vs(host: str, http: str) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {host}
  namespace: {NS}
spec:
  hosts:
  - {fqdn(host)}
  http:
{http}"""


def routes() -> str:
    return "".join([
        vs("retry", f"""  - retries:
      attempts: 2
      retryOn: 5xx
    headers:
      request:
        add:
          x-added: by-the-route
    route:
    - destination:
        host: {fqdn("retry")}
"""),
        vs("mirrored", f"""  - route:
    - destination:
        host: {fqdn("mirrored")}
    mirror:
      host: {fqdn("shadow")}
    mirrorPercentage:
      value: 100
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
        vs("setter", f"""  - headers:
      request:
        set:
          x-request-id: set-by-the-route
    route:
    - destination:
        host: {fqdn("setter")}
"""),
        vs("direct", """  - directResponse:
      status: 209
      body:
        string: answered by the proxy
"""),
    ])


class ClosedPort:
    def __init__(self, host: str) -> None:
        with socket.socket() as s:
            s.bind((host, 0))
            self.address = s.getsockname()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("request-id")
    ups = {
        "web": [RecordingUpstream("127.0.0.61")],
        "retry": [RecordingUpstream("127.0.0.62", status=503), RecordingUpstream("127.0.0.63")],
        "mirrored": [RecordingUpstream("127.0.0.64")],
        "shadow": [RecordingUpstream("127.0.0.65")],
        "abort": [RecordingUpstream("127.0.0.66")],
        "direct": [RecordingUpstream("127.0.0.67")],
        "setter": [RecordingUpstream("127.0.0.69")],
    }
    for name, servers in ups.items():
        (d / f"{name}.yaml").write_text(service_config(name, servers))
    (d / "dead.yaml").write_text(service_config("dead", [ClosedPort("127.0.0.68")]))
    grpc_app = GrpcServer("g").start()
    (d / "g.yaml").write_text(service_config("g", [grpc_app], protocol="GRPC", port_name="grpc", number=50051))
    (d / "routes.yaml").write_text(routes())
    proxy = ProxyProcess(d, access_log=True).start()
    yield proxy, ups, grpc_app
    proxy.stop()
    grpc_app.stop()
    for servers in ups.values():
        for s in servers:
            s.stop()


def request(proxy, host: str, path: str, headers: dict | None = None, method: str = "GET",
            body: bytes | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": fqdn(host), **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def log_line(proxy, path: str, timeout: float = 5.0) -> dict:
    """The one access-log line of the request for ``path`` (each test uses its own paths)."""
    found = proxy.wait_access_log(lambda rec: rec.get("path") == path, timeout=timeout)
    assert len(found) == 1, found
    return found[0]


def wait_for(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def test_a_request_without_an_id_gets_a_generated_uuid_upstream_and_in_the_log(env):
    proxy, ups, _ = env
    web = ups["web"][0]
    assert request(proxy, "web", "/gen-1") == 200
    [[rid]] = web.ids("/gen-1")  # forwarded exactly once
    assert UUID4.fullmatch(rid), rid
    assert uuid.UUID(rid).version == 4
    assert log_line(proxy, "/gen-1")["request_id"] == rid


def test_each_request_gets_its_own_id(env):
    proxy, ups, _ = env
    web = ups["web"][0]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(20):  # one keep-alive connection
            conn.request("GET", "/many", headers={"Host": fqdn("web")})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
    finally:
        conn.close()
    ids = web.ids("/many")
    assert len(ids) == 20 and all(len(i) == 1 and UUID4.fullmatch(i[0]) for i in ids), ids
    assert len({i[0] for i in ids}) == 20


def test_a_client_id_is_kept_unchanged(env):
    proxy, ups, _ = env
    web = ups["web"][0]
    mine = "Client-Chosen/42 not a uuid"
    assert request(proxy, "web", "/kept", {"X-Request-ID": mine}) == 200
    assert web.ids("/kept") == [[mine]]
    assert log_line(proxy, "/kept")["request_id"] == mine


def test_an_empty_id_is_replaced(env):
    proxy, ups, _ = env
    web = ups["web"][0]
    assert request(proxy, "web", "/empty", {"x-request-id": ""}) == 200
    [[rid]] = web.ids("/empty")
    assert UUID4.fullmatch(rid), rid
    assert log_line(proxy, "/empty")["request_id"] == rid


def test_retries_resend_the_same_id_once_with_route_header_operations(env):
    """retries: 2 over a failing and a healthy endpoint; the route also adds a header (the
    generated id then travels as a header pair, not as the ready line)."""
    proxy, ups, _ = env
    bad, good = ups["retry"]
    for i in range(20):
        path = f"/retry-{i}"
        assert request(proxy, "retry", path) == 200
        if bad.ids(path):
            break
    [[first]] = bad.ids(path)
    [[second]] = good.ids(path)
    assert UUID4.fullmatch(first) and second == first
    headers = dict(next(h for p, h in good.requests if p == path))
    assert headers["x-added"] == "by-the-route" and headers["x-envoy-attempt-count"] == "2"
    rec = log_line(proxy, path)
    assert (rec["request_id"], rec["attempts"]) == (first, 2)


def test_a_route_header_operation_replaces_a_generated_id(env):
    """VirtualService headers.request.set on x-request-id: the upstream gets the route's value,
    once (a generated id is one of the headers the operation sees, not a line added after), and
    the access log shows it, as Envoy's (its router sets it in the request's own headers)."""
    proxy, ups, _ = env
    assert request(proxy, "setter", "/set") == 200
    assert ups["setter"][0].ids("/set") == [["set-by-the-route"]]
    assert log_line(proxy, "/set")["request_id"] == "set-by-the-route"


@pytest.mark.parametrize("client_id", [None, "mirror-me-7"])
def test_a_mirror_carries_the_original_requests_id(env, client_id):
    proxy, ups, _ = env
    primary, shadow = ups["mirrored"][0], ups["shadow"][0]
    path = f"/mirror-{client_id}"
    headers = {"x-request-id": client_id} if client_id else {}
    assert request(proxy, "mirrored", path, headers, method="POST", body=b"copy me") == 200
    assert wait_for(lambda: shadow.ids(path))
    [[rid]] = primary.ids(path)
    assert shadow.ids(path) == [[rid]]
    assert rid == client_id if client_id else UUID4.fullmatch(rid)
    assert log_line(proxy, path)["request_id"] == rid


@pytest.mark.parametrize("host, status, flags", [
    ("abort", 418, "FI"), ("direct", 209, "-"), ("nothing", 404, "NR"), ("dead", 503, "UF"),
])
def test_local_replies_log_an_id(env, host, status, flags):
    proxy, ups, _ = env
    path = f"/local-{host}"
    assert request(proxy, host, path) == status
    rec = log_line(proxy, path)
    assert (rec["response_code"], rec["response_flags"]) == (status, flags), rec
    assert UUID4.fullmatch(rec["request_id"]), rec
    assert request(proxy, host, path + "-kept", {"x-request-id": f"kept-{host}"}) == status
    assert log_line(proxy, path + "-kept")["request_id"] == f"kept-{host}"
    for servers in ups.values():
        assert not any(s.ids(path) for s in servers)  # answered by the proxy itself


def _grpc(proxy, method: str, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                               options=[("grpc.default_authority", f"{fqdn('g')}:50051")]) as ch:
        return ch.unary_unary(f"/test.Echo/{method}")(b"x", timeout=10, metadata=metadata)


def test_grpc_over_http2_gets_an_id_and_keeps_a_clients(env):
    proxy, _, app = env
    assert _grpc(proxy, "Which") == b"g"
    rid = app.seen_metadata[-1]["x-request-id"]
    assert UUID4.fullmatch(rid), rid
    rec = log_line(proxy, "/test.Echo/Which")
    assert (rec["protocol"], rec["request_id"]) == ("HTTP/2", rid)
    assert _grpc(proxy, "Second", metadata=(("x-request-id", "grpc-client-1"),)) == b"g"
    assert app.seen_metadata[-1]["x-request-id"] == "grpc-client-1"
    assert log_line(proxy, "/test.Echo/Second")["request_id"] == "grpc-client-1"
    # a local reply on an HTTP/2 stream: no route for the method's path on an unknown host
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                               options=[("grpc.default_authority", "nothing.shop.svc.cluster.local")]) as ch:
        with pytest.raises(grpc.RpcError):
            ch.unary_unary("/test.Echo/Nowhere")(b"x", timeout=10)
    rec = log_line(proxy, "/test.Echo/Nowhere")
    assert rec["response_flags"] == "NR" and UUID4.fullmatch(rec["request_id"]), rec


def _h2_get(port: int, authority: str, path: str, extra=()) -> int:
    """One HTTP/2 (prior knowledge) GET with the h2 library; returns the status."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", authority),
                                (":path", path), *extra], end_stream=True)
        sock.sendall(conn.data_to_send())
        status = None
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, StreamEnded):
                    return status
            sock.sendall(conn.data_to_send())


def test_http2_client_to_an_http1_upstream(env):
    proxy, ups, _ = env
    web = ups["web"][0]
    assert _h2_get(proxy.port, fqdn("web"), "/h2-gen") == 200
    [[rid]] = web.ids("/h2-gen")
    assert UUID4.fullmatch(rid), rid
    assert log_line(proxy, "/h2-gen")["request_id"] == rid
    assert _h2_get(proxy.port, fqdn("web"), "/h2-kept", [("x-request-id", "h2-client")]) == 200
    assert web.ids("/h2-kept") == [["h2-client"]]
    assert _h2_get(proxy.port, fqdn("web"), "/h2-empty", [("x-request-id", "")]) == 200
    [[rid]] = web.ids("/h2-empty")
    assert UUID4.fullmatch(rid), rid


# --------------------------------------------------------------------------- through the mesh


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    return CADirectory.init(tmp_path_factory.mktemp("reqid-mesh") / "ca", now=time.time() - 10 * 86400.0)


def _lines(log: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in log.getvalue().splitlines()]


def test_both_agents_of_a_mesh_hop_log_the_same_id(ca_dir):
    """A -> node 1 -> tunnel -> node 2 -> B: node 1 generates the id, B receives it, both
    agents log it. C is denied by B's policy at node 2 (403 RBAC): both log that id too.
    Node 2's plaintext inbound listener generates one for a request that comes without."""
    src_log, dst_log = io.StringIO(), io.StringIO()
    seen = {}

    async def scenario():
        mesh = await Mesh(ca_dir, ALLOW_ONLY_A).start()
        mesh.node1.runtime.access_log = AccessLog(src_log)
        mesh.node2.runtime.access_log = AccessLog(dst_log)
        try:
            status, _, body = await get(mesh.a_out, "/hop")
            assert status == 200, body
            seen["hop"] = json.loads(body)["headers"]["x-request-id"]
            status, _, body = await get(mesh.c_out, "/denied")
            assert (status, body.strip()) == (403, b"RBAC: access denied")
            # plaintext to node 2's inbound listener: denied by B's policy (no peer identity),
            # then allowed once the policy is gone
            plain_listener = await mesh.node2.plaintext(mesh.b, B_ADDR, mesh.app.address)
            status, _, body = await get(plain_listener, "/plain-denied")
            assert status == 403, body
            mesh.set_config("")
            status, _, body = await get(plain_listener, "/plain")
            assert status == 200, body
            seen["plain"] = json.loads(body)["headers"]["x-request-id"]
        finally:
            await mesh.close()
    asyncio.run(scenario())
    src, dst = _lines(src_log), _lines(dst_log)
    rid = seen["hop"]
    assert UUID4.fullmatch(rid), rid
    assert [(r["response_code"], r["request_id"]) for r in src if r["path"] == "/hop"] == [(200, rid)]
    assert [(r["response_code"], r["request_id"]) for r in dst if r["path"] == "/hop"] == [(200, rid)]
    [denied_src] = [r for r in src if r["path"] == "/denied"]
    [denied_dst] = [r for r in dst if r["path"] == "/denied"]
    assert (denied_dst["response_code"], denied_dst["response_flags"]) == (403, "RBAC"), denied_dst
    assert denied_src["response_code"] == 403, denied_src
    assert UUID4.fullmatch(denied_dst["request_id"]) and denied_src["request_id"] == denied_dst["request_id"]
    assert denied_dst["request_id"] != rid
    assert UUID4.fullmatch(seen["plain"]) and seen["plain"] not in (rid, denied_dst["request_id"])
    assert [r["request_id"] for r in dst if r["path"] == "/plain"] == [seen["plain"]]
    [plain_denied] = [r for r in dst if r["path"] == "/plain-denied"]
    assert plain_denied["response_code"] == 403 and UUID4.fullmatch(plain_denied["request_id"]), plain_denied
    assert len({rid, denied_dst["request_id"], seen["plain"], plain_denied["request_id"]}) == 4


def test_grpc_through_the_mesh_one_id_at_both_agents_and_the_server(ca_dir):
    app = GrpcServer("b", host=B_ADDR).start()
    src_log, dst_log = io.StringIO(), io.StringIO()

    def call(addr, metadata=()):
        with grpc.insecure_channel("%s:%d" % tuple(addr), options=[("grpc.default_authority", f"{G_HOST}:50051")]) as ch:
            return ch.unary_unary("/test.Echo/Echo")(b"hi", timeout=10, metadata=metadata)

    async def scenario():
        mesh = await Mesh(ca_dir, grpc_service(app.port, allow_only_a=False)).start()
        mesh.node1.runtime.access_log = AccessLog(src_log)
        mesh.node2.runtime.access_log = AccessLog(dst_log)
        try:
            assert await asyncio.to_thread(call, mesh.a_out) == b"hi"
            assert await asyncio.to_thread(call, mesh.a_out, (("x-request-id", "from-the-client"),)) == b"hi"
        finally:
            await mesh.close()
    try:
        asyncio.run(scenario())
    finally:
        app.stop()
    generated = app.seen_metadata[0]["x-request-id"]
    assert UUID4.fullmatch(generated), generated
    assert app.seen_metadata[1]["x-request-id"] == "from-the-client"
    for log in (src_log, dst_log):
        assert [(r["protocol"], r["request_id"]) for r in _lines(log)] == [
            ("HTTP/2", generated), ("HTTP/2", "from-the-client")]
