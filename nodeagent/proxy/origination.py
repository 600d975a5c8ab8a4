"""TLS origination: DestinationRule ``tls.mode: SIMPLE`` / ``MUTUAL`` (Istio's upstream TLS).

A cluster whose effective ``tls`` (``policy.cluster.ClusterPolicy.origination``) is SIMPLE or
MUTUAL gets an ``OriginatingConnector`` as its pool's connector: TCP to the endpoint through
the connector it had (plain, marked, in the pod's netns...), then a TLS handshake (OpenSSL on
memory BIOs, ``nodeagent.proxy.tunnel.TlsStream``) that

- sends ``sni`` (tls.sni, else the destination host) as SNI;
- verifies the server certificate against ``caCertificates`` (a PEM file, read as a sidecar
  reads it), or the system trust store when it is absent, and then its names: one of
  ``subjectAltNames`` must be among the certificate's SANs, or, without them, the
  certificate must be valid for the SNI host (Istio's VERIFY_CERTIFICATE_AT_CLIENT /
  auto SAN validation); ``insecureSkipVerify: true`` skips both;
- with ``caCrl`` (a PEM file of one or more CRLs), refuses a server certificate revoked by
  them, checking every CA of the chain as Envoy does (``X509_V_FLAG_CRL_CHECK`` and
  ``_CRL_CHECK_ALL``): once a CRL is given, each CA in the server's chain needs one, or
  verification fails for revoked and unrevoked certificates alike;
- presents ``clientCertificate`` + ``privateKey`` for MUTUAL;
- offers ALPN ``h2`` on grpc/http2 ports, ``http/1.1`` otherwise.

Only then is the engine's protocol (HTTP/1.1 exchange, HTTP/2 connection, TCP relay) given
the stream, so nothing is ever sent to a server that failed verification. A failed
handshake or verification is a connect failure (``OriginationError``, an OSError): 503
``UF``, recorded as a connect failure by outlier detection, retried on ``connect-failure``;
why it failed is logged at INFO once per cluster per minute.

``credentialName`` names a Kubernetes Secret, which nodeagent cannot read: the loader warns,
and connections fail (503 UF) as Istio's do when the secret is missing; never plaintext.

SSL contexts are built once per distinct settings and ALPN list (``_CONTEXTS``) and
reused by every connection; the files' identity (device, inode, size, mtime) is checked when
the config is reloaded (``bind_connector`` runs on every cluster refresh), and a changed file
gives new contexts. A file that cannot be read or parsed is a WARNING naming the
DestinationRule, its file:line, the field and the path; the cluster keeps the last good
settings it had, or, with none, fails its connections (503 UF).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
import time

from nodeagent.proxy.tunnel import TlsStream
from nodeagent.proxy.upstream import TransportFailure

log = logging.getLogger(__name__)

LOG_INTERVAL = 60.0  # seconds between two logged failures of one cluster
_CONTEXT_LIMIT = 256  # distinct (settings, alpn) kept; beyond that the cache starts afresh


class OriginationError(TransportFailure):
    """TLS origination failed (handshake, verification, or no usable settings): a connect failure."""


class _Contexts:
    """The SSL contexts of one set of settings and file versions, one per ALPN list."""

    __slots__ = ("origin", "stamps", "by_alpn")

    def __init__(self, origin, stamps) -> None:
        self.origin = origin
        self.stamps = stamps
        self.by_alpn: dict[tuple, ssl.SSLContext] = {}

    def get(self, alpn: tuple) -> ssl.SSLContext:
        ctx = self.by_alpn.get(alpn)
        if ctx is None:
            ctx = self.by_alpn[alpn] = build_context(self.origin, alpn)
        return ctx


_CONTEXTS: dict[tuple, _Contexts] = {}
# settings -> (stamps, message) of the last failure logged, so a broken file is reported once
# per change, not once per cluster and reload.
_REPORTED: dict[tuple, tuple] = {}
_LAST_FAILURE_LOG: dict[str, float] = {}


def _files(origin) -> list[tuple[str, str]]:
    """(field name, path) of the files ``origin`` reads."""
    out = []
    if origin.insecure_skip_verify is not True and origin.ca_certificates:
        out.append(("caCertificates", origin.ca_certificates))
    if origin.insecure_skip_verify is not True and origin.ca_crl:
        out.append(("caCrl", origin.ca_crl))
    if origin.mode == "MUTUAL":
        if origin.client_certificate:
            out.append(("clientCertificate", origin.client_certificate))
        if origin.private_key:
            out.append(("privateKey", origin.private_key))
    return out


def _where(origin, field: str) -> str:
    src = f"{origin.source}: " if origin.source else ""
    path = f"{origin.field}.{field}" if origin.field else field
    return f"{src}{origin.ref}: {path}"


class ConfigFileError(Exception):
    """A file the tls settings name cannot be read or parsed (the message says which and why)."""


def _stamps(origin) -> tuple:
    """The identity of each file now (a changed file gives a new tuple)."""
    out = []
    for field, path in _files(origin):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigFileError(f"{_where(origin, field)}: cannot read {path}: {exc.strerror or exc}") from None
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def build_context(origin, alpn: tuple = ()) -> ssl.SSLContext:
    """A client SSLContext for ``origin`` (a policy.cluster.TlsOrigination); raises
    ConfigFileError naming the field and file when one cannot be read or parsed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # Envoy's client default
    if origin.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        # subjectAltNames are matched after the handshake (_OriginClient); without them the
        # certificate must be valid for the SNI host.
        ctx.check_hostname = not origin.subject_alt_names and bool(origin.sni)
        if origin.ca_certificates:
            data = _read(origin, "caCertificates", origin.ca_certificates)
            try:
                ctx.load_verify_locations(cadata=data.decode("ascii"))
            except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
                raise ConfigFileError(f"{_where(origin, 'caCertificates')}: {origin.ca_certificates} holds no "
                                      f"usable PEM CA certificate ({_reason(exc)})") from None
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if origin.ca_crl:
            _load_crl(ctx, origin)
    if origin.mode == "MUTUAL":
        cert, key = origin.client_certificate, origin.private_key
        _read(origin, "clientCertificate", cert)
        _read(origin, "privateKey", key)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigFileError(f"{_where(origin, 'clientCertificate')} / privateKey: {cert} and {key} are not a "
                                  f"PEM certificate and its private key ({_reason(exc)})") from None
        except OSError as exc:
            raise ConfigFileError(f"{_where(origin, 'clientCertificate')}: cannot read {cert} or {key}: "
                                  f"{exc.strerror or exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _load_crl(ctx: ssl.SSLContext, origin) -> None:
    """The CRLs of ``caCrl`` into ``ctx``'s store, checked for the whole chain (Envoy's
    CertificateValidationContext.crl with only_verify_leaf_cert_crl false, Istio's mapping)."""
    path = origin.ca_crl
    data = _read(origin, "caCrl", path)
    if b"-----BEGIN X509 CRL-----" not in data:
        raise ConfigFileError(f"{_where(origin, 'caCrl')}: {path} holds no PEM certificate revocation list "
                              "(-----BEGIN X509 CRL-----)")
    try:
        ctx.load_verify_locations(cafile=path)  # OpenSSL reads the certificates and CRLs of a PEM file
    except (ssl.SSLError, OSError) as exc:
        raise ConfigFileError(f"{_where(origin, 'caCrl')}: {path} is not a usable PEM certificate "
                              f"revocation list ({_reason(exc)})") from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def _read(origin, field: str, path: str | None) -> bytes:
    if not path:
        raise ConfigFileError(f"{_where(origin, field)}: required for mode {origin.mode}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigFileError(f"{_where(origin, field)}: cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return str(exc) or type(exc).__name__


def contexts_for(origin, alpn: tuple = ()) -> _Contexts:
    """The (cached) contexts of ``origin`` for its files as they are now; ConfigFileError
    when a file cannot be read or parsed."""
    settings = origin.settings()
    stamps = _stamps(origin)
    hit = _CONTEXTS.get(settings)
    if hit is not None and hit.stamps == stamps:
        return hit
    contexts = _Contexts(origin, stamps)
    contexts.get(alpn)  # parse the files now, so a bad one is reported at reload, not per request
    if len(_CONTEXTS) >= _CONTEXT_LIMIT:
        _CONTEXTS.clear()
    _CONTEXTS[settings] = contexts
    _REPORTED.pop(settings, None)
    return contexts


def _alpn_for(service, port: int) -> tuple:
    from nodeagent.proxy.h2 import is_h2_port
    sp = service.port(port) if service is not None else None
    return ("h2",) if is_h2_port(sp) else ("http/1.1",)


class OriginatingConnector:
    """A ``Connector`` that opens TLS to the endpoint over ``inner``'s TCP stream."""

    __slots__ = ("inner", "origin", "contexts", "alpn", "cluster", "error")

    def __init__(self, inner, origin, contexts, alpn: tuple, cluster: str, error: str | None = None) -> None:
        self.inner = inner
        self.origin = origin
        self.contexts = contexts  # _Contexts, or None when the settings cannot be used (error)
        self.alpn = alpn
        self.cluster = cluster
        self.error = error

    async def connect(self, protocol_factory, address: str, port: int, timeout: float):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if self.contexts is None:
                raise OriginationError(self.error)
            ctx = self.contexts.get(self.alpn)
            origin = self.origin
            waiter = loop.create_future()
            client = _OriginClient(waiter, protocol_factory, origin, address, port)

            def handshake_done(exc) -> None:
                if exc is not None and not waiter.done():
                    waiter.set_exception(OriginationError(_describe(exc)))

            stream = TlsStream(ctx, client, server_side=False, handshake_timeout=max(deadline - loop.time(), 0.001),
                               on_handshake=handshake_done, server_hostname=origin.sni)
            await self.inner.connect(lambda: stream, address, port, max(deadline - loop.time(), 0.001))
            try:
                return await asyncio.wait_for(waiter, max(deadline - loop.time(), 0.001))
            except BaseException:
                stream.abort()
                raise
        except OriginationError as exc:
            self._failed(address, port, str(exc))
            raise
        except ConfigFileError as exc:  # a lazily built ALPN variant whose file went bad
            self._failed(address, port, str(exc))
            raise OriginationError(str(exc)) from None

    def _failed(self, address: str, port: int, why: str) -> None:
        now = time.monotonic()
        last = _LAST_FAILURE_LOG.get(self.cluster)
        if last is not None and now - last < LOG_INTERVAL:
            return
        if len(_LAST_FAILURE_LOG) > 4096:
            _LAST_FAILURE_LOG.clear()
        _LAST_FAILURE_LOG[self.cluster] = now
        log.info("TLS origination to %s:%d (%s) failed: %s (503 UF; further failures of this cluster "
                 "are not logged for %d s)", address, port, self.cluster, why, LOG_INTERVAL)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"TLS handshake failed: {exc}"


def _dns_match(pattern: str, name: str) -> bool:
    """A certificate DNS SAN ``pattern`` (``*.example.com`` covers one label) against ``name``."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        head, rest = name.split(".", 1)
        return bool(head) and rest == pattern[2:]
    return False


def san_matches(peercert: dict, wanted: tuple[str, ...]) -> bool:
    """Envoy's match_subject_alt_names with exact matchers: one of ``wanted`` is a SAN of the
    certificate (DNS names honour the certificate's wildcards; URIs and IPs exactly)."""
    sans = peercert.get("subjectAltName", ()) if peercert else ()
    for want in wanted:
        for kind, value in sans:
            if kind == "DNS" and _dns_match(value, want):
                return True
            if kind == "URI" and value == want:
                return True
            if kind == "IP Address":
                try:
                    if ipaddress.ip_address(value.strip()) == ipaddress.ip_address(want):
                        return True
                except ValueError:
                    pass
    return False


class _OriginClient:
    """The TLS stream's first protocol: checks the server's names once the handshake is done,
    then hands the stream to the engine's protocol (nothing is written before that)."""

    __slots__ = ("waiter", "factory", "origin", "address", "port", "inner")

    def __init__(self, waiter, factory, origin, address: str, port: int) -> None:
        self.waiter = waiter
        self.factory = factory
        self.origin = origin
        self.address = address
        self.port = port
        self.inner = None

    def _fail(self, transport, message: str) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(OriginationError(message))
        transport.abort()

    def connection_made(self, transport) -> None:
        origin = self.origin
        if origin.subject_alt_names and not origin.insecure_skip_verify:
            cert = transport.get_extra_info("peercert")
            if not san_matches(cert, origin.subject_alt_names):
                got = ", ".join(v for _, v in (cert or {}).get("subjectAltName", ())) or "none"
                self._fail(transport, "certificate verify failed: no subject alt name of the server "
                                      f"certificate ({got}) matches subjectAltNames "
                                      f"{', '.join(origin.subject_alt_names)}")
                return
        if self.waiter.done():  # the caller gave up (timeout): do not hand out the stream
            transport.abort()
            return
        inner = self.factory()
        self.inner = inner
        transport.set_protocol(inner)
        inner.connection_made(transport)
        self.waiter.set_result((transport, inner))

    def data_received(self, data: bytes) -> None:  # only after the hand-over (set_protocol)
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)
        elif not self.waiter.done():
            self.waiter.set_exception(OriginationError("connection closed after the TLS handshake"
                                                       + (f" ({exc})" if exc else "")))

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def _originating(origin, base, current, service, key) -> OriginatingConnector:
    cluster = str(key)
    alpn = _alpn_for(service, key.port)
    error = None
    if origin.credential_name:
        error = (f"{_where(origin, 'credentialName')}: Kubernetes Secret {origin.credential_name!r} cannot be "
                 "read by nodeagent; connections fail as Istio's do when the secret is missing")
    elif not origin.insecure_skip_verify and not origin.sni and not origin.subject_alt_names:
        # a wildcard host and neither sni nor subjectAltNames: no name to verify the server
        # against, and a chain check alone would accept any certificate the CA ever issued
        error = (f"{_where(origin, 'sni')}: the destination host {key.host!r} is a wildcard and neither sni nor "
                 "subjectAltNames is set: no server name to verify; connections fail")
    if error is not None:
        if (type(current) is OriginatingConnector and current.inner is base and current.contexts is None
                and current.error == error):
            return current
        return OriginatingConnector(base, origin, None, alpn, cluster, error)
    try:
        contexts = contexts_for(origin, alpn)
    except ConfigFileError as exc:
        message = str(exc)
        settings = origin.settings()
        if _REPORTED.get(settings) != message:
            _REPORTED[settings] = message
            keep = type(current) is OriginatingConnector and current.contexts is not None
            log.warning("%s; %s", message,
                        "the last good TLS settings of this cluster keep serving" if keep
                        else "connections to this cluster fail (503 UF) until it is fixed")
        if type(current) is OriginatingConnector and current.contexts is not None:
            if current.inner is base:
                return current
            return OriginatingConnector(base, current.origin, current.contexts, current.alpn, cluster)
        return OriginatingConnector(base, origin, None, alpn, cluster, message)
    if (type(current) is OriginatingConnector and current.inner is base and current.contexts is contexts
            and current.alpn == alpn):
        return current
    return OriginatingConnector(base, origin, contexts, alpn, cluster)


def bind_connector(listener_connector, current, old_policy, policy, service, pool):
    """The connector a cluster's pool uses under ``policy`` (called by ClusterState.refresh).

    ``listener_connector``: the listener's (its ``for_cluster(policy)``, when it has one,
    binds it to the cluster's TLS mode: the mesh tunnel for ISTIO_MUTUAL); ``current``: what
    the pool uses now. SIMPLE/MUTUAL wrap that in an OriginatingConnector. Idle connections
    opened under other settings are closed."""
    base = current.inner if type(current) is OriginatingConnector else current
    bind = getattr(listener_connector, "for_cluster", None)
    if bind is not None and (old_policy is None or policy.tls_mode != old_policy.tls_mode):
        base = bind(policy)
    origin = policy.origination
    new = base if origin is None else _originating(origin, base, current, service, policy.key)
    if new is not current and old_policy is not None:
        pool.close_all()  # idle connections were opened under the previous TLS settings
    return new
