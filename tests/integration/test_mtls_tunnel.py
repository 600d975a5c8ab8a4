"""The tunnel's TLS (port 15008): real handshakes over loopback sockets between
contexts from `TunnelTls`, certificates from the real CA."""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import pytest

from nodeagent.identity import certs
from nodeagent.identity.ca import CADirectory, LocalCA
from nodeagent.identity.errors import PeerRejected
from nodeagent.identity.manager import CertificateManager, WorkloadCertificate
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import TunnelTls, tls13_context, build_context
from nodeagent.identity.trust import TrustBundle

WEB = SpiffeId.workload("shop", "web")
DB = SpiffeId.workload("shop", "db")
LEGACY = SpiffeId.workload("shop", "legacy")
DAY = 86400.0


class Node:
    """One node agent's identity side: manager + TunnelTls on a LocalCA."""

    def __init__(self, directory: CADirectory, *workloads: SpiffeId, poll_interval: float = 0.0):
        self.ca = LocalCA(directory)
        self.manager = CertificateManager(self.ca, trust_domain="cluster.local", poll_interval=poll_interval)
        for w in workloads:
            self.manager.add_workload(w)
        asyncio.run(self.manager.refresh())
        self.tls = TunnelTls(self.manager)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    # Root made ten days ago so the tests can also mint certificates in the past.
    return CADirectory.init(tmp_path_factory.mktemp("mtls") / "ca", now=time.time() - 10 * DAY)


@pytest.fixture(scope="module")
def node(ca_dir):
    return Node(ca_dir, WEB, DB)


def adhoc(directory: CADirectory, identity: SpiffeId, *, now: float | None = None,
          lifetime: float = 3600) -> WorkloadCertificate:
    """A certificate outside any manager (a peer we control completely)."""
    key = certs.generate_key()
    issued = LocalCA(directory).sign_csr(certs.make_csr(key, identity), identity, lifetime, now=now)
    return WorkloadCertificate(identity, issued.certificate, issued.chain, certs.key_to_pem(key))


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_tls: TunnelTls | None = None,
              client_tls: TunnelTls | None = None):
    """Handshake over a loopback TCP socket. Each side returns the peer's SPIFFE ID
    (checked with peer_identity) and the selected ALPN, or the exception it hit."""
    listener = socket.create_server(("127.0.0.1", 0))
    results: dict[str, object] = {}

    def serve():
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = server_tls.peer_identity(tls) if server_tls else None
                tls.sendall(b"ok")
                results["server"] = (peer, tls.selected_alpn_protocol(), tls.version())
        except (ssl.SSLError, OSError, PeerRejected) as exc:
            results["server"] = exc
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        sock = socket.create_connection(listener.getsockname(), timeout=5)
        with client_ctx.wrap_socket(sock) as tls:
            peer = client_tls.peer_identity(tls) if client_tls else None
            data = tls.recv(2)
            if data != b"ok":
                raise ConnectionError("server closed the connection")
            results["client"] = (peer, tls.selected_alpn_protocol(), tls.version())
    except (ssl.SSLError, OSError, PeerRejected) as exc:
        results["client"] = exc
    finally:
        thread.join(10)
        listener.close()
    return results["server"], results["client"]


def test_mutual_tls_both_sides_read_the_other_spiffe_id(node):
    server, client = handshake(node.tls.server_context(DB), node.tls.client_context(WEB),
                               node.tls, node.tls)
    assert server == (WEB, "http/1.1", "TLSv1.3")
    assert client == (DB, "http/1.1", "TLSv1.3")


def test_contexts_are_tls13_only_and_require_peer_certs(node):
    for ctx in (node.tls.server_context(DB), node.tls.client_context(WEB)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    legacy.check_hostname = False
    legacy.verify_mode = ssl.CERT_NONE
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = handshake(node.tls.server_context(DB), legacy)
    assert isinstance(server, ssl.SSLError) and isinstance(client, ssl.SSLError)


def test_unknown_ca_is_refused_both_ways(node, tmp_path):
    stranger_ca = CADirectory.init(tmp_path / "other-ca", now=time.time() - DAY)
    stranger = adhoc(stranger_ca, WEB)
    # The stranger trusts our root too, so only its own certificate is in question.
    stranger_bundle = TrustBundle((*stranger_ca.trust_bundle(time.time()).roots, *node.manager.trust_bundle.roots))
    server, _ = handshake(node.tls.server_context(DB), build_context(False, stranger, stranger_bundle))
    assert isinstance(server, ssl.SSLCertVerificationError)
    assert server.verify_message == "self-signed certificate in certificate chain"
    _, client = handshake(build_context(True, stranger, stranger_bundle), node.tls.client_context(WEB))
    assert isinstance(client, ssl.SSLCertVerificationError)
    assert "self-signed certificate in certificate chain" in client.verify_message


def test_expired_and_not_yet_valid_are_refused_by_the_handshake(node, ca_dir):
    bundle = node.manager.trust_bundle
    expired = adhoc(ca_dir, WEB, now=time.time() - 2 * DAY)
    future = adhoc(ca_dir, WEB, now=time.time() + 2 * DAY)
    server, _ = handshake(node.tls.server_context(DB), build_context(False, expired, bundle), node.tls)
    assert isinstance(server, ssl.SSLCertVerificationError) and server.verify_message == "certificate has expired"
    server, _ = handshake(node.tls.server_context(DB), build_context(False, future, bundle), node.tls)
    assert isinstance(server, ssl.SSLCertVerificationError)
    assert server.verify_message == "certificate is not yet valid"
    # The client refuses an expired server the same way.
    _, client = handshake(build_context(True, expired, bundle), node.tls.client_context(WEB))
    assert isinstance(client, ssl.SSLCertVerificationError) and client.verify_message == "certificate has expired"


def test_wrong_trust_domain_is_refused_after_the_handshake(node, ca_dir):
    # Signed by our own root (so the chain verifies) but naming another trust domain.
    root = ca_dir.active_root(time.time())
    key = certs.generate_key()
    foreign = SpiffeId.workload("shop", "web", "evil.example")
    cert = certs.sign_leaf(certs.LeafRequest(foreign, key.public_key(), time.time() - 60, time.time() + 3600),
                           root.certificate, ca_dir._root_key(root))
    peer = WorkloadCertificate(foreign, cert, (root.certificate,), certs.key_to_pem(key))
    server, _ = handshake(node.tls.server_context(DB), build_context(False, peer, node.manager.trust_bundle),
                          node.tls)
    assert isinstance(server, PeerRejected)
    assert str(server) == "peer spiffe://evil.example/ns/shop/sa/web is outside the trust domain cluster.local"


def test_no_client_certificate_is_refused(node):
    anonymous = tls13_context(False, node.manager.trust_bundle.pem)
    server, client = handshake(node.tls.server_context(DB), anonymous)
    assert isinstance(server, ssl.SSLError) and "peer did not return a certificate" in str(server)
    assert isinstance(client, (ssl.SSLError, OSError))


def test_revoked_serial_and_identity_are_refused_after_one_poll(tmp_path):
    directory = CADirectory.init(tmp_path / "ca", now=time.time() - DAY)
    server_node = Node(directory, DB)
    stolen = adhoc(directory, WEB)
    legacy = adhoc(directory, LEGACY)
    bundle = server_node.manager.trust_bundle
    for peer in (stolen, legacy):
        server, _ = handshake(server_node.tls.server_context(DB), build_context(False, peer, bundle),
                              server_node.tls)
        assert server[0] == peer.identity
    directory.revoke_serial(stolen.serial)
    directory.revoke_identity(LEGACY)
    asyncio.run(server_node.manager.refresh())  # one poll of the revocation list
    assert server_node.manager.revocations.version == 2
    server, _ = handshake(server_node.tls.server_context(DB), build_context(False, stolen, bundle),
                          server_node.tls)
    assert isinstance(server, PeerRejected) and f"serial {stolen.serial:x} is revoked" in str(server)
    server, _ = handshake(server_node.tls.server_context(DB), build_context(False, legacy, bundle),
                          server_node.tls)
    assert isinstance(server, PeerRejected)
    assert str(server).endswith("identity spiffe://cluster.local/ns/shop/sa/legacy is revoked")
    # A fresh certificate of a workload whose old serial was revoked is fine.
    server, _ = handshake(server_node.tls.server_context(DB), build_context(False, adhoc(directory, WEB), bundle),
                          server_node.tls)
    assert server[0] == WEB


def test_leaves_of_old_and_new_root_both_accepted_during_overlap(tmp_path):
    directory = CADirectory.init(tmp_path / "ca", now=time.time() - DAY)
    node1 = Node(directory, DB)  # issued by root-1
    old_root = directory.roots()[0].certificate
    new_root = directory.rotate_root(now=time.time()).certificate
    node2 = Node(directory, WEB)  # issued by root-2
    asyncio.run(node1.manager.refresh())  # sees two roots; moves DB to root-2 as well
    assert len(node1.manager.trust_bundle.roots) == 2
    assert certs.issued_by(node2.manager.certificate(WEB).certificate, new_root)
    old_leaf = adhoc(directory, LEGACY, now=time.time() - 600)  # 10 minutes ago root-1 was signing
    assert certs.issued_by(old_leaf.certificate, old_root)
    bundle = node1.manager.trust_bundle
    for peer in (old_leaf, node2.manager.certificate(WEB)):
        server, client = handshake(node1.tls.server_context(DB), build_context(False, peer, bundle), node1.tls)
        assert server[0] == peer.identity
        server, client = handshake(build_context(True, peer, bundle), node1.tls.client_context(DB),
                                   client_tls=node1.tls)
        assert client[0] == peer.identity


def test_steady_stream_of_handshakes_through_a_root_rotation(tmp_path):
    """Two agents run their managers' loops (polling every 50 and 150 ms) while a
    client opens tunnel connections back to back; the CA adds a root that
    activates after 600 ms (longer than any poll period, as `rotate-root
    --activate-after` must be), the agents move to it, the old root is retired. No handshake
    may fail, and a connection opened before the rotation still works after it."""
    directory = CADirectory.init(tmp_path / "ca", now=time.time() - DAY)
    # Different poll periods, as on real nodes: one agent learns of a change before the other.
    server_node = Node(directory, DB, poll_interval=0.05)
    client_node = Node(directory, WEB, poll_interval=0.15)
    old_root = directory.roots()[0].certificate

    async def scenario():
        stop = asyncio.Event()
        loops = [asyncio.create_task(n.manager.run(stop)) for n in (server_node, client_node)]

        async def on_connection(reader, writer):
            try:
                peer = server_node.tls.peer_identity(writer.get_extra_info("ssl_object"))
                while line := await reader.readline():
                    writer.write(f"{peer.uri} {line.decode().strip()}\n".encode())
                    await writer.drain()
            except PeerRejected as exc:
                writer.write(f"rejected {exc}\n".encode())
            writer.close()

        listener = await asyncio.start_server(on_connection, "127.0.0.1", 0,
                                              ssl=server_node.tls.server_context(DB))
        port = listener.sockets[0].getsockname()[1]

        async def connect():
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_node.tls.client_context(WEB), server_hostname="")
            peer = client_node.tls.peer_identity(writer.get_extra_info("ssl_object"))
            server_cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            return reader, writer, peer, server_cert

        long_lived = await connect()
        outcomes: list[object] = []
        issuers_seen: set[bytes] = set()
        streaming = asyncio.Event()

        async def stream():
            streaming.set()
            while not stop.is_set() and len(outcomes) < 2000:
                try:
                    reader, writer, peer, server_cert = await asyncio.wait_for(connect(), 5)
                    writer.write(b"ping\n")
                    answer = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
                    writer.close()
                    outcomes.append((peer, answer))
                    issuers_seen.add(server_cert)
                except Exception as exc:  # recorded, then asserted on: none may fail
                    outcomes.append(exc)

        async def wait_for(condition, what):
            for _ in range(200):
                if condition():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"timed out waiting for {what}")

        def signed_by(node, identity, root):
            return certs.issued_by(node.manager.certificate(identity).certificate, root)

        streamer = asyncio.create_task(stream())
        await streaming.wait()
        await asyncio.sleep(0.2)
        phase_counts = [len(outcomes)]
        new_root = directory.rotate_root(now=time.time(), activate_after=0.6).certificate
        await wait_for(lambda: signed_by(server_node, DB, new_root) and signed_by(client_node, WEB, new_root),
                       "both agents on the new root")
        phase_counts.append(len(outcomes))
        await asyncio.sleep(0.2)
        directory.retire_root(now=time.time(), force=True)
        await wait_for(lambda: all(len(n.manager.trust_bundle.roots) == 1 for n in (server_node, client_node)),
                       "both agents dropping the old root")
        await asyncio.sleep(0.2)
        phase_counts.append(len(outcomes))

        reader, writer, peer, first_server_cert = long_lived
        writer.write(b"still here\n")
        late_answer = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        writer.close()

        stop.set()
        await streamer
        await asyncio.gather(*loops)
        listener.close()
        await listener.wait_closed()
        return outcomes, phase_counts, late_answer, first_server_cert, issuers_seen

    outcomes, phase_counts, late_answer, first_server_cert, server_certs = asyncio.run(scenario())
    failures = [o for o in outcomes if not isinstance(o, tuple) or o != (DB, f"{WEB.uri} ping")]
    assert failures == []
    # Handshakes happened before, during and after the rotation.
    assert phase_counts[0] > 0 and phase_counts[1] > phase_counts[0] and phase_counts[2] > phase_counts[1]
    assert late_answer == f"{WEB.uri} still here"
    # New connections got the new server certificate from the same listener context.
    from cryptography import x509
    issuers = {x509.load_der_x509_certificate(c).issuer for c in server_certs}
    assert len(issuers) == 2
    assert x509.load_der_x509_certificate(first_server_cert).issuer == old_root.subject


def test_listener_refuses_new_handshakes_once_its_certificate_expired(node, ca_dir):
    offset = [0.0]
    manager = CertificateManager(LocalCA(ca_dir), trust_domain="cluster.local",
                                 clock=lambda: time.time() + offset[0])
    manager.add_workload(DB)
    asyncio.run(manager.refresh())
    tls = TunnelTls(manager)
    listener_ctx = tls.server_context(DB)
    server, _ = handshake(listener_ctx, node.tls.client_context(WEB), tls)
    assert server[0] == WEB
    offset[0] = 2 * DAY  # the agent's clock says the certificate has expired (CA unreachable)
    server, client = handshake(listener_ctx, node.tls.client_context(WEB), tls)
    assert isinstance(server, ssl.SSLError) and isinstance(client, (ssl.SSLError, OSError))
    assert not manager.health().ok and "expired" in manager.health().reason
