"""The node-to-node mTLS tunnel (port 15008): HBONE-style CONNECT over TLS 1.3.

Source side (``TunnelConnector``, a ``Connector``): for an endpoint that is in
the mesh (``MeshDirectory`` knows its SPIFFE identity: an enrolled workload,
or a WorkloadEntry / ServiceEntry endpoint with a ``serviceAccount``) and
whose cluster TLS mode is ISTIO_MUTUAL (the default for in-mesh services;
DestinationRule ``tls.mode: DISABLE`` sends plaintext; ``SIMPLE``/``MUTUAL``
originate TLS to the application itself, ``nodeagent.proxy.origination``), the connector

1. opens TCP to ``<endpoint ip>:15008`` (marked 0x539, from inside the source
   pod's network namespace when it has one),
2. runs a TLS 1.3 handshake presenting the SOURCE workload's certificate
   (``TunnelTls`` through its per-workload scoped guard),
3. checks that the server is exactly the identity the snapshot places at that
   address (anything else: the connection is refused, never used),
4. sends ``CONNECT <ip>:<port> HTTP/1.1`` and waits for ``200``,
5. hands the byte stream inside the tunnel to the engine's protocol as if it
   were a plain TCP connection (HTTP/1.1 requests, or relayed bytes).

Pools are per (source identity, cluster): every source workload's listener has
its own connector, and the engine pools upstream connections per connector
and cluster, so a tunnel carries only one workload's requests and is reused
with keep-alive. No identity header is ever sent or trusted: the destination
learns the caller from the client certificate alone.

Destination side (``TunnelServer``): one TLS listener per local workload
address. The handshake presents the DESTINATION workload's certificate and
requires a client certificate that chains to the trust bundle; then
``peer_identity`` checks trust domain, validity and revocation. The CONNECT
target must be an address of this workload. Policy and the inner stream are
handled by ``nodeagent.proxy.inbound.InboundPlane``.

HTTP/2 (HBONE proper, for ztunnel interop): ALPN offers only ``http/1.1``
today, and one TLS connection carries one CONNECT stream. Offering ``h2`` in
front of it and multiplexing CONNECT streams is the next step; the CONNECT
request and reply used here are the same messages HBONE sends as HTTP/2
HEADERS frames, so the policy side does not change.

Both ends run TLS with ``TlsStream`` (OpenSSL on memory BIOs over the loop's
plain TCP transport), which feeds the engine's protocols directly. Limit: it
does not half-close (as asyncio's and uvloop's TLS transports: close_notify
ends the stream), so an opaque TCP stream whose client shuts down its sending
side closes the whole tunnel stream.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import socket
import ssl
import threading
from typing import Callable

from cryptography import x509

from nodeagent.identity.errors import IdentityError, PeerRejected
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import TunnelTls
from nodeagent.proxy.upstream import direct_fd, wire_write
from nodeagent.telemetry import Telemetry, _NB_D, _NB_S, _complete, source_labels, status_labels

log = logging.getLogger(__name__)

TUNNEL_PORT = 15008
TLS_MODE_LABEL = "security.istio.io/tlsMode"  # "disabled" on an endpoint: never tunnelled
HEAD_LIMIT = 8192  # a CONNECT request or reply head larger than this is refused
HEAD_TIMEOUT = 10.0  # the CONNECT request must arrive this soon after the handshake
HANDSHAKE_TIMEOUT = 10.0

_CONNECT_LINE = re.compile(rb"^CONNECT (\S+) HTTP/1\.1$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: (.*))?$")


READ_BUFFER = 65536  # bytes one read of a tunnel may take in (ciphertext) or hand on (plaintext)
_local = threading.local()


def read_buffer() -> memoryview:
    """This thread's read buffer for tunnel streams (one per event-loop thread: what is read
    into it is copied out before anything else can read into it)."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER))
    return view


def _plain_buffer() -> bytearray:
    """This thread's buffer that decrypted bytes land in before they are copied out
    (``_copy_out``)."""
    buf = getattr(_local, "plain", None)
    if buf is None:
        buf = _local.plain = bytearray(READ_BUFFER)
    return buf


# Compiled (nodeagent/accel.py), this module's __file__ is the extension module, not the .py.
COMPILED = not __file__.endswith(".py")


def _copy_out(buf, n):
    """``bytes(buf[:n])`` for the plaintext buffer: compiled, one PyBytes_FromStringAndSize
    from the bytearray's storage, where a memoryview slice and its ``tobytes()`` cost two
    objects and a method call per record (≈ 1 500 instructions per request and agent)."""
    if COMPILED:
        return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), n)  # noqa: F821 (tunnel.pxd)
    return memoryview(buf)[:n].tobytes()


class _TlsCore:
    """TLS 1.3 over a plain TCP transport, with OpenSSL on memory BIOs: the tunnel's transport.

    It is the TCP transport's (buffered) protocol and the transport of the protocol it
    serves (``app``): the CONNECT stage, then the engine's protocol (``set_protocol``).

    Why not the event loop's TLS transport: per record, uvloop's goes through its
    SSL protocol state machine, calls ``ssl.SSLObject``'s Python wrappers (``pending``,
    ``read``, ``write``) and needed a forwarding protocol to avoid a 256 KiB allocation per
    read; asyncio's is pure Python. Here a read is one ``MemoryBIO.write`` of what TCP
    delivered, ``SSL_read`` into a reused per-thread buffer (stopping when both BIO and
    OpenSSL are empty, so the common case raises no SSLWantReadError) and one copy handed to
    ``app.data_received``; a write is one ``SSL_write`` and one TCP write of the record(s).
    Nothing is buffered in plaintext: flow control is the TCP transport's (its
    ``pause_writing``/``resume_writing`` reach ``app``; ``pause_reading`` stops delivery,
    even of records already received).

    Semantics kept from asyncio/uvloop: a TCP EOF without close_notify closes the stream
    (``app.connection_lost(None)``, no ``eof_received``: it is not a clean shutdown);
    close_notify calls ``app.eof_received()`` then closes; ``close()`` sends close_notify
    after whatever is queued; no half-close (``can_write_eof()`` is False). The handshake
    must finish within ``handshake_timeout`` s; ``on_handshake(exc)`` is told how it ended
    (``exc`` None: ``app.connection_made(self)`` follows at once).
    """

    __slots__ = ("ctx", "app", "feed", "tcp", "incoming", "outgoing", "sslobj", "raw",
                 "handshaking", "timer", "handshake_timeout", "on_handshake", "closing", "paused",
                 "lost", "drain_handle", "started", "ready", "cipher", "plain", "bio_in", "ssl_read", "ssl_write", "bio_out",
                 "tcp_write", "fd")

    def __init__(self, ctx: ssl.SSLContext, app, *, server_side: bool, handshake_timeout: float,
                 on_handshake: Callable | None = None, server_hostname: str | None = None) -> None:
        self.ctx = ctx
        self.app = app
        self.feed = app.data_received
        self.tcp = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)
        self.raw = self.sslobj._sslobj  # the C object: SSLObject's methods are Python wrappers
        # Bound once, called per record: OpenSSL's read/write, the BIOs', the TCP transport's write.
        self.bio_in = self.incoming.write
        self.bio_out = self.outgoing.read
        self.ssl_read = self.raw.read
        self.ssl_write = self.raw.write
        self.tcp_write = None
        self.fd = -1  # direct_fd(tcp): where wire_write may send the records directly
        self.cipher = read_buffer()  # this thread's buffers (streams are created on their loop's thread)
        self.plain = _plain_buffer()
        self.ready = False  # handshake done, not closing: app data may flow
        self.started = False  # app.connection_made was called (so connection_lost will be)
        self.handshaking = True
        self.timer = None
        self.handshake_timeout = handshake_timeout
        self.on_handshake = on_handshake
        self.closing = False
        self.paused = False
        self.lost = False
        self.drain_handle = None

    # --- protocol of the TCP transport ----------------------------------
    def connection_made(self, tcp) -> None:
        self.tcp = tcp
        self.tcp_write = tcp.write
        self.fd = direct_fd(tcp)
        self.timer = asyncio.get_running_loop().call_later(self.handshake_timeout, self._handshake_timeout)
        self._handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.cipher

    def buffer_updated(self, nbytes: int) -> None:
        self.bio_in(self.cipher[:nbytes])
        if not self.ready or self.paused:
            if self.handshaking:
                self._handshake()
            return
        # One record in one TCP read, the common case, inline; anything else in _deliver.
        plain = self.plain
        try:
            n = self.ssl_read(READ_BUFFER, plain)
        except ssl.SSLWantReadError:
            return  # a partial record: the rest comes with the next TCP read
        except ssl.SSLZeroReturnError:
            self._close_notify()
            return
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        if not n:  # close_notify (OpenSSL's read answers 0 bytes)
            self._close_notify()
            return
        self.feed(_copy_out(plain, n))
        if self.incoming.pending and self.ready and not self.paused:
            self._deliver()

    def eof_received(self):
        if self.handshaking:
            self._handshake_failed(ConnectionResetError("connection closed during the TLS handshake"))
        return False  # not close_notify: the TCP transport closes, connection_lost follows

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.closing = True
        self.ready = False
        self._cancel_timers()
        if self.handshaking:
            self.handshaking = False
            if self.on_handshake is not None:
                self.on_handshake(exc or ConnectionResetError("connection closed during the TLS handshake"))
        if self.started:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.handshaking:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if not self.handshaking:
            self.app.resume_writing()

    # --- handshake ------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._flush()  # the alert, if OpenSSL wrote one
            self._handshake_failed(exc)
            return
        self._flush()
        self.handshaking = False
        self.ready = not self.closing
        self._cancel_timers()
        if self.on_handshake is not None:
            self.on_handshake(None)
        self.started = True
        self.app.connection_made(self)
        if self.incoming.pending and not self.closing and not self.paused:
            self._deliver()  # what arrived with the peer's last handshake flight

    def _handshake_failed(self, exc: BaseException) -> None:
        if not self.handshaking:
            return
        self.handshaking = False
        self._cancel_timers()
        self.closing = True
        self.ready = False
        if self.on_handshake is not None:
            self.on_handshake(exc)
        self.tcp.abort()

    def _handshake_timeout(self) -> None:
        self.timer = None
        self._handshake_failed(TimeoutError(f"TLS handshake not done within {self.handshake_timeout:g} s"))

    def _cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.drain_handle is not None:
            self.drain_handle.cancel()
            self.drain_handle = None

    # --- data -----------------------------------------------------------
    def _deliver(self) -> None:
        """Decrypt what has arrived and hand it to ``app``, until nothing is left, the stream
        is paused or closing."""
        raw = self.raw
        incoming = self.incoming
        plain = self.plain
        while True:
            try:
                n = raw.read(READ_BUFFER, plain)
            except ssl.SSLWantReadError:
                break  # a partial record: the rest comes with the next TCP read
            except ssl.SSLZeroReturnError:
                self._close_notify()
                return
            except ssl.SSLError as exc:
                self._fatal(exc)
                return
            if not n:  # close_notify (OpenSSL's read answers 0 bytes)
                self._close_notify()
                return
            self.feed(_copy_out(plain, n))
            if self.closing or self.paused:
                break
            if not incoming.pending and not raw.pending():
                break
        if self.outgoing.pending and not self.lost:
            self._flush()  # OpenSSL may answer a record (a key update)

    def _close_notify(self) -> None:
        handler = getattr(self.app, "eof_received", None)
        keep = handler() if handler is not None else False
        if keep:
            log.debug("tunnel: close_notify received; half-open TLS streams are not supported, closing")
        self.close()

    def _fatal(self, exc: BaseException) -> None:
        log.info("tunnel: TLS error, closing the stream: %s", exc)
        self.closing = True
        self.ready = False
        self.tcp.abort()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.tcp.write(self.outgoing.read())

    # --- transport of ``app`` --------------------------------------------
    def write(self, data) -> None:
        if not self.ready or not data:
            return
        try:
            n = self.ssl_write(data)
            if n != len(data):  # a memory BIO takes everything; kept exact all the same
                view = memoryview(data).cast("B")
                while n < len(view):
                    n += self.ssl_write(view[n:])
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        wire_write(self.tcp, self.fd, self.bio_out())

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS tunnel streams cannot half-close")

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.ready = False
        self._cancel_timers()
        if not self.handshaking and not self.lost:
            try:
                self.raw.shutdown()  # writes close_notify into the outgoing BIO
            except ssl.SSLError:
                pass
            self._flush()
        self.tcp.close()  # after what is queued

    def abort(self) -> None:
        self.closing = True
        self.ready = False
        self._cancel_timers()
        if self.tcp is not None:
            self.tcp.abort()

    def is_closing(self) -> bool:
        return self.closing or (self.tcp is not None and self.tcp.is_closing())

    def pause_reading(self) -> None:
        if not self.paused:
            self.paused = True
            if self.drain_handle is not None:
                self.drain_handle.cancel()
                self.drain_handle = None
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            self.tcp.resume_reading()
            if (self.incoming.pending or self.raw.pending()) and self.drain_handle is None and not self.closing:
                # records received while paused: delivered from the loop, as a read would be
                self.drain_handle = asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self.drain_handle = None
        if not self.paused and not self.closing:
            self._deliver()

    def is_reading(self) -> bool:
        return not self.paused and self.tcp is not None and self.tcp.is_reading()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size()

    def get_write_buffer_limits(self):
        return self.tcp.get_write_buffer_limits()

    def set_protocol(self, protocol) -> None:
        self.app = protocol
        self.feed = protocol.data_received

    def get_protocol(self):
        return self.app

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.ctx
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        return self.tcp.get_extra_info(name, default) if self.tcp is not None else default


class TlsStream(_TlsCore, asyncio.BufferedProtocol):
    """``_TlsCore`` as the buffered protocol asyncio's own event loops recognise by class
    (uvloop by its get_buffer method); the core is an extension type when compiled
    (nodeagent/accel.py), which cannot inherit asyncio's classes itself."""

    __slots__ = ()


class TunnelError(ConnectionError):
    """A tunnel could not be set up (the engine treats it as a connect failure)."""


def format_target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_target(target: str) -> tuple[str, int] | None:
    """``ip:port`` or ``[v6]:port`` -> (ip, port); None when malformed."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return None
    number = int(port)
    if not 0 < number < 65536:
        return None
    return host, number


# ---------------------------------------------------------------------------
# who is in the mesh


class MeshDirectory:
    """The SPIFFE identity living at an address, if that address is in the mesh.

    Sources: ``local(ip)`` (the daemon's enrolled workloads, optional), then
    the snapshot's WorkloadEntry objects and ServiceEntry inline endpoints that
    name a ``serviceAccount`` (an entry without one is not a mesh workload: it
    is reached in plaintext; so is one labelled ``security.istio.io/tlsMode:
    disabled``, Istio's label for endpoints without mTLS). Recomputed once per
    snapshot version.
    """

    def __init__(self, snapshots: Callable[[], object], trust_domain: str = "cluster.local",
                 local: Callable[[str], SpiffeId | None] | None = None) -> None:
        self.snapshots = snapshots
        self.trust_domain = trust_domain
        self.local = local
        self._version = None
        self._by_address: dict[str, SpiffeId] = {}

    def identity_at(self, address: str) -> SpiffeId | None:
        if self.local is not None:
            found = self.local(address)
            if found is not None:
                return found
        snapshot = self.snapshots()
        if snapshot.version != self._version or self._version is None:
            self._by_address = self._index(snapshot)
            self._version = snapshot.version
        return self._by_address.get(address)

    def _index(self, snapshot) -> dict[str, SpiffeId]:
        out: dict[str, SpiffeId] = {}
        for res in snapshot.resources:
            if res.kind == "WorkloadEntry":
                entries = ((res.namespace, res.spec),)
            elif res.kind == "ServiceEntry":
                entries = tuple((res.namespace, ep) for ep in res.spec.endpoints)
            else:
                continue
            for namespace, we in entries:
                if not we.address or not we.service_account:
                    continue
                if we.labels.get(TLS_MODE_LABEL, "istio") != "istio":
                    continue  # Istio's opt-out: the endpoint cannot terminate mTLS
                try:
                    identity = SpiffeId.workload(namespace, we.service_account, self.trust_domain)
                except ValueError:
                    continue  # validation reports bad names; such an entry is not a mesh workload
                out.setdefault(we.address, identity)
        return out


# ---------------------------------------------------------------------------
# metrics: connection_security_policy per record


class MeshTelemetry(Telemetry):
    """``Telemetry`` with Istio's ``connection_security_policy`` decided per record.

    Drop-in for ``nodeagent.telemetry.Telemetry`` (same ``record_http``,
    ``tcp_entry`` and ``export``). The label comes from the listener context
    when it declares one (``InboundContext.security_policy``: ``mutual_tls``
    on 15008, ``none`` on plaintext 15006); on the source side it is
    ``mutual_tls`` when the destination principal is known, which only the
    tunnel's verified handshake provides (as ztunnel reports it), else
    ``unknown``. The label is one more element of the accumulator key; it
    depends only on the context and the destination labels, so the engine's
    per-request path (``Telemetry.record_http``: the series found by the
    identities of both) is used as is and the label is decided once per series.
    """

    __slots__ = ()
    POLICIES = ("unknown", "mutual_tls", "none")

    def _src(self, ctx) -> tuple:
        """(source labels, the context's own security policy or None), cached per context."""
        key = id(ctx)
        hit = self._src_cache.get(key)
        if hit is None or hit[0] is not ctx:
            policy = getattr(ctx, "security_policy", None)
            hit = (ctx, (source_labels(ctx), policy if policy in self.POLICIES or policy is None else "unknown"))
            if len(self._src_cache) >= 4096:
                self._src_cache.clear()
            self._src_cache[key] = hit
        return hit[1]

    def _policy(self, ctx, dest: tuple) -> tuple[tuple, str]:
        src, policy = self._src(ctx)
        if policy is None:
            policy = "mutual_tls" if len(dest) > 2 and dest[2] != "unknown" else "unknown"
        return src, policy

    def _http_entry(self, ctx, dest: tuple, status: int, flags: str) -> list:
        src, policy = self._policy(ctx, dest)
        key = (src, dest, status, flags, policy)
        entry = self.http.get(key)
        if entry is None:
            entry = [0, 0.0, 0, 0, [0] * _NB_D, [0] * _NB_S, [0] * _NB_S]
            self.http[key] = entry
        series = self._series
        if len(series) >= 4096:
            series.clear()
        series[(id(ctx), id(dest), status, flags)] = (entry, ctx, dest)  # keeps ctx and dest alive
        return entry

    def tcp_entry(self, ctx, dest: tuple, flags: str = "-") -> list:
        src, policy = self._policy(ctx, dest)
        key = (src, dest, flags, policy)
        entry = self.tcp.get(key)
        if entry is None:
            entry = [0, 0, 0, 0]
            self.tcp[key] = entry
        return entry

    def export(self) -> dict:
        return {
            "http": {k[0] + k[1] + status_labels(k[2]) + (k[3], k[4]): _complete(v) for k, v in list(self.http.items())},
            "tcp": {k[0] + k[1] + (k[2], k[3]): list(v) for k, v in list(self.tcp.items())},
        }


# ---------------------------------------------------------------------------
# source side


class TunnelConnector:
    """A ``Connector`` that reaches mesh endpoints through the mTLS tunnel.

    ``plain``: the connector used for destinations outside the mesh or with
    ``tls.mode: DISABLE`` (PlainConnector / the daemon's NetnsConnector).
    ``mark``/``netns``: how the tunnel's own TCP socket is opened (mark 0x539
    and the source pod's namespace in netns mode). ``source_address``: bind
    the tunnel socket to this address (loopback tests; in a pod the kernel
    picks the pod's address). ``tunnel_port``: the destination port (15008;
    an int or ``f(ip) -> port`` for loopback tests).

    The engine calls ``for_cluster(policy)`` (when it supports the seam) so a
    cluster's ``tls_mode`` is honoured, and ``destination_principal(endpoint)``
    for the ``destination_principal`` metric label.
    """

    __slots__ = ("tls", "source", "directory", "plain", "mark", "netns", "source_address",
                 "tunnel_port", "tls_mode", "handshake_timeout")

    def __init__(self, tls: TunnelTls, source: SpiffeId, directory: MeshDirectory, plain, *,
                 mark: int | None = None, netns: str | None = None, source_address: str | None = None,
                 tunnel_port: int | Callable[[str], int] = TUNNEL_PORT, tls_mode: str | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        tls.scoped(source)  # fails now (ForeignIdentityError) if this node does not serve ``source``
        self.tls = tls
        self.source = source
        self.directory = directory
        self.plain = plain
        self.mark = mark
        self.netns = netns
        self.source_address = source_address
        self.tunnel_port = tunnel_port
        self.tls_mode = tls_mode
        self.handshake_timeout = handshake_timeout

    def for_cluster(self, policy) -> "TunnelConnector":
        """The same connector, bound to one cluster's TLS mode (ClusterPolicy.tls_mode)."""
        return TunnelConnector(self.tls, self.source, self.directory, self.plain, mark=self.mark,
                               netns=self.netns, source_address=self.source_address,
                               tunnel_port=self.tunnel_port, tls_mode=policy.tls_mode,
                               handshake_timeout=self.handshake_timeout)

    def tunnel_identity(self, address: str) -> SpiffeId | None:
        """The identity the tunnel must find at ``address``; None = plaintext."""
        mode = self.tls_mode
        if mode is not None and mode != "ISTIO_MUTUAL":
            # DISABLE: plaintext; SIMPLE/MUTUAL: TLS originated to the application itself
            # (nodeagent.proxy.origination wraps this connector), not the mesh tunnel.
            return None
        return self.directory.identity_at(address)

    def destination_principal(self, endpoint) -> str | None:
        identity = self.tunnel_identity(endpoint.address)
        return identity.principal if identity is not None else None

    def port_for(self, address: str) -> int:
        port = self.tunnel_port
        return port(address) if callable(port) else port

    async def connect(self, protocol_factory, address: str, port: int, timeout: float):
        expected = self.tunnel_identity(address)
        if expected is None:
            return await self.plain.connect(protocol_factory, address, port, timeout)
        return await asyncio.wait_for(self._tunnel(protocol_factory, address, port, expected, timeout), timeout)

    def _socket(self, family) -> socket.socket:
        if self.netns is not None:
            from redirect import marked_socket
            from redirect.plan import PROXY_MARK
            return marked_socket(family, netns=self.netns, mark=self.mark if self.mark is not None else PROXY_MARK)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            if self.source_address is not None:
                sock.bind((self.source_address, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _tunnel(self, protocol_factory, address, port, expected: SpiffeId, timeout: float):
        loop = asyncio.get_running_loop()
        try:
            ctx = self.tls.client_context(self.source)
        except IdentityError as exc:
            raise TunnelError(f"tunnel from {self.source}: {exc}") from None
        sock = self._socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (address, self.port_for(address)))
        except BaseException:
            sock.close()
            raise
        waiter = loop.create_future()
        client = _TunnelClient(self, waiter, protocol_factory, expected, address, port)

        def handshake_done(exc) -> None:
            if exc is not None and not waiter.done():
                waiter.set_exception(TunnelError(f"tunnel to {address}: TLS handshake failed: {exc}"))

        stream = TlsStream(ctx, client, server_side=False, handshake_timeout=min(timeout, self.handshake_timeout),
                           on_handshake=handshake_done)
        try:
            await loop.create_connection(lambda: stream, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            return await waiter
        except BaseException:
            stream.abort()
            raise


class _TunnelClient(asyncio.Protocol):
    """Client end of one tunnel: verify the server, CONNECT, then forward to the inner protocol."""

    __slots__ = ("connector", "waiter", "factory", "expected", "address", "port", "transport",
                 "buffer", "inner")

    def __init__(self, connector: TunnelConnector, waiter, factory, expected: SpiffeId, address: str,
                 port: int) -> None:
        self.connector = connector
        self.waiter = waiter
        self.factory = factory
        self.expected = expected
        self.address = address
        self.port = port
        self.transport = None
        self.buffer = b""
        self.inner = None

    def _fail(self, message: str) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(TunnelError(message))
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport) -> None:
        self.transport = transport
        try:
            self.connector.tls.peer_identity(transport.get_extra_info("ssl_object"), expected=self.expected)
        except PeerRejected as exc:
            self._fail(f"tunnel to {self.address}: {exc}")
            return
        target = format_target(self.address, self.port).encode("ascii")
        transport.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.data_received(data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > HEAD_LIMIT:
                self._fail(f"tunnel to {self.address}: CONNECT reply head too large")
            return
        head, rest = self.buffer[:end], self.buffer[end + 4:]
        self.buffer = b""
        match = _STATUS_LINE.match(head.split(b"\r\n", 1)[0])
        if match is None or match.group(1) != b"200":
            line = head.split(b"\r\n", 1)[0].decode("latin-1")[:200]
            self._fail(f"tunnel to {self.address}: CONNECT {self.address}:{self.port} refused ({line})")
            return
        if self.waiter.done():  # the caller gave up (timeout): do not hand out the stream
            self.transport.abort()
            return
        inner = self.factory()
        self.inner = inner
        # The TLS stream now feeds the engine's protocol directly.
        self.transport.set_protocol(inner)
        inner.connection_made(self.transport)
        self.waiter.set_result((self.transport, inner))
        if rest:
            inner.data_received(rest)

    def eof_received(self):
        if self.inner is not None and hasattr(self.inner, "eof_received"):
            return self.inner.eof_received()
        self._fail(f"tunnel to {self.address}: closed before the CONNECT reply")
        return False

    def connection_lost(self, exc) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)
        elif not self.waiter.done():
            self.waiter.set_exception(TunnelError(
                f"tunnel to {self.address}: connection closed before the CONNECT reply"
                + (f" ({exc})" if exc else "")))

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


# ---------------------------------------------------------------------------
# destination side


class TunnelServer:
    """The 15008 listener of one local workload.

    ``await server.start(sock=...)`` (a socket the daemon opened inside the
    pod's namespace) or ``start(host=..., port=...)`` (loopback). Accepted
    streams are admitted and served by ``plane`` (an ``InboundPlane``).
    ``stats`` counts accepted/refused tunnels; ``recent`` keeps the last
    accepted peers (principal, certificate serial) for the admin API.

    One per listening socket, two per pod: slots, counters as ints and the
    ``recent`` deque made at the first accepted tunnel (an empty deque of 64
    is ~0.7 KiB), so a pod without mesh traffic costs little here.
    """

    __slots__ = ("plane", "workload", "tls", "handshake_timeout", "_ctx", "server", "accepted", "refused_count",
                 "last_refusal", "_recent")

    def __init__(self, plane, workload, tls: TunnelTls, *, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.plane = plane
        self.workload = workload
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        plane.serve_workload(workload)
        self._ctx: ssl.SSLContext | None = None
        self.server: asyncio.AbstractServer | None = None
        self.accepted = 0
        self.refused_count = 0
        self.last_refusal = ""
        self._recent: collections.deque | None = None

    @property
    def stats(self) -> dict[str, int]:
        return {"accepted": self.accepted, "refused": self.refused_count}

    @property
    def recent(self) -> collections.deque | tuple:
        """The last 64 accepted peers, oldest first: (principal, certificate serial)."""
        return self._recent if self._recent is not None else ()

    def admitted(self, principal: str, serial: int) -> None:
        self.accepted += 1
        if self._recent is None:
            self._recent = collections.deque(maxlen=64)
        self._recent.append((principal, serial))

    @property
    def address(self) -> tuple[str, int] | None:
        if self.server is None or not self.server.sockets:
            return None
        return self.server.sockets[0].getsockname()[:2]

    async def start(self, sock: socket.socket | None = None, host: str | None = None,
                    port: int = TUNNEL_PORT) -> "TunnelServer":
        """Listen. The TLS context is made at the first connection (_accept), not here: an
        identity's server context holds its key, chain and trust store in OpenSSL (~28 KiB,
        docs/operations.md "Memory"), which a pod that never receives mesh traffic does not
        need. An identity this node does not serve is refused here all the same."""
        loop = asyncio.get_running_loop()
        self.tls.scoped(self.workload.identity)  # ForeignIdentityError: not served by this node
        if sock is None:
            if host is None:
                raise ValueError("TunnelServer.start needs a listening socket or a host address")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(1024)
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot listen for the tunnel of {self.workload.ref} on "
                                         f"{format_target(host, port)}: {exc.strerror}") from None
        sock.setblocking(False)
        self.server = await loop.create_server(self._accept, sock=sock, backlog=1024)
        return self

    def _accept(self) -> TlsStream:
        ctx = self._ctx
        identity = self.workload.identity
        if ctx is None or ctx is not self.tls.cached_server_context(identity):
            # The first connection, no certificate until now, or the identity's context was
            # replaced (a renewed certificate: the reloading context's SNI callback made the new
            # one at a handshake): take TunnelTls's reloading context again, the current one, so
            # the listener does not keep the first one (key, chain, trust store) for its life.
            try:
                ctx = self.tls.server_context(identity)
            except IdentityError as exc:  # no certificate yet (or expired), or no longer served
                ctx = None
                log.warning("tunnel %s: refusing a handshake: %s", self.workload.ref, exc)
            self._ctx = ctx
            if ctx is None:
                ctx = _refusing_context()
        return TlsStream(ctx, _TunnelServerProtocol(self), server_side=True,
                         handshake_timeout=self.handshake_timeout, on_handshake=_log_handshake_failure)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def refused(self, remote, reason: str) -> None:
        self.refused_count += 1
        self.last_refusal = reason
        log.info("tunnel %s <- %s refused: %s", self.workload.ref, format_target(*remote[:2]), reason)


@functools.cache
def _refusing_context() -> ssl.SSLContext:
    """One server context, for the process, that fails every handshake at the ClientHello: a
    listener whose workload has no certificate yet answers its connections with it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.sni_callback = lambda ssl_object, server_name, _ctx: ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
    return ctx


def _log_handshake_failure(exc) -> None:
    if exc is not None:  # as asyncio's TLS transports do: a client that failed the handshake is not news
        log.debug("tunnel: TLS handshake failed: %s", exc)


class _TunnelServerProtocol(asyncio.Protocol):
    __slots__ = ("server", "transport", "peer", "serial", "remote", "buffer", "inner", "timer", "done")

    def __init__(self, server: TunnelServer) -> None:
        self.server = server
        self.transport = None
        self.peer: SpiffeId | None = None
        self.remote = ("", 0)
        self.buffer = b""
        self.inner = None
        self.timer = None
        self.done = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.remote = tuple((transport.get_extra_info("peername") or ("", 0))[:2])
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            self.peer = self.server.tls.peer_identity(ssl_object)
        except PeerRejected as exc:
            self.server.refused(self.remote, str(exc))
            self.done = True
            transport.abort()
            return
        self.serial = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True)).serial_number
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._head_timeout)

    def _head_timeout(self) -> None:
        self.timer = None
        if self.inner is None and not self.done:
            self._reply_and_close(408, "no CONNECT request within %.0f s" % HEAD_TIMEOUT)

    def _reply_and_close(self, status: int, reason: str) -> None:
        self.done = True
        self.server.refused(self.remote, f"{self.peer}: {reason}")
        text = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed", 408: b"Request Timeout",
                431: b"Request Header Fields Too Large"}.get(status, b"Error")
        self.transport.write(b"HTTP/1.1 %d %b\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (status, text))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.data_received(data)
            return
        if self.done:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > HEAD_LIMIT:
                self._reply_and_close(431, "CONNECT request head too large")
            return
        head, rest = self.buffer[:end], self.buffer[end + 4:]
        self.buffer = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        line = head.split(b"\r\n", 1)[0]
        match = _CONNECT_LINE.match(line)
        if match is None:
            if line.split(b" ", 1)[0] != b"CONNECT":
                self._reply_and_close(405, "only CONNECT is served on the tunnel port")
            else:
                self._reply_and_close(400, "malformed CONNECT request line")
            return
        target = parse_target(match.group(1).decode("latin-1"))
        if target is None:
            self._reply_and_close(400, "CONNECT target is not ip:port")
            return
        workload = self.server.workload
        allowed = workload.addresses or (self.transport.get_extra_info("sockname") or ("",))[:1]
        if target[0] not in allowed:
            self._reply_and_close(403, f"CONNECT target {format_target(*target)} is not an address of {workload.ref}")
            return
        plane = self.server.plane
        admission = plane.admit(workload, self.peer.principal, self.remote, target, mtls=True)
        if not admission.allowed:
            self._reply_and_close(403, admission.reason)
            return
        self.done = True
        self.server.admitted(self.peer.principal, self.serial)
        self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        inner = self.inner = plane.attach(admission, self.transport)
        # From now on the TLS stream feeds the stream's protocol (this object would only
        # forward every event).
        self.transport.set_protocol(inner)
        if rest:
            inner.data_received(rest)

    def eof_received(self):
        if self.inner is not None and hasattr(self.inner, "eof_received"):
            return self.inner.eof_received()
        return False

    def connection_lost(self, exc) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


__all__ = ["TUNNEL_PORT", "TlsStream", "read_buffer", "MeshDirectory", "MeshTelemetry", "TunnelConnector", "TunnelError", "TunnelServer",
           "format_target", "parse_target"]
