"""The tunnel server refuses every client that is not a valid mesh workload, and the
tunnel client refuses a server that is not the workload the snapshot places there.
Real CA, real TLS 1.3 on loopback; no request may reach the application."""
from __future__ import annotations

import asyncio
import ssl
import time

import httptools
import pytest

from nodeagent.identity import certs
from nodeagent.identity.ca import LocalCA, CADirectory
from nodeagent.identity.manager import WorkloadCertificate
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import build_context
from nodeagent.identity.trust import TrustBundle
from nodeagent.proxy.tunnel import parse_target
from tests.integration.test_mesh_loopback import (A, A_ADDR, B_ADDR, DAY, Mesh, dr, get, metrics, run)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    return CADirectory.init(tmp_path_factory.mktemp("tunnel") / "ca", now=time.time() - 10 * DAY)


def adhoc(directory: CADirectory, identity: SpiffeId, *, now: float | None = None,
          lifetime: float = 3600) -> WorkloadCertificate:
    key = certs.generate_key()
    issued = LocalCA(directory).sign_csr(certs.make_csr(key, identity), identity, lifetime, now=now)
    return WorkloadCertificate(identity, issued.certificate, issued.chain, certs.key_to_pem(key))


CONNECTED = b"HTTP/1.1 200 OK\r\n\r\n"


def _answer_complete(got: bytes) -> bool:
    """True once the server accepted the CONNECT and answered the request inside in full (the
    tunnel then stays open for the next request). A refusal is complete when the server closes."""
    if not got.startswith(CONNECTED):
        return False
    done = []

    class Callbacks:
        def on_message_complete(self):
            done.append(True)

    try:
        httptools.HttpResponseParser(Callbacks()).feed_data(got[len(CONNECTED):])
    except httptools.HttpParserError as exc:
        raise AssertionError(f"malformed response inside the tunnel: {got!r}") from exc
    return bool(done)


async def tunnel_attempt(addr, ctx: ssl.SSLContext, target: str) -> bytes:
    """Handshake with ``ctx``, send CONNECT and one request; return all the server answered.

    Ends when the server closes or resets the connection (a refusal: no answer, or an HTTP error
    then close), or when the CONNECT was accepted and the inner response is complete. A server
    that neither answers nor closes within 5 s fails the test (TimeoutError is not a refusal)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr, ssl=ctx, server_hostname=""), 5)
    except (ssl.SSLError, ConnectionError):
        return b""
    got = b""
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET / HTTP/1.1\r\nhost: b\r\n\r\n".encode())
        while not _answer_complete(got):
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            got += data
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
    return got


def test_invalid_client_certificates_are_refused_by_the_tunnel_server(ca_dir, tmp_path):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            bundle = mesh.node2.manager.trust_bundle
            addr = mesh.tunnel.address
            target = f"{B_ADDR}:{mesh.app.port}"
            # The control: a valid certificate of A gets through.
            ok = await tunnel_attempt(addr, build_context(False, adhoc(ca_dir, A), bundle), target)
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200")
            assert mesh.app.hits == 1

            stranger_ca = CADirectory.init(tmp_path / "stranger", now=time.time() - DAY)
            stranger = adhoc(stranger_ca, A)
            both = TrustBundle((*stranger_ca.trust_bundle(time.time()).roots, *bundle.roots))
            root = ca_dir.active_root(time.time())
            key = certs.generate_key()
            foreign = SpiffeId.workload("shop", "a", "evil.example")
            foreign_cert = certs.sign_leaf(
                certs.LeafRequest(foreign, key.public_key(), time.time() - 60, time.time() + 3600),
                root.certificate, ca_dir._root_key(root))
            revoked = adhoc(ca_dir, SpiffeId.workload("shop", "c"))
            ca_dir.revoke_serial(revoked.serial)
            await mesh.node2.manager.refresh()  # node 2 polls the revocation list
            cases = {
                "unknown CA": build_context(False, stranger, both),
                "expired": build_context(False, adhoc(ca_dir, A, now=time.time() - 2 * DAY), bundle),
                "not yet valid": build_context(False, adhoc(ca_dir, A, now=time.time() + 2 * DAY), bundle),
                "wrong trust domain": build_context(
                    False, WorkloadCertificate(foreign, foreign_cert, (root.certificate,), certs.key_to_pem(key)),
                    bundle),
                "revoked": build_context(False, revoked, bundle),
            }
            for name, ctx in cases.items():
                answer = await tunnel_attempt(addr, ctx, target)
                assert answer == b"", (name, answer)
            assert mesh.app.hits == 1  # nothing reached B
            assert mesh.tunnel.stats == {"accepted": 1, "refused": 2}  # the two refused after the handshake
            # No client certificate at all: the handshake itself fails.
            from nodeagent.identity.tls import tls13_context
            assert await tunnel_attempt(addr, tls13_context(False, bundle.pem), target) == b""
            assert mesh.app.hits == 1
        finally:
            await mesh.close()
    run(scenario())


def test_refusal_reasons_name_the_peer_problem(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            bundle = mesh.node2.manager.trust_bundle
            revoked = adhoc(ca_dir, SpiffeId.workload("shop", "legacy"))
            ca_dir.revoke_identity(SpiffeId.workload("shop", "legacy"))
            await mesh.node2.manager.refresh()
            assert await tunnel_attempt(mesh.tunnel.address, build_context(False, revoked, bundle),
                                        f"{B_ADDR}:80") == b""
            assert mesh.tunnel.last_refusal.endswith("identity spiffe://cluster.local/ns/shop/sa/legacy is revoked")
        finally:
            await mesh.close()
    run(scenario())


def test_connect_must_target_this_workload_and_be_a_connect(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            ctx = build_context(False, adhoc(ca_dir, A), mesh.node2.manager.trust_bundle)
            other = await tunnel_attempt(mesh.tunnel.address, ctx, f"{A_ADDR}:{mesh.app.port}")
            assert other.startswith(b"HTTP/1.1 403 Forbidden\r\n")
            assert f"CONNECT target {A_ADDR}:{mesh.app.port} is not an address of shop/b" in mesh.tunnel.last_refusal
            for port in (15001, 15006, 15008):  # never the proxy's own listeners inside the pod
                answer = await tunnel_attempt(mesh.tunnel.address, ctx, f"{B_ADDR}:{port}")
                assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
                assert mesh.tunnel.last_refusal.endswith(f"port {port} of shop/b is the proxy's own port")
            reader, writer = await asyncio.open_connection(*mesh.tunnel.address, ssl=ctx, server_hostname="")
            writer.write(b"GET / HTTP/1.1\r\nhost: b\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 405 ")
            writer.close()
            reader, writer = await asyncio.open_connection(*mesh.tunnel.address, ssl=ctx, server_hostname="")
            writer.write(b"CONNECT b.shop:80 HTTP/1.1\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
            writer.close()
            assert mesh.app.hits == 0
        finally:
            await mesh.close()
    run(scenario())


def test_client_refuses_a_server_that_is_not_the_expected_workload(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            # An impostor on node 2 holding a valid mesh certificate, but of shop/c, not shop/b.
            impostor_identity = SpiffeId.workload("shop", "c")
            mesh.node2.manager.add_workload(impostor_identity)
            await mesh.node2.manager.refresh()
            impostor = mesh.node2.workload("c", B_ADDR)
            server = await mesh.node2.tunnel(impostor, B_ADDR)
            mesh.tunnel_ports[B_ADDR] = server.address[1]
            status, _, body = await get(mesh.a_out, "/x")
            assert status == 503 and b"connection failure" in body
            assert mesh.app.hits == 0 and server.stats["accepted"] == 0
            flags = {m["response_flags"] for m in metrics(mesh.node1)}
            assert flags == {"UF"}
        finally:
            await mesh.close()
    run(scenario())


def test_destination_rule_tls_disable_sends_plaintext(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir, dr("    tls:\n      mode: DISABLE\n")).start()
        try:
            status, _, _ = await get(mesh.a_out, "/plain")
            assert status == 200 and mesh.app.hits == 1
            assert mesh.tunnel.stats["accepted"] == 0  # straight to the application
            m = metrics(mesh.node1)
            assert [(x["destination_principal"], x["connection_security_policy"]) for x in m] == [
                ("unknown", "unknown")]
            mesh.set_config(dr("    tls:\n      mode: ISTIO_MUTUAL\n"))
            status, _, _ = await get(mesh.a_out, "/tunnel")
            assert status == 200 and mesh.tunnel.stats["accepted"] == 1
        finally:
            await mesh.close()
    run(scenario())


def test_parse_target():
    assert parse_target("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_target("[fd00::1]:8080") == ("fd00::1", 8080)
    for bad in ("b.shop:80", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "fd00::1:80", "[fd00::1:80", ":80"):
        assert parse_target(bad) is None, bad


def test_tcp_with_tls_disable_goes_plaintext_and_istio_mutual_through_the_tunnel(ca_dir):
    from tests.integration.test_mesh_loopback import B_HOST

    async def scenario():
        mesh = await Mesh(ca_dir, dr("    tls:\n      mode: DISABLE\n"), tcp_app=True).start()
        try:
            out = await mesh.node1.outbound(A, A_ADDR, mesh.tunnel_ports, fixed_destination=(B_HOST, 9000))
            for expected_tunnels in (0, 1):
                reader, writer = await asyncio.open_connection(*out)
                writer.write(b"ping\n")
                assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
                writer.close()
                assert mesh.tunnel.stats["accepted"] == expected_tunnels
                mesh.set_config(dr("    tls:\n      mode: ISTIO_MUTUAL\n"))
        finally:
            await mesh.close()
    run(scenario())


def test_a_listener_opens_before_its_first_certificate_and_serves_once_issued(ca_dir, tmp_path):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            late = SpiffeId.workload("shop", "late")
            mesh.node2.manager.add_workload(late)  # enrolled: no certificate yet
            server = await mesh.node2.tunnel(mesh.node2.workload("late", "127.0.30.1"), "127.0.30.1")
            ctx = build_context(False, adhoc(ca_dir, A), mesh.node2.manager.trust_bundle)
            assert await tunnel_attempt(server.address, ctx, "127.0.30.1:1") == b""
            assert server._ctx is None  # no context of its own while it waits (memory per pod)
            await mesh.node2.manager.refresh()  # the certificate arrives
            answer = await tunnel_attempt(server.address, ctx, "127.0.30.1:1")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert server.recent[-1][0] == A.principal
            assert server._ctx is mesh.node2.tls.server_context(late)  # the identity's shared context
            # The listener's context still verifies clients against the trust bundle.
            stranger_ca = CADirectory.init(tmp_path / "stranger", now=time.time() - DAY)
            stranger = adhoc(stranger_ca, A)
            both = TrustBundle((*stranger_ca.trust_bundle(time.time()).roots,
                                *mesh.node2.manager.trust_bundle.roots))
            assert await tunnel_attempt(server.address, build_context(False, stranger, both), "127.0.30.1:1") == b""
            assert server.stats["accepted"] == 1
        finally:
            await mesh.close()
    run(scenario())


def test_an_endpoint_labelled_tls_mode_disabled_is_reached_in_plaintext(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            text = mesh.config.snapshot.resources  # the WorkloadEntry of B, relabelled
            from tests.integration.test_mesh_loopback import base_config
            mesh.config.set(base_config(mesh.app.port).replace(
                "    app: b\n    version: v1\n", "    app: b\n    version: v1\n    security.istio.io/tlsMode: disabled\n"))
            assert text != mesh.config.snapshot.resources
            status, _, _ = await get(mesh.a_out, "/x")
            assert status == 200 and mesh.app.hits == 1 and mesh.tunnel.stats["accepted"] == 0
        finally:
            await mesh.close()
    run(scenario())
