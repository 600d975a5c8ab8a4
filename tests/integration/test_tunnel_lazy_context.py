"""A tunnel listener makes its TLS context at its first connection, not when it opens: a pod
that never receives mesh traffic holds no OpenSSL context for it (docs/operations.md,
"Memory"). The first handshake is verified both ways, and certificate rotation still reaches
the listener's new connections. Real CA, real TLS 1.3 on loopback."""
from __future__ import annotations

import asyncio
import gc
import ssl
import time
import weakref

import pytest
from cryptography import x509

from nodeagent.identity import certs
from nodeagent.identity.ca import CADirectory
from nodeagent.identity.errors import ForeignIdentityError
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import build_context
from nodeagent.identity.trust import TrustBundle
from tests.integration.test_mesh_loopback import A, DAY, Mesh, run
from tests.integration.test_tunnel import adhoc, tunnel_attempt

pytestmark = pytest.mark.timeout(30)

LAZY = SpiffeId.workload("shop", "lazy")
ADDR = "127.0.31.1"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    return CADirectory.init(tmp_path_factory.mktemp("lazy") / "ca", now=time.time() - 10 * DAY)


async def server_certificate(addr, ctx: ssl.SSLContext) -> x509.Certificate:
    """The certificate the listener presents in a completed handshake."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr, ssl=ctx, server_hostname=""), 5)
    try:
        return x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    finally:
        writer.close()


def test_the_listener_context_is_made_at_the_first_handshake_and_follows_rotation(ca_dir, tmp_path):
    offset = [0.0]

    async def scenario():
        mesh = await Mesh(ca_dir, node2_clock=lambda: time.time() + offset[0]).start()
        try:
            node = mesh.node2
            node.manager.add_workload(LAZY)
            await node.manager.refresh()  # the certificate exists before the listener opens
            issued = node.manager.certificate(LAZY)
            server = await node.tunnel(node.workload("lazy", ADDR), ADDR)
            assert ("server", LAZY) not in node.tls.contexts()
            assert server._ctx is None
            client = build_context(False, adhoc(ca_dir, A), node.manager.trust_bundle)

            # First connection: the context is made, the client is verified and admitted.
            answer = await tunnel_attempt(server.address, client, f"{ADDR}:1")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert server.recent[-1][0] == A.principal
            assert node.tls.contexts().count(("server", LAZY)) == 1
            presented = await server_certificate(server.address, client)
            assert certs.spiffe_id_of(presented) == LAZY
            assert presented.serial_number == issued.serial

            # A client outside the trust bundle is still refused by that context.
            stranger_ca = CADirectory.init(tmp_path / "stranger", now=time.time() - DAY)
            both = TrustBundle((*stranger_ca.trust_bundle(time.time()).roots, *node.manager.trust_bundle.roots))
            stranger = build_context(False, adhoc(stranger_ca, A), both)
            assert await tunnel_attempt(server.address, stranger, f"{ADDR}:1") == b""

            # Renewal (past half-life): new connections to the same listener get the new certificate.
            first = weakref.ref(server._ctx)
            offset[0] = issued.renew_at - time.time() + 1
            await node.manager.refresh()
            renewed = node.manager.certificate(LAZY)
            assert renewed.serial != issued.serial
            presented = await server_certificate(server.address, client)
            assert presented.serial_number == renewed.serial
            answer = await tunnel_attempt(server.address, client, f"{ADDR}:1")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert server.stats["accepted"] == 2
            # The listener moved to the identity's new context; the first one is freed.
            assert server._ctx is node.tls.cached_server_context(LAZY) is not None
            assert node.tls.contexts().count(("server", LAZY)) == 1
            for _ in range(50):
                gc.collect()
                if first() is None:
                    break
                await asyncio.sleep(0.02)
            assert first() is None, gc.get_referrers(first())
        finally:
            await mesh.close()
    run(scenario())


def test_an_identity_this_node_does_not_serve_is_refused_when_the_listener_opens(ca_dir):
    async def scenario():
        mesh = await Mesh(ca_dir).start()
        try:
            with pytest.raises(ForeignIdentityError):
                await mesh.node2.tunnel(mesh.node2.workload("nobody", ADDR), ADDR)
            assert all(identity.service_account != "nobody" for _, identity in mesh.node2.tls.contexts())
        finally:
            await mesh.close()
    run(scenario())
