"""Two node agents on loopback joined by the mTLS tunnel: real CA, real TLS 1.3,
the real engine on both sides, a real HTTP application behind node 2.

    client -> node 1 outbound listener of A (127.0.10.1) -> TunnelConnector
           -> TLS to 127.0.20.1:<tunnel port> -> node 2 TunnelServer -> InboundPlane
           -> application B (127.0.20.1:<app port>)
"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httptools
import pytest

from nodeagent.identity.ca import CADirectory, LocalCA
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


class Node:
    def __init__(self, ca_dir: CADirectory, config: Config, *identities: SpiffeId, clock=time.time) -> None:
        self.manager = CertificateManager(LocalCA(ca_dir), trust_domain="cluster.local", clock=clock,
                                          poll_interval=0.0, lifetime=3600.0)
        for identity in identities:
            self.manager.add_workload(identity)
        self.tls = TunnelTls(self.manager)
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


class Mesh:
    """Node 1 (A, C) and node 2 (B) on loopback, B's application started."""

    def __init__(self, ca_dir, extra_config: str = "", *, tcp_app: bool = False, node1_clock=time.time) -> None:
        self.app = UpstreamServer("b", host=B_ADDR).start()
        self.tcp_app = None
        self.tcp_port = 0
        self.extra = extra_config
        self.config = Config(base_config(self.app.port) + extra_config)
        self.node1 = Node(ca_dir, self.config, A, C, clock=node1_clock)
        self.node2 = Node(ca_dir, self.config, B)
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
                      headers: dict | None = None) -> tuple[int, dict, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
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
            with pytest.raises((ConnectionError, OSError)):
                await client.request("/2")
            client.close()
        finally:
            await mesh.close()
    run(scenario())


def test_bytes_between_the_nodes_are_tls_not_http(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        recorded = bytearray()
        real = mesh.tunnel.address

        async def relay(reader, writer):
            up_reader, up_writer = await asyncio.open_connection(*real)

            async def pump(src, dst, record):
                try:
                    while data := await src.read(65536):
                        if record:
                            recorded.extend(data)
                        dst.write(data)
                        await dst.drain()
                except ConnectionError:
                    pass
                finally:
                    dst.close()
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

        spy = await asyncio.start_server(relay, B_ADDR, 0)
        try:
            mesh.tunnel_ports[B_ADDR] = spy.sockets[0].getsockname()[1]
            status, _, body = await get(mesh.a_out, "/secret-path", headers={"x-token": "hunter2"})
            assert status == 200 and json.loads(body)["path"] == "/secret-path"
            assert len(recorded) > 200
            assert recorded[0] == 0x16 and recorded[1] == 0x03  # a TLS handshake record
            for clear in (b"GET /", b"HTTP/1.1", b"CONNECT", b"secret-path", b"hunter2", B_HOST.encode()):
                assert clear not in recorded
        finally:
            spy.close()
            await mesh.close()
    run(scenario())


def test_rotation_of_the_source_certificate_loses_no_request(ca_dir):
    offset = [0.0]

    async def scenario():
        # maxRequestsPerConnection 10: new tunnels (new handshakes) all along the stream.
        mesh = await Mesh(ca_dir, dr("    connectionPool:\n      http:\n        maxRequestsPerConnection: 10\n"),
                          node1_clock=lambda: time.time() + offset[0]).start()
        try:
            before = mesh.node1.manager.certificate(A).serial
            statuses = []
            client = await HttpClient.open(mesh.a_out)
            deadline = time.monotonic() + 20
            for i in range(300):
                if i == 150:
                    offset[0] = 1900.0  # past half-life of a 1 h certificate: renew now
                    await mesh.node1.manager.refresh()
                status, _, _ = await client.request(f"/r/{i}")
                statuses.append(status)
                assert time.monotonic() < deadline
            client.close()
            after = mesh.node1.manager.certificate(A).serial
            assert after != before
            assert statuses == [200] * 300
            assert mesh.app.hits == 300
            serials = {s for p, s in mesh.tunnel.recent if p == A.principal}
            assert {before, after} <= serials  # node 2 saw A with both certificates
            assert mesh.tunnel.stats["accepted"] == 30
        finally:
            await mesh.close()
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
    """The agents run on uvloop, whose TLS transport is not asyncio's: after CONNECT both ends
    hand the stream to the engine (set_protocol) through a reused read buffer (BufferedFeed)."""
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
