"""TLS for the mTLS tunnel (port 15008) and the CA service.

Why the SPIFFE check is done by hand: Python's ``ssl`` verifies the chain and
the validity period, but it can only match DNS names and IP addresses against
a certificate, never URI SANs. So contexts use ``check_hostname=False`` with
``CERT_REQUIRED`` (the chain must lead to a root of the trust bundle), and the
caller MUST call ``peer_identity(ssl_object)`` right after the handshake and
close the connection if it raises: it reads the peer's ``spiffe://`` URI SAN
with ``cryptography``, checks the trust domain, the validity period again and
the revocation list.

Rotation: ``server_context()`` returns a context whose SNI callback (OpenSSL
runs it for every ClientHello, with or without SNI) switches each NEW
connection to a context built from the current certificate and trust bundle;
a listener keeps one context object forever. ``client_context()`` returns the
current context (cached; call it for every new connection). Connections
already open keep the context they started with and finish normally.

Keys are loaded into OpenSSL from an anonymous in-memory file (memfd), never
from the file system.
"""
from __future__ import annotations

import logging
import os
import ssl
import time
from typing import Callable

from cryptography import x509

from . import certs
from .errors import NoCertificate, PeerRejected
from .manager import CertificateManager, ScopedCertificateSource, WorkloadCertificate
from .spiffe import SpiffeId
from .trust import RevocationList, TrustBundle

log = logging.getLogger(__name__)

# ALPN for the tunnel: HTTP/1.1 today; "h2" is to be added in front for ztunnel interop.
TUNNEL_ALPN = ("http/1.1",)


def load_cert_chain_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``ctx.load_cert_chain`` without writing the private key to any file system."""
    fd = os.memfd_create("nodeagent-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem + b"\n" + chain_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def tls13_context(server: bool, roots_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3 only, peer certificate required and verified against ``roots_pem``;
    no host name check (see the module docstring)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    return ctx


def build_context(server: bool, cert: WorkloadCertificate, bundle: TrustBundle,
                  alpn=TUNNEL_ALPN) -> ssl.SSLContext:
    """A TLS 1.3-only context presenting ``cert`` and requiring a peer certificate
    that chains to ``bundle``."""
    ctx = tls13_context(server, bundle.pem)
    load_cert_chain_in_memory(ctx, cert.chain_pem, cert.key_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def reloading_server_context(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """A listener context that hands every new handshake to ``current()``."""
    front = current()

    def switch(ssl_object, server_name, _ctx):
        try:
            ssl_object.context = current()
        except Exception as exc:  # no usable certificate now: refuse this handshake, keep listening
            log.warning("tls: refusing a handshake: %s", exc)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    front.sni_callback = switch
    return front


def verify_peer_certificate(der: bytes | None, *, trust_domain: str, revocations: RevocationList,
                            now: float, expected: SpiffeId | None = None) -> SpiffeId:
    """The SPIFFE ID of a peer certificate (DER), or PeerRejected saying why not."""
    if not der:
        raise PeerRejected("the peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        identity = certs.spiffe_id_of(cert)
    except (ValueError, certs.CertificateError) as exc:
        raise PeerRejected(f"peer certificate: {exc}") from None
    if identity.trust_domain != trust_domain:
        raise PeerRejected(f"peer {identity} is outside the trust domain {trust_domain}")
    if not identity.is_workload:
        raise PeerRejected(f"peer {identity} is not a workload identity")
    if now < certs.not_before(cert):
        raise PeerRejected(f"peer certificate for {identity} is not valid before "
                           f"{certs.not_before_utc(cert):%Y-%m-%d %H:%M:%S} UTC")
    if now >= certs.not_after(cert):
        raise PeerRejected(f"peer certificate for {identity} expired at "
                           f"{certs.not_after_utc(cert):%Y-%m-%d %H:%M:%S} UTC")
    reason = revocations.revoked_reason(cert)
    if reason:
        raise PeerRejected(f"peer {identity}: {reason}")
    if expected is not None and identity != expected:
        raise PeerRejected(f"peer is {identity}, expected {expected}")
    return identity


class TunnelTls:
    """SSL contexts for the tunnel, fed by a CertificateManager."""

    def __init__(self, manager: CertificateManager, *, clock: Callable[[], float] = time.time):
        self._manager = manager
        self._clock = clock
        self._cache: dict[tuple[bool, SpiffeId], tuple[tuple[int, str], ssl.SSLContext]] = {}

    def _current(self, server: bool, source: ScopedCertificateSource, identity: SpiffeId) -> ssl.SSLContext:
        cert = source.certificate(identity)
        bundle = self._manager.trust_bundle
        version = (cert.serial, bundle.version)
        cached = self._cache.get((server, identity))
        if cached is not None and cached[0] == version:
            return cached[1]
        ctx = build_context(server, cert, bundle)
        self._cache[(server, identity)] = (version, ctx)
        return ctx

    def cached_server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """The server context ``server_context(identity)`` would hand out now, if one was made
        (its certificate not checked again: the reloading context's SNI callback does that)."""
        cached = self._cache.get((True, identity))
        return cached[1] if cached is not None else None

    def contexts(self) -> list[tuple[str, SpiffeId]]:
        """("server" | "client", identity) of every context held now. A listener's server
        context is made at its first connection, an outbound one at the first tunnel."""
        return [("server" if server else "client", identity) for server, identity in self._cache]

    def forget(self, identity: SpiffeId) -> None:
        """Drop the cached contexts of ``identity`` (call once the manager no longer serves
        it: its workloads are unenrolled). Each holds the key, the chain and a trust store
        in OpenSSL (~26 KiB); nothing else would ever free them. Re-enrolled, the identity
        gets fresh contexts on first use."""
        self._cache.pop((True, identity), None)
        self._cache.pop((False, identity), None)

    def server_context(self, workload_identity: SpiffeId) -> ssl.SSLContext:
        """For a listener on 15008 of ``workload_identity``; keep it for the listener's life."""
        return self.scoped(workload_identity).server_context()

    def client_context(self, source_identity: SpiffeId) -> ssl.SSLContext:
        """For ONE new outbound tunnel connection presenting ``source_identity``."""
        return self.scoped(source_identity).client_context()

    def scoped(self, workload: SpiffeId) -> "ScopedTunnelTls":
        return ScopedTunnelTls(self, self._manager.scoped(workload))

    def peer_identity(self, ssl_object: ssl.SSLObject | ssl.SSLSocket,
                      expected: SpiffeId | None = None) -> SpiffeId:
        """Check the peer right after the handshake; raise PeerRejected to close it."""
        return verify_peer_certificate(ssl_object.getpeercert(binary_form=True),
                                       trust_domain=self._manager.trust_domain,
                                       revocations=self._manager.revocations,
                                       now=self._clock(), expected=expected)


class ScopedTunnelTls:
    """Tunnel contexts for one workload: asking for another identity raises
    ForeignIdentityError (the listener/connection of a workload only ever
    presents that workload's certificate)."""

    def __init__(self, tls: TunnelTls, source: ScopedCertificateSource):
        self._tls = tls
        self._source = source
        self.workload = source.workload

    def server_context(self, identity: SpiffeId | None = None) -> ssl.SSLContext:
        identity = identity or self.workload
        self._source.certificate(identity)  # guard + "is there a certificate at all"
        return reloading_server_context(lambda: self._tls._current(True, self._source, identity))

    def client_context(self, identity: SpiffeId | None = None) -> ssl.SSLContext:
        return self._tls._current(False, self._source, identity or self.workload)


__all__ = ["TUNNEL_ALPN", "TunnelTls", "ScopedTunnelTls", "build_context", "tls13_context", "verify_peer_certificate",
           "reloading_server_context", "load_cert_chain_in_memory", "NoCertificate", "PeerRejected"]
