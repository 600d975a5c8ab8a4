"""gRPC through the mesh on loopback: node 1's outbound listener of A -> the 15008 mTLS
tunnel -> node 2's inbound plane -> a real grpcio server as workload B.

What each side does (docs/http2.md): both agents are L7 for gRPC. The source agent parses
the client's HTTP/2 (routing, retries, grpc metrics), on its explicit listener and on a
connection captured to the grpc port (the sniffer sees the HTTP/2 preface), and the HTTP/2
stream to B goes inside the tunnel; at the destination the inbound plane's sniffer sees the
preface too, so every gRPC call is authorized on its own (paths = methods) and counted with
request_protocol grpc and its grpc_response_status.
"""
from __future__ import annotations

import asyncio
import io
import json
import time

import grpc
import pytest

from nodeagent.identity.ca import CADirectory
from nodeagent.telemetry import AccessLog
from tests.integration.grpc_upstream import GrpcServer
from tests.integration.test_mesh_loopback import (
    ALLOW_ONLY_A, A, A_ADDR, B, B_ADDR, C, NS, Mesh, metrics,
)

pytestmark = pytest.mark.timeout(60)

G_HOST = f"g.{NS}.svc.cluster.local"


def grpc_service(port: int, allow_only_a: bool) -> str:
    policy = ALLOW_ONLY_A if allow_only_a else ""
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: g
  namespace: {NS}
spec:
  hosts:
  - {G_HOST}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 50051
    name: grpc
    protocol: GRPC
  endpoints:
  - address: {B_ADDR}
    serviceAccount: b
    ports:
      grpc: {port}
    labels:
      app: b
      version: v1
{policy}"""


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    return CADirectory.init(tmp_path_factory.mktemp("meshgrpc") / "ca", now=time.time() - 10 * 86400.0)


def _call(addr, authority: str, method: str, payload: bytes, stream: bool = False):
    with grpc.insecure_channel("%s:%d" % tuple(addr), options=[("grpc.default_authority", authority)]) as ch:
        if stream:
            return list(ch.stream_stream(f"/test.Echo/{method}")(iter([payload, payload]), timeout=10))
        return ch.unary_unary(f"/test.Echo/{method}")(payload, timeout=10)


def test_grpc_through_the_tunnel_l7_at_the_source_and_at_the_destination(ca_dir):
    app = GrpcServer("b", host=B_ADDR).start()

    async def scenario():
        mesh = await Mesh(ca_dir, grpc_service(app.port, allow_only_a=True)).start()
        log = io.StringIO()
        mesh.node2.runtime.access_log = AccessLog(log)
        try:
            authority = f"{G_HOST}:50051"
            # explicit outbound listener: the source agent parses HTTP/2 (L7)
            assert await asyncio.to_thread(_call, mesh.a_out, authority, "Which", b"x") == b"b"
            assert await asyncio.to_thread(_call, mesh.a_out, authority, "Bidi", b"hi", True) == [b"HI", b"HI"]
            src = [m for m in metrics(mesh.node1) if m["destination_service"] == G_HOST]
            assert {m["request_protocol"] for m in src} == {"grpc"}
            assert {(m["response_code"], m["grpc_response_status"]) for m in src} == {("200", "0")}
            assert {m["connection_security_policy"] for m in src} == {"mutual_tls"}
            assert {m["destination_principal"] for m in src} == {B.principal}
            # the destination parses the HTTP/2 inside the tunnel too: gRPC metrics, no TCP relay
            dst = metrics(mesh.node2)
            assert {m["reporter"] for m in dst} == {"destination"}
            assert {m["request_protocol"] for m in dst} == {"grpc"}
            assert {(m["response_code"], m["grpc_response_status"]) for m in dst} == {("200", "0")}
            assert {m["source_principal"] for m in dst} == {A.principal}
            assert {m["source_workload"] for m in dst} == {"a"}
            assert {m["connection_security_policy"] for m in dst} == {"mutual_tls"}
            assert sum(m["_value"][0] for m in dst) == 2
            assert metrics(mesh.node2, "tcp") == []
            # the destination's access log: one inbound line per call, the caller from its certificate
            lines = [json.loads(x) for x in log.getvalue().splitlines()]
            assert [(r["path"], r["protocol"], r["response_code"]) for r in lines] == [
                ("/test.Echo/Which", "HTTP/2", 200), ("/test.Echo/Bidi", "HTTP/2", 200)]
            assert {(r["upstream_cluster"], r["source_workload"], r["source_namespace"], r["source_principal"])
                    for r in lines} == {(f"inbound|{app.port}||", "a", NS, A.principal)}
            # C is not allowed: each call is denied at the destination, as a gRPC status
            hits = app.hits
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(_call, mesh.c_out, authority, "Which", b"x")
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert app.hits == hits
            denied = [m for m in metrics(mesh.node2) if m["source_principal"] == C.principal]
            assert [(m["response_code"], m["grpc_response_status"], m["response_flags"], m["request_protocol"])
                    for m in denied] == [("403", "7", "RBAC", "grpc")]
            # through the mesh the source sees the destination's answer: HTTP 200, grpc-status 7
            src_c = [m for m in metrics(mesh.node1) if m["source_principal"] == C.principal]
            assert {(m["response_code"], m["grpc_response_status"]) for m in src_c} == {("200", "7")}
            # a connection captured to the grpc port (listener bound to the service): L7 at both ends
            out = await mesh.node1.outbound(A, A_ADDR, mesh.tunnel_ports, fixed_destination=(G_HOST, 50051))
            before = sum(m["_value"][0] for m in metrics(mesh.node2) if m["source_principal"] == A.principal)
            assert await asyncio.to_thread(_call, out, authority, "Echo", b"captured") == b"captured"
            after = sum(m["_value"][0] for m in metrics(mesh.node2) if m["source_principal"] == A.principal)
            assert after == before + 1
            assert metrics(mesh.node1, "tcp") == [] and metrics(mesh.node2, "tcp") == []
        finally:
            await mesh.close()
    try:
        asyncio.run(scenario())
    finally:
        app.stop()


def only_which(port: int) -> str:
    return grpc_service(port, allow_only_a=False) + f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: g-only-which
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: b
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ["/test.Echo/Which"]
"""


def test_destination_authorizes_each_grpc_call_on_its_path(ca_dir):
    """An ALLOW rule on one gRPC method at the destination: that method passes, the others
    are PERMISSION_DENIED (never reaching B), whether the source agent saw the call on its
    explicit listener or captured the connection to the grpc port."""
    app = GrpcServer("b", host=B_ADDR).start()

    async def scenario():
        mesh = await Mesh(ca_dir, only_which(app.port)).start()
        try:
            authority = f"{G_HOST}:50051"
            captured = await mesh.node1.outbound(A, A_ADDR, mesh.tunnel_ports, fixed_destination=(G_HOST, 50051))
            for addr in (mesh.a_out, captured):
                assert await asyncio.to_thread(_call, addr, authority, "Which", b"x") == b"b"
                hits = app.hits
                for method, stream in (("Echo", False), ("Bidi", True)):
                    with pytest.raises(grpc.RpcError) as info:
                        await asyncio.to_thread(_call, addr, authority, method, b"x", stream)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
                assert app.hits == hits
            dst = {(m["response_code"], m["grpc_response_status"], m["response_flags"], m["request_protocol"]):
                   m["_value"][0] for m in metrics(mesh.node2)}
            assert dst == {("200", "0", "-", "grpc"): 2, ("403", "7", "RBAC", "grpc"): 4}
            assert metrics(mesh.node2, "tcp") == []
            # a client outside the mesh on the plaintext inbound listener: the same per-call verdicts
            plain = await mesh.node2.plaintext(mesh.b, B_ADDR, (B_ADDR, app.port))
            assert await asyncio.to_thread(_call, plain, authority, "Which", b"x") == b"b"
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(_call, plain, authority, "Echo", b"x")
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            none = {(m["response_code"], m["grpc_response_status"], m["source_principal"]): m["_value"][0]
                    for m in metrics(mesh.node2) if m["connection_security_policy"] == "none"}
            assert none == {("200", "0", "unknown"): 1, ("403", "7", "unknown"): 1}
        finally:
            await mesh.close()
    try:
        asyncio.run(scenario())
    finally:
        app.stop()


PATHS_ONLY = f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: b-paths
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: b
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ["/public/*"]
"""


def test_inbound_plane_decides_each_http2_stream_on_an_http_port(ca_dir):
    """An h2c client on the inbound plane's plaintext listener (an HTTP port): every stream
    goes through the plane's per-request AuthorizationPolicy, then to the app over HTTP/1.1."""
    async def curl(addr, path: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--http2-prior-knowledge", "--path-as-is", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
            "-H", f"Host: b.{NS}.svc.cluster.local", f"http://{addr[0]}:{addr[1]}{path}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        return out.decode()

    async def scenario():
        mesh = await Mesh(ca_dir, PATHS_ONLY).start()
        try:
            plain = await mesh.node2.plaintext(mesh.b, B_ADDR, (B_ADDR, mesh.app.port))
            hits = mesh.app.hits
            assert await curl(plain, "/private") == "2 403"
            assert await curl(plain, "/public/../private") == "2 403"  # normalized before the policy
            assert mesh.app.hits == hits
            assert await curl(plain, "/public/x") == "2 200"
            assert mesh.app.hits == hits + 1
            assert mesh.app.requests[-1]["path"] == "/public/x"
            dst = {(m["response_code"], m["response_flags"]) for m in metrics(mesh.node2)
                   if m["connection_security_policy"] == "none"}
            assert dst == {("403", "RBAC"), ("200", "-")}
        finally:
            await mesh.close()
    asyncio.run(scenario())
