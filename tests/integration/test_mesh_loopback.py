"""Two node agents on loopback joined by the mTLS tunnel: real CA, real TLS 1.3,
the real engine on both sides, a real HTTP application behind node 2.

    client -> node 1 outbound listener of A (127.0.10.1) -> TunnelConnector
           -> TLS to 127.0.20.1:<tunnel port> -> node 2 TunnelServer -> InboundPlane
           -> application B (127.0.20.1:<app port>)
"""
from __future__ import annotations

import asyncio
import collections
import json
import time

import httptools
import pytest
from cryptography import x509

from nodeagent.identity.ca import CADirectory, LocalCA
from nodeagent.identity.errors import PeerRejected
from nodeagent.identity.manager import CertificateManager
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import TunnelTls
from nodeagent.proxy.context import ListenerContext, PlainConnector, WorkloadIdentity
from nodeagent.proxy.inbound import InboundPlane, InboundWorkload
from nodeagent.proxy.runtime import ProxyRuntime
from nodeagent.proxy.server import protocol_factory
from nodeagent.proxy.tunnel import MeshDirectory, MeshTelemetry, TunnelConnector, TunnelServer
from policy.loader import load_text
from policy.snapshot import build_snapshot
from tests.integration.upstream import UpstreamServer

DAY = 86400.0
NS = "shop"
A_ADDR, C_ADDR, B_ADDR = "127.0.10.1", "127.0.10.2", "127.0.20.1"
A = SpiffeId.workload(NS, "a")
B = SpiffeId.workload(NS, "b")
C = SpiffeId.workload(NS, "c")
B_HOST = "b.shop.svc.cluster.local"

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- config


def base_config(app_port: int, tcp_port: int = 0) -> str:
    tcp = f"""  - number: 9000
    name: tcp
    protocol: TCP
""" if tcp_port else ""
    tcp_we = f"\n    tcp: {tcp_port}" if tcp_port else ""
    out = f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: b
  namespace: {NS}
spec:
  hosts:
  - {B_HOST}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
{tcp}  workloadSelector:
    labels:
      app: b
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: b-1
  namespace: {NS}
spec:
  address: {B_ADDR}
  serviceAccount: b
  ports:
    http: {app_port}{tcp_we}
  labels:
    app: b
    version: v1
"""
    for name, addr in (("a", A_ADDR), ("c", C_ADDR)):
        out += f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {NS}
spec:
  address: {addr}
  serviceAccount: {name}
  labels:
    app: {name}
    version: v1
"""
    return out


ALLOW_ONLY_A = f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: b-allow-a
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: b
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/a"]
"""

STRICT = f"""---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: {NS}
spec:
  mtls:
    mode: STRICT
"""

DENY_ALL_TCP = f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: b-deny-9000
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: b
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["{{port}}"]
"""


def dr(extra: str) -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: b
  namespace: {NS}
spec:
  host: {B_HOST}
  trafficPolicy:
{extra}"""


class Config:
    """The snapshot both nodes read (as if fed by one config store)."""

    def __init__(self, text: str) -> None:
        self.version = 0
        self.snapshot = None
        self.set(text)

    def set(self, text: str) -> None:
        result = load_text(text, "mesh.yaml")
        assert not result.errors, result.errors
        self.version += 1
        self.snapshot = build_snapshot(result.resources, version=self.version)

    def __call__(self):
        return self.snapshot


# --------------------------------------------------------------------------- nodes


class RecordingTls(TunnelTls):
    """The real ``TunnelTls``, plus a record of what the tunnel code asked of it: client
    contexts taken per source identity (one per tunnel attempt, taken before its TCP connect)
    and every peer certificate checked after a handshake, in order, with its serial.
    ``on_change`` is called after each of these events (tests wait on it instead of sleeping)."""

    def __init__(self, manager: CertificateManager) -> None:
        super().__init__(manager)
        self.attempts: collections.Counter = collections.Counter()
        self.peers: list[tuple[SpiffeId, int]] = []
        self.rejected = 0
        self.on_change = lambda: None

    def client_context(self, source_identity: SpiffeId):
        ctx = super().client_context(source_identity)
        self.attempts[source_identity] += 1
        self.on_change()
        return ctx

    def peer_identity(self, ssl_object, expected: SpiffeId | None = None) -> SpiffeId:
        try:
            identity = super().peer_identity(ssl_object, expected)
        except PeerRejected:
            self.rejected += 1
            self.on_change()
            raise
        serial = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True)).serial_number
        self.peers.append((identity, serial))
        self.on_change()
        return identity

    def serials_of(self, identity: SpiffeId, start: int = 0, end: int | None = None) -> list[int]:
        return [serial for who, serial in self.peers[start:end] if who == identity]


class Node:
    def __init__(self, ca_dir: CADirectory, config: Config, *identities: SpiffeId, clock=time.time) -> None:
        self.manager = CertificateManager(LocalCA(ca_dir), trust_domain="cluster.local", clock=clock,
                                          poll_interval=0.0, lifetime=3600.0)
        for identity in identities:
            self.manager.add_workload(identity)
        self.tls = RecordingTls(self.manager)
        self.config = config
        self.runtime: ProxyRuntime | None = None
        self.plane: InboundPlane | None = None
        self.servers: list = []

    async def start(self) -> None:
        await self.manager.refresh()
        self.runtime = ProxyRuntime(self.config, MeshTelemetry())
        self.runtime.start()
        self.plane = InboundPlane(self.runtime)
        self.plane.start()

    async def outbound(self, identity: SpiffeId, address: str, tunnel_ports: dict, *,
                       fixed_destination=None) -> tuple[str, int]:
        """An outbound listener for a source workload (explicit proxy, or bound to one service)."""
        connector = TunnelConnector(self.tls, identity, MeshDirectory(self.config), PlainConnector(),
                                    source_address=address, tunnel_port=lambda ip: tunnel_ports[ip])
        ctx = ListenerContext(f"outbound {NS}/{identity.service_account}",
                              WorkloadIdentity(NS, identity.service_account, identity.service_account,
                                               {"app": identity.service_account, "version": "v1"},
                                               identity.principal),
                              connector=connector, fixed_destination=fixed_destination)
        server = await asyncio.get_running_loop().create_server(protocol_factory(self.runtime, ctx), address, 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[:2]

    def workload(self, name: str, address: str) -> InboundWorkload:
        return InboundWorkload(NS, name, name, {"app": name, "version": "v1"}, (address,))

    async def tunnel(self, workload: InboundWorkload, host: str) -> TunnelServer:
        server = await TunnelServer(self.plane, workload, self.tls).start(host=host, port=0)
        self.servers.append(server)
        return server

    async def plaintext(self, workload: InboundWorkload, host: str, target: tuple[str, int]) -> tuple[str, int]:
        server = await asyncio.get_running_loop().create_server(
            self.plane.plaintext_factory(workload, target_of=lambda sock: target), host, 0)
        self.servers.append(server)
        return server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.plane is not None:
            await self.plane.close()
        if self.runtime is not None:
            await self.runtime.close()


class GatedUpstream(UpstreamServer):
    """The test application, able to hold requests: after ``hold(n)`` the next ``n`` requests
    it receives wait (their paths listed in ``held``) until ``release()``. Everything else is
    ``UpstreamServer``'s. ``on_held`` runs on the test's loop each time a request is held."""

    def __init__(self, name: str, host: str) -> None:
        super().__init__(name, host=host)
        self.held: list[str] = []
        self._quota = 0
        self._gate: asyncio.Event | None = None
        self._notify = None

    def hold(self, count: int, on_held) -> None:
        test_loop = asyncio.get_running_loop()

        def arm() -> None:  # on the application's thread
            self._quota = count
            self._gate = asyncio.Event()
            self._notify = lambda: test_loop.call_soon_threadsafe(on_held)
        self._loop.call_soon_threadsafe(arm)

    def release(self) -> None:
        def open_gate() -> None:
            self._quota = 0
            if self._gate is not None:
                self._gate.set()
        self._loop.call_soon_threadsafe(open_gate)

    async def _respond(self, req, parser, writer) -> bool:
        if self._quota > 0:
            self._quota -= 1
            gate = self._gate
            self.held.append(req.url.decode("latin-1"))
            self._notify()
            await gate.wait()
        return await super()._respond(req, parser, writer)


class Mesh:
    """Node 1 (A, C) and node 2 (B) on loopback, B's application started."""

    def __init__(self, ca_dir, extra_config: str = "", *, tcp_app: bool = False, node1_clock=time.time,
                 node2_clock=time.time) -> None:
        self.app = GatedUpstream("b", host=B_ADDR).start()
        self.tcp_app = None
        self.tcp_port = 0
        self.extra = extra_config
        self.config = Config(base_config(self.app.port) + extra_config)
        self.node1 = Node(ca_dir, self.config, A, C, clock=node1_clock)
        self.node2 = Node(ca_dir, self.config, B, clock=node2_clock)
        self.want_tcp = tcp_app
        self.tunnel_ports: dict[str, int] = {}

    async def start(self) -> "Mesh":
        if self.want_tcp:
            self.tcp_app = await asyncio.start_server(_echo, B_ADDR, 0)
            self.tcp_port = self.tcp_app.sockets[0].getsockname()[1]
            self.config.set(base_config(self.app.port, self.tcp_port) + self.extra)
        await self.node1.start()
        await self.node2.start()
        self.b = self.node2.workload("b", B_ADDR)
        self.tunnel = await self.node2.tunnel(self.b, B_ADDR)
        self.tunnel_ports[B_ADDR] = self.tunnel.address[1]
        self.a_out = await self.node1.outbound(A, A_ADDR, self.tunnel_ports)
        self.c_out = await self.node1.outbound(C, C_ADDR, self.tunnel_ports)
        return self

    def set_config(self, extra: str) -> None:
        self.config.set(base_config(self.app.port, self.tcp_port) + extra)

    async def close(self) -> None:
        await self.node1.close()
        await self.node2.close()
        if self.tcp_app is not None:
            self.tcp_app.close()
        self.app.stop()


async def _echo(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# --------------------------------------------------------------------------- client


class HttpClient:
    """A keep-alive HTTP/1.1 client on one connection (parses with httptools)."""

    def __init__(self, reader, writer) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, addr) -> "HttpClient":
        reader, writer = await asyncio.open_connection(*addr)
        return cls(reader, writer)

    async def request(self, path: str = "/", *, host: str = B_HOST, method: str = "GET",
                      headers: dict | None = None, body: bytes = b"") -> tuple[int, dict, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"content-length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        result = {"headers": {}, "body": bytearray(), "done": False}

        class Cb:
            def on_header(self, name, value):
                result["headers"][name.decode().lower()] = value.decode("latin-1")

            def on_body(self, body):
                result["body"] += body

            def on_message_complete(self):
                result["done"] = True

        parser = httptools.HttpResponseParser(Cb())
        while not result["done"]:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                raise ConnectionError("connection closed before a complete response")
            parser.feed_data(data)
        return parser.get_status_code(), result["headers"], bytes(result["body"])

    def close(self) -> None:
        self.writer.close()


async def get(addr, path: str = "/", **kw) -> tuple[int, dict, bytes]:
    client = await HttpClient.open(addr)
    try:
        return await client.request(path, **kw)
    finally:
        client.close()


def metrics(node: Node, kind: str = "http") -> list[dict]:
    from nodeagent.telemetry import HTTP_LABELS, TCP_LABELS
    names = HTTP_LABELS if kind == "http" else TCP_LABELS
    return [dict(zip(names, key), _value=value) for key, value in node.runtime.telemetry.export()[kind].items()]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    return CADirectory.init(tmp_path_factory.mktemp("mesh") / "ca", now=time.time() - 10 * DAY)


# --------------------------------------------------------------------------- tests


def test_peer_identity_reaches_policy_allow_a_deny_c_with_rbac(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir, ALLOW_ONLY_A).start()
        try:
            status, headers, body = await get(mesh.a_out, "/hello?x=1", headers={
                "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/shop/sa/admin"})
            assert status == 200, body
            echo = json.loads(body)
            assert echo["path"] == "/hello?x=1"
            assert "x-forwarded-client-cert" not in echo["headers"]  # never trusted, never forwarded
            hits = mesh.app.hits
            status, _, body = await get(mesh.c_out, "/hello")
            assert (status, body.strip()) == (403, b"RBAC: access denied")
            assert mesh.app.hits == hits  # the denied request never reached B
            assert mesh.tunnel.stats["accepted"] == 2
            assert {p for p, _ in mesh.tunnel.recent} == {A.principal, C.principal}

            # Metrics: both reporters say mutual_tls and carry the real principals.
            src = [m for m in metrics(mesh.node1) if m["response_code"] == "200"]
            assert len(src) == 1
            assert src[0]["reporter"] == "source"
            assert src[0]["source_principal"] == A.principal
            assert src[0]["destination_principal"] == B.principal
            assert src[0]["destination_service"] == B_HOST
            assert src[0]["connection_security_policy"] == "mutual_tls"
            dst = {m["response_code"]: m for m in metrics(mesh.node2)}
            assert set(dst) == {"200", "403"}
            ok, denied = dst["200"], dst["403"]
            assert ok["reporter"] == denied["reporter"] == "destination"
            assert (ok["source_principal"], ok["source_workload"], ok["source_app"]) == (A.principal, "a", "a")
            assert ok["destination_workload"] == "b" and ok["destination_principal"] == B.principal
            assert ok["destination_service"] == B_HOST
            assert ok["connection_security_policy"] == denied["connection_security_policy"] == "mutual_tls"
            assert (denied["source_principal"], denied["response_flags"]) == (C.principal, "RBAC")
        finally:
            await mesh.close()
    run(scenario())


def test_keep_alive_reuses_one_tunnel_per_source(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            client = await HttpClient.open(mesh.a_out)
            for i in range(20):
                status, _, _ = await client.request(f"/k/{i}")
                assert status == 200
            client.close()
            status, _, _ = await get(mesh.a_out, "/again")
            assert status == 200
            assert mesh.tunnel.stats["accepted"] == 1  # pooled, kept alive
            status, _, _ = await get(mesh.c_out, "/from-c")
            assert status == 200
            assert mesh.tunnel.stats["accepted"] == 2  # C never rides A's tunnel
            assert [p for p, _ in mesh.tunnel.recent] == [A.principal, C.principal]
        finally:
            await mesh.close()
    run(scenario())


async def _refused(addr, payload: bytes) -> bytes:
    """Send ``payload`` and read until the peer closes or resets; returns what was answered."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(payload)
        got = b""
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), 5)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        return got
    finally:
        writer.close()


def test_plaintext_to_strict_is_refused_while_the_tunnel_is_accepted(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            plain = await mesh.node2.plaintext(mesh.b, B_ADDR, (B_ADDR, mesh.app.port))
            request = f"GET /plain HTTP/1.1\r\nhost: {B_HOST}\r\n\r\n".encode()
            # PERMISSIVE (no policy): plaintext is served, reported as "none" without a principal.
            status, _, _ = await get(plain, "/plain")
            assert status == 200
            m = [m for m in metrics(mesh.node2) if m["connection_security_policy"] == "none"]
            assert len(m) == 1 and m[0]["source_principal"] == "unknown" and m[0]["reporter"] == "destination"
            mesh.set_config(STRICT)
            hits = mesh.app.hits
            assert await _refused(plain, request) == b""
            assert mesh.app.hits == hits
            status, _, _ = await get(mesh.a_out, "/tunnel")  # mTLS is what STRICT wants
            assert status == 200 and mesh.app.hits == hits + 1
        finally:
            await mesh.close()
    run(scenario())


def test_strict_resets_a_live_plaintext_connection_after_a_policy_change(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            plain = await mesh.node2.plaintext(mesh.b, B_ADDR, (B_ADDR, mesh.app.port))
            client = await HttpClient.open(plain)
            assert (await client.request("/1"))[0] == 200
            mesh.set_config(STRICT)
            mesh.node2.plane.recheck()  # what the watcher does within 0.25 s
            # Closed or reset by the agent: a ConnectionError, not a TimeoutError (an OSError too,
            # which would pass after 10 s if the connection were merely left hanging).
            hits = mesh.app.hits
            with pytest.raises(ConnectionError):
                await client.request("/2")
            assert mesh.app.hits == hits
            client.close()
        finally:
            await mesh.close()
    run(scenario())


def tls_records(stream: bytes, direction: str) -> list[tuple[int, int, int]]:
    """(content type, record version, length) of every record of a TLS byte stream; fails
    unless the bytes are exactly a sequence of whole records (nothing outside a record)."""
    records, pos = [], 0
    while pos < len(stream):
        assert len(stream) - pos >= 5, f"{direction}: {len(stream) - pos} stray bytes after the last record"
        kind, version, length = stream[pos], int.from_bytes(stream[pos + 1:pos + 3]), \
            int.from_bytes(stream[pos + 3:pos + 5])
        assert pos + 5 + length <= len(stream), f"{direction}: record at {pos} runs past the stream"
        records.append((kind, version, length))
        pos += 5 + length
    return records


def test_bytes_between_the_nodes_are_tls_not_http(ca_dir):
    """A relay between node 1 and node 2's tunnel port records both directions: each is a
    TLS 1.3 record stream (the first flight a handshake record, then only application data,
    besides the optional compatibility ChangeCipherSpec), and neither carries any of the
    HTTP that the client and the application exchanged through it."""
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        recorded = {"node1->node2": bytearray(), "node2->node1": bytearray()}
        relayed = []
        real = mesh.tunnel.address

        async def relay(reader, writer):
            relayed.append(writer.get_extra_info("peername"))
            up_reader, up_writer = await asyncio.open_connection(*real)

            async def pump(src, dst, record):
                try:
                    while data := await src.read(65536):
                        record.extend(data)
                        dst.write(data)
                        await dst.drain()
                except ConnectionError:
                    pass
                finally:
                    dst.close()
            await asyncio.gather(pump(reader, up_writer, recorded["node1->node2"]),
                                 pump(up_reader, writer, recorded["node2->node1"]))

        spy = await asyncio.start_server(relay, B_ADDR, 0)
        try:
            mesh.tunnel_ports[B_ADDR] = spy.sockets[0].getsockname()[1]
            client = await HttpClient.open(mesh.a_out)
            status, headers, body = await client.request("/secret-path", headers={"x-token": "hunter2"})
            assert status == 200 and headers["x-instance"] == "b"
            echo = json.loads(body)
            assert echo["path"] == "/secret-path" and echo["headers"]["x-token"] == "hunter2"
            marker = "request-body-marker-" + "z" * 40
            status, _, body2 = await client.request("/second", method="POST", body=marker.encode())
            assert status == 200 and json.loads(body2)["body"] == marker  # echoed in the response body
            client.close()
            assert len(relayed) == 1 and mesh.tunnel.stats["accepted"] == 1  # both went through the relay

            # What the application answered in the clear, and what the client sent: none of it may
            # be visible between the nodes, in either direction.
            clear = (b"HTTP/1.1", b"HTTP/1.", b"CONNECT", b"GET /", b"POST /", b"200 OK", b"secret-path", b"/second",
                     b"hunter2", b"x-token", b"x-instance", b'"instance"', marker.encode(), B_HOST.encode(),
                     f"{B_ADDR}:{mesh.app.port}".encode())
            for direction, stream in recorded.items():
                stream = bytes(stream)
                for text in clear:
                    assert text not in stream, (direction, text)
                records = tls_records(stream, direction)
                kind, version, _ = records[0]
                # First flight: a handshake record (ClientHello / ServerHello), 0x16 0x03 0x0N.
                assert kind == 0x16 and version >> 8 == 0x03, (direction, records[0])
                assert stream[:2] == b"\x16\x03"
                rest = [r for r in records[1:] if not (r[0] == 0x14 and r[2] == 1)]  # TLS 1.3 middlebox CCS
                assert rest, direction
                # Then every record is TLS 1.3 application data: 0x17 0x03 0x03 (encrypted
                # handshake, CONNECT, requests and responses all look the same).
                assert all(k == 0x17 and v == 0x0303 for k, v, _ in rest), (direction, rest)
                assert len(rest) >= 3, (direction, rest)
            # The ciphertext carries at least the plaintext it hides.
            up = sum(n for k, _, n in tls_records(bytes(recorded["node1->node2"]), "up") if k == 0x17)
            down = sum(n for k, _, n in tls_records(bytes(recorded["node2->node1"]), "down") if k == 0x17)
            assert up > len(marker) + 100
            assert down > len(body) + len(body2)
        finally:
            spy.close()
            await mesh.close()
    run(scenario())


class Progress:
    """Wakes a waiter whenever something it watches may have changed (one event loop): the
    rotation test waits on these signals, never on sleeps."""

    def __init__(self, failures: list) -> None:
        self.failures = failures
        self._event = asyncio.Event()

    def poke(self) -> None:
        self._event.set()

    async def until(self, predicate, what: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert not self.failures, f"requests failed while waiting for {what}: {self.failures[:5]}"
            if predicate():
                return
            self._event.clear()
            remaining = deadline - loop.time()
            assert remaining > 0, f"timed out after {timeout:.0f} s waiting for {what}"
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                pass


ROTATION_CLIENTS = 6  # 3 keep-alive connections + 3 that open a new connection per request
ROTATION_HELD = 3  # requests held inside their tunnel at the application across the switch
ROTATION_MAX_PER_CLIENT = 400


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("side", ["source", "destination"])
def test_certificate_rotation_during_a_request_stream_loses_no_request(ca_dir, side, loop_kind):
    """Six clients (keep-alive and one-connection-per-request, mixed) stream requests through
    A's outbound listener on node 1 to B on node 2 while one certificate is renewed: A's
    (presented by node 1) or B's (presented by node 2). maxRequestsPerConnection 10 keeps new
    tunnels opening all along the stream.

    Requests are in flight across the switch by construction: before renewing, the application
    holds 3 requests, which therefore travelled through tunnels already handshaken with the old
    certificate; they are released only after the stream has gone on through new tunnels
    carrying the new one. The renewal runs when no tunnel handshake is under way, and nothing
    else runs during it, so "before" and "after" are exact: every tunnel handshaken after it
    must present the new certificate."""
    offset = {"source": 0.0, "destination": 0.0}

    async def scenario():
        # maxRequestsPerConnection 10: new tunnels (new handshakes) all along the stream.
        mesh = await Mesh(ca_dir, dr("    connectionPool:\n      http:\n        maxRequestsPerConnection: 10\n"),
                          node1_clock=lambda: time.time() + offset["source"],
                          node2_clock=lambda: time.time() + offset["destination"]).start()
        # Who renews, and who checks the renewed certificate in each new handshake.
        renewing, identity, checker = {
            "source": (mesh.node1, A, mesh.node2.tls),  # node 2 checks A's client certificate
            "destination": (mesh.node2, B, mesh.node1.tls),  # node 1 checks B's server certificate
        }[side]
        failures: list = []
        progress = Progress(failures)
        mesh.node1.tls.on_change = mesh.node2.tls.on_change = progress.poke
        phase = {"rotated": False}
        records: list[dict] = []  # one per request: path, rotated at start, rotated at end, status
        stop = asyncio.Event()
        hard_deadline = asyncio.get_running_loop().time() + 20

        def handshakes_in_progress() -> int:
            """Tunnel attempts of A whose peer check has not happened yet (client context taken,
            certificate not yet checked by ``checker``)."""
            return mesh.node1.tls.attempts[A] - len(checker.peers) - checker.rejected

        def completed(after_switch: bool | None = None) -> int:
            return sum(1 for r in records if r["status"] is not None
                       and (after_switch is None or r["end"] == after_switch))

        async def one(path: str, send) -> bool:
            record = {"path": path, "start": phase["rotated"], "end": None, "status": None}
            records.append(record)
            try:
                status, _, body = await send(path)
                if status != 200 or json.loads(body)["path"] != path:
                    failures.append((path, status, body[:200]))
            except Exception as exc:  # a failure is the test's finding: record it, stop this client
                failures.append((path, repr(exc)))
                return False
            finally:
                record["end"] = phase["rotated"]
                progress.poke()
            record["status"] = status
            return True

        def running() -> bool:
            return not stop.is_set() and not failures and asyncio.get_running_loop().time() < hard_deadline

        async def keep_alive_client(n: int) -> None:
            client = await HttpClient.open(mesh.a_out)
            try:
                for i in range(ROTATION_MAX_PER_CLIENT):
                    if not running() or not await one(f"/k{n}/{i}", client.request):
                        break
            finally:
                client.close()

        async def new_connection_client(n: int) -> None:
            for i in range(ROTATION_MAX_PER_CLIENT):
                if not running() or not await one(f"/n{n}/{i}", lambda path: get(mesh.a_out, path)):
                    break

        clients = [asyncio.create_task(keep_alive_client(n) if n % 2 == 0 else new_connection_client(n))
                   for n in range(ROTATION_CLIENTS)]
        try:
            before = renewing.manager.certificate(identity).serial
            await progress.until(lambda: completed() >= 60, "60 requests before the renewal")

            mesh.app.hold(ROTATION_HELD, progress.poke)
            await progress.until(lambda: len(mesh.app.held) == ROTATION_HELD,
                                 f"{ROTATION_HELD} requests held at the application")
            await progress.until(lambda: handshakes_in_progress() == 0, "a moment with no tunnel handshake under way")
            watched = (mesh.node1.tls.attempts[A], len(checker.peers), len(records), completed())
            offset[side] = 1900.0  # past half-life of a 1 h certificate: renew now
            await renewing.manager.refresh()
            # Nothing else ran during the renewal (LocalCA answers without yielding), so every
            # request and handshake is exactly before or after it.
            assert (mesh.node1.tls.attempts[A], len(checker.peers), len(records), completed()) == watched
            phase["rotated"] = True
            after = renewing.manager.certificate(identity).serial
            assert after != before
            checked_before = len(checker.peers)
            held = list(mesh.app.held)

            # The stream goes on through new tunnels (new certificate) while the held requests
            # still occupy tunnels handshaken with the old one.
            await progress.until(
                lambda: completed(True) >= 40 and len(checker.serials_of(identity, checked_before)) >= 2,
                "40 requests and 2 new tunnels after the renewal, the held requests still in flight")
            assert not any(r["status"] is not None for r in records if r["path"] in held)
            mesh.app.release()
            await progress.until(lambda: completed(True) >= 150 and all(
                r["status"] is not None for r in records if r["path"] in held), "the held requests and 150 more")
            stop.set()
            await asyncio.gather(*clients)
            assert not failures, failures[:10]
            total = len(records)
            assert all(r["status"] == 200 for r in records)
            assert mesh.app.hits == total  # each request reached B exactly once
            # In flight across the switch: started before the renewal, answered after it;
            # among them the held ones, which were inside old-certificate tunnels at B.
            straddling = {r["path"] for r in records if not r["start"] and r["end"]}
            assert set(held) <= straddling and len(held) == ROTATION_HELD
            assert completed(False) >= 60 and completed(True) >= 150

            # Every tunnel attempt was accepted (no failure hidden by a retry), and none
            # carried more than 10 requests.
            assert mesh.tunnel.stats == {"accepted": mesh.node1.tls.attempts[A], "refused": 0}
            assert mesh.node1.tls.rejected == mesh.node2.tls.rejected == 0
            assert mesh.tunnel.stats["accepted"] >= total / 10
            # The peer saw the old certificate before and only the new one on every tunnel
            # handshaken after the renewal.
            assert {who for who, _ in checker.peers} == {identity}
            seen_before = checker.serials_of(identity, 0, checked_before)
            seen_after = checker.serials_of(identity, checked_before)
            assert set(seen_before) == {before}, f"before the renewal: {seen_before} (expected {before})"
            assert len(seen_after) >= 3, seen_after
            stale = [i for i, serial in enumerate(seen_after) if serial != after]
            assert not stale, (f"{len(stale)} of {len(seen_after)} tunnels handshaken after the renewal "
                               f"presented serial {before} instead of {after}")
            if side == "source":  # node 2's own record of its peers agrees
                assert {before, after} <= {s for p, s in mesh.tunnel.recent if p == A.principal}
        finally:
            stop.set()
            mesh.app.release()
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await mesh.close()

    if loop_kind == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    else:
        run(scenario())


def test_tcp_stream_through_the_tunnel_and_closed_by_a_policy_change(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir, tcp_app=True).start()
        try:
            out = await mesh.node1.outbound(A, A_ADDR, mesh.tunnel_ports, fixed_destination=(B_HOST, 9000))
            reader, writer = await asyncio.open_connection(*out)
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
            assert mesh.tunnel.stats["accepted"] == 1
            mesh.set_config(DENY_ALL_TCP.replace("{port}", str(mesh.tcp_port)))
            # The watcher notices the new snapshot and closes the now-denied stream.
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            writer.close()
            tcp = metrics(mesh.node2, "tcp")
            assert len(tcp) == 1
            assert tcp[0]["source_principal"] == A.principal
            assert tcp[0]["connection_security_policy"] == "mutual_tls"
            assert tcp[0]["_value"][:2] == [1, 1] and tcp[0]["_value"][2] == 5  # opened, closed, sent 5 bytes
            # A new connection is refused at CONNECT (403) and counted with flag RBAC.
            reader, writer = await asyncio.open_connection(*out)
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            writer.close()
            assert mesh.tunnel.last_refusal.startswith(f"{A}: denied by DENY policy shop/b-deny-9000")
            flags = {m["response_flags"] for m in metrics(mesh.node2, "tcp")}
            assert flags == {"-", "RBAC"}
        finally:
            await mesh.close()
    run(scenario())


L7_ALLOW = f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: b-l7
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: b
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/a"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/public/*"]
"""


def test_l7_policy_per_request_with_the_peer_principal_and_normalized_paths(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir, L7_ALLOW).start()
        try:
            client = await HttpClient.open(mesh.a_out)
            status, _, body = await client.request("/public/x?q=1")
            assert status == 200 and json.loads(body)["path"] == "/public/x?q=1"
            # The same kept-alive tunnel: each request is decided on its own.
            assert (await client.request("/private"))[0] == 403
            assert (await client.request("/public/x", method="POST"))[0] == 403
            assert (await client.request("/public/../private"))[0] == 403  # normalized before matching
            status, _, body = await client.request("/%70ublic/y")
            assert status == 200 and json.loads(body)["path"] == "/public/y"  # the app sees what was authorized
            client.close()
            assert (await get(mesh.c_out, "/public/x"))[0] == 403  # right path, wrong principal
            assert mesh.tunnel.stats["accepted"] == 2
            assert mesh.app.hits == 2
        finally:
            await mesh.close()
    run(scenario())


L7_HEADER = f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: b-team
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: b
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.headers[x-team]
      values: ["blue"]
"""


def test_memoized_l7_verdicts_are_per_request_peer_and_policy_version(ca_dir):
    """Policies that read methods/paths but no header: verdicts are memoized, yet each request,
    each peer and each configuration version still gets its own answer, in any order."""
    async def scenario():
        mesh = await Mesh(ca_dir, L7_ALLOW).start()
        try:
            a1, a2 = await HttpClient.open(mesh.a_out), await HttpClient.open(mesh.a_out)
            cases = [("/public/x", "GET", 200), ("/private", "GET", 403), ("/public/x", "POST", 403),
                     ("/public/../private", "GET", 403), ("/%70ublic/x", "GET", 200)]
            for _ in range(3):
                for client in (a1, a2):
                    for path, method, want in cases:
                        assert (await client.request(path, method=method))[0] == want, (path, method)
            assert mesh.node2.plane._verdicts  # the policy reads no header: memoized
            c = await HttpClient.open(mesh.c_out)  # same requests, another principal: its own verdicts
            for path, method, _ in cases:
                assert (await c.request(path, method=method))[0] == 403, (path, method)
            mesh.set_config(L7_ALLOW.replace("/public/*", "/private"))  # the next request sees it
            for client in (a1, a2):
                assert (await client.request("/public/x"))[0] == 403
                assert (await client.request("/private"))[0] == 200
            for client in (a1, a2, c):
                client.close()
        finally:
            await mesh.close()
    run(scenario())


def test_a_policy_on_request_headers_is_decided_for_every_request(ca_dir):
    """A `request.headers[...]` condition: the same method, path and peer on one kept-alive
    tunnel get different verdicts depending on the header, so nothing is memoized."""
    async def scenario():
        mesh = await Mesh(ca_dir, L7_HEADER).start()
        try:
            client = await HttpClient.open(mesh.a_out)
            for _ in range(3):
                assert (await client.request("/x", headers={"x-team": "blue"}))[0] == 200
                assert (await client.request("/x"))[0] == 403
                assert (await client.request("/x", headers={"x-team": "red"}))[0] == 403
            assert not mesh.node2.plane._verdicts
            assert mesh.app.hits == 3
            client.close()
        finally:
            await mesh.close()
    run(scenario())


def test_l4_verdict_of_a_kept_alive_connection_follows_a_policy_change(ca_dir):
    """The inbound side decides an L4-only policy once per connection and snapshot version:
    a new snapshot is decided again on the very next request of the same client connection."""
    async def scenario():
        mesh = await Mesh(ca_dir, ALLOW_ONLY_A).start()
        try:
            client = await HttpClient.open(mesh.a_out)
            for i in range(3):
                assert (await client.request(f"/before/{i}"))[0] == 200
            hits = mesh.app.hits
            mesh.set_config(ALLOW_ONLY_A.replace("sa/a", "sa/c"))  # now only C may call B
            status, _, body = await client.request("/after")
            assert (status, body.strip()) == (403, b"RBAC: access denied")
            assert mesh.app.hits == hits
            client.close()
            assert (await get(mesh.c_out, "/from-c"))[0] == 200
            mesh.set_config(ALLOW_ONLY_A)
            assert (await get(mesh.a_out, "/again"))[0] == 200
            assert mesh.app.hits == hits + 2
        finally:
            await mesh.close()
    run(scenario())


def test_every_request_is_normalized_and_stripped_on_its_own(ca_dir):
    """Requests on one kept-alive tunnel share the connection's decision, never each other's
    rewritten path or header operations."""
    async def scenario():
        mesh = await Mesh(ca_dir, ALLOW_ONLY_A).start()
        try:
            client = await HttpClient.open(mesh.a_out)
            xfcc = {"X-Forwarded-Client-Cert": "By=spiffe://cluster.local/ns/shop/sa/admin"}
            seen = []
            for path, headers in (("/a/../b?q=1", None), ("/plain", None), ("/a/../b?q=1", xfcc),
                                  ("/plain", None), ("/%62", None), ("/plain", xfcc)):
                status, _, body = await client.request(path, headers=headers)
                assert status == 200, (path, body)
                echo = json.loads(body)
                assert "x-forwarded-client-cert" not in echo["headers"]
                seen.append(echo["path"])
            assert seen == ["/b?q=1", "/plain", "/b?q=1", "/plain", "/b", "/plain"]
            for _ in range(2):  # refused every time, not only when first seen
                assert (await client.request("/x%00y"))[0] == 400
                client.close()
                client = await HttpClient.open(mesh.a_out)
            assert mesh.app.hits == 6
            client.close()
        finally:
            await mesh.close()
    run(scenario())


def test_the_tunnel_on_uvloop_reuses_and_streams_more_than_a_read_buffer(ca_dir):
    """The agents run on uvloop: after CONNECT both ends hand the tunnel's TLS stream
    (TlsStream, reading through reused per-thread buffers) to the engine (set_protocol);
    a tunnel is reused and carries more than a read buffer each way."""
    import os

    import uvloop

    from nodeagent.proxy.tunnel import READ_BUFFER

    async def scenario():
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        mesh = await Mesh(ca_dir, ALLOW_ONLY_A, tcp_app=True).start()
        try:
            client = await HttpClient.open(mesh.a_out)
            for i in range(30):
                status, _, body = await client.request(f"/u/{i}")
                assert status == 200 and json.loads(body)["path"] == f"/u/{i}"
            size = 5 * READ_BUFFER + 123
            status, _, body = await client.request(f"/bytes/{size}")
            assert status == 200 and body == b"x" * size
            assert (await client.request("/after-big"))[0] == 200
            client.close()
            assert mesh.tunnel.stats["accepted"] == 1  # one kept-alive tunnel for all of it
            assert (await get(mesh.c_out, "/from-c"))[0] == 403

            out = await mesh.node1.outbound(A, A_ADDR, mesh.tunnel_ports, fixed_destination=(B_HOST, 9000))
            reader, writer = await asyncio.open_connection(*out)
            payload = os.urandom(3 * READ_BUFFER + 7)
            writer.write(payload)
            echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
            assert echoed == payload
            writer.close()
            assert mesh.tunnel.stats["accepted"] == 3
        finally:
            await mesh.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
