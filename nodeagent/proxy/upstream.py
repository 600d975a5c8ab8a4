"""Upstream side: one HTTP/1.1 client Protocol per connection, and per-cluster pools.

A connection serves one exchange at a time (no upstream pipelining). Pools are
per cluster (service host, subset, port) with idle connections kept per
endpoint; DestinationRule connectionPool limits are enforced here:
maxConnections (then queue), http1MaxPendingRequests (then 503 UO),
maxRequestsPerConnection, connectTimeout and idleTimeout.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from dataclasses import dataclass

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser

log = logging.getLogger(__name__)

try:
    from uvloop.loop import TCPTransport as _UV_TCP
except ImportError:  # no uvloop: every write goes through the transport
    _UV_TCP = None

# Writes straight to the socket (wire_write): only when this module runs compiled (its
# __file__ is then the extension module, not the .py), on uvloop's plain TCP transports.
# NODEAGENT_DIRECT_WRITES=0 turns it off.
DIRECT_WRITES = (not __file__.endswith(".py") and _UV_TCP is not None
                 and os.environ.get("NODEAGENT_DIRECT_WRITES", "1") != "0")


def direct_fd(transport):
    """The file descriptor wire_write may send on directly for ``transport``, else -1.

    Only uvloop's plain TCP transport qualifies: a TLS transport's socket must never be
    written to directly (the bytes would bypass the encryption), and neither must any
    transport type whose buffering this module does not know."""
    if not DIRECT_WRITES or type(transport) is not _UV_TCP:
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else sock.fileno()


def wire_write(transport, fd, data):
    """transport.write(data), done as one send(2) when that is the same thing.

    uvloop's own write does the same syscall after some bookkeeping, but through
    write(2), whose VFS layer costs more than send(2) on a socket. The send goes straight
    to the socket only when the transport has nothing buffered (so the order of the bytes
    is kept) and is not closing (so its descriptor is still this connection's; uvloop
    closes the descriptor only after the transport is marked closing). Whatever the
    kernel does not take at once (EAGAIN, a short send) and every error is handed to the
    transport, which buffers it, or reports the error through connection_lost exactly as
    if it had made the call itself."""
    if fd >= 0 and type(data) is bytes and not transport.get_write_buffer_size() and not transport.is_closing():
        sent = _send(fd, data)
        if sent == len(data):
            return
        if sent > 0:
            data = data[sent:]
    transport.write(data)


def _send(fd, data):
    """send(2) with MSG_NOSIGNAL (compiled only: DIRECT_WRITES keeps Python from calling it)."""
    return c_send(fd, data, len(data), MSG_NOSIGNAL)  # noqa: F821 (declared in upstream.pxd)

UNLIMITED = 1 << 32

# Headers that describe one hop; never forwarded as they are (lower case).
HOP_HEADERS = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"expect", b"host", b"content-length",
    b"proxy-authorization",
))
# Their lengths: a response header name of another length (content-type, date, ...) is
# forwarded without the bytes.lower() call (~300 instructions) a name of a hop length needs.
_HOP_LENGTHS = frozenset(len(h) for h in HOP_HEADERS)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0: unlimited
    connect_timeout: float = 10.0  # Istio's default
    idle_timeout: float = 3600.0  # Istio's default for upstream HTTP connections


class TransportFailure(ConnectionError):
    """A connect failure of the transport's own layer (TLS origination: handshake, verification):
    its message is Envoy's upstream_transport_failure_reason (the 503 body, the access log)."""


def transport_failure_reason(exc):
    """What ``exc`` says as an upstream transport failure reason, else None."""
    return str(exc) if isinstance(exc, TransportFailure) else None


class _HeadResponseDone(Exception):
    """Raised from on_headers_complete to stop the parser after a HEAD response head."""


class UpstreamConnection:
    """An upstream HTTP/1.1 connection; parser events go to the owning exchange."""

    __slots__ = (
        "pool", "endpoint", "transport", "parser", "exchange", "requests", "idle_since",
        "closed", "raw", "head_only", "status", "headers", "keep_alive", "length", "hop", "fd",
    )

    def __init__(self, pool: "ClusterPool", endpoint: tuple[str, int]) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.transport = None
        self.fd = -1
        self.parser = HttpResponseParser(self)
        self.exchange = None
        self.requests = 0
        self.idle_since = 0.0
        self.closed = False
        self.raw = False
        self.head_only = False
        self.status = 0
        # The response head as it is parsed: ``headers`` holds the forwarded header lines
        # already serialized (name, b": ", value, b"\r\n", ...) after a slot for the status
        # line; ``length`` the Content-Length value; ``hop`` any other hop-by-hop header
        # as (lower-case name, name, value), None when there is none (the common case).
        self.headers = [b""]
        self.length = None
        self.hop = None
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.fd = direct_fd(transport)
        transport.set_write_buffer_limits(262144)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # An idle connection must not talk; drop it rather than misattribute bytes.
            self.close()
            return
        if self.raw:
            exchange.upstream_raw(data)
            return
        try:
            self.parser.feed_data(data)
            if exchange.out:
                exchange.flush()
        except HttpParserUpgrade as exc:
            self.raw = True
            exchange.upstream_upgraded(data[exc.args[0]:])
        except HttpParserError as exc:
            if isinstance(exc.__context__, _HeadResponseDone):
                self.parser = HttpResponseParser(self)
                if self.exchange is exchange:
                    self.exchange = None
                    exchange.upstream_complete(self)
                return
            if isinstance(exc, HttpParserCallbackError):
                log.error("upstream response handling failed", exc_info=exc.__context__ or exc)
            if self.exchange is not None:
                self.exchange = None
                self.keep_alive = False
                self.close()
                exchange.upstream_failed(self, "UPE")

    def eof_received(self):
        return None  # asyncio.Protocol's answer: the transport closes itself

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.connection_closed(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if self.raw:
                exchange.upstream_raw_closed()
            else:
                exchange.upstream_failed(self, "UC")

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_resume_writing()

    # httptools callbacks (no on_status: the reason phrase is regenerated, as Envoy does)
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in _HOP_LENGTHS:  # only then can it be a hop-by-hop header: lower-case it
            lname = name.lower()
            if lname in HOP_HEADERS:
                if lname == b"content-length":
                    self.length = value
                elif self.hop is None:
                    self.hop = [(lname, name, value)]
                else:
                    self.hop.append((lname, name, value))
                return
        self.headers += (name, b": ", value, b"\r\n")  # cheaper than joining each line first

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.status = status
        headers, length, hop = self.headers, self.length, self.hop
        self.headers = [b""]
        self.length = self.hop = None
        if 100 <= status < 200 and status != 101:
            return  # interim responses are consumed here (we strip Expect upstream)
        self.keep_alive = self.parser.should_keep_alive()
        self.exchange.upstream_head(self, status, headers, length, hop)
        if self.head_only and status != 101:
            raise _HeadResponseDone()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_body(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return  # interim response, or 101 (the relay takes over in data_received)
        exchange = self.exchange
        if exchange is not None and not self.raw:
            # keep_alive is the parser's answer at the head (on_headers_complete): everything
            # it depends on (version, Connection, framing) is known by then
            self.exchange = None
            exchange.upstream_complete(self)

    # helpers used by the exchange
    def send(self, exchange, data: bytes, head_only: bool) -> None:
        self.exchange = exchange
        self.head_only = head_only
        self.requests += 1
        wire_write(self.transport, self.fd, data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.exchange = None
            self.transport.close()
            self.pool.connection_closed(self)


class ClusterPool:
    """Connections to one cluster's endpoints, with DestinationRule connectionPool limits."""

    __slots__ = ("key", "limits", "connector", "idle", "open", "pending", "loop", "_counted", "retired", "tcp_open")

    def __init__(self, key, limits: PoolLimits, connector) -> None:
        self.key = key
        self.limits = limits
        self.connector = connector
        self.idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.open = 0  # connections open or being opened (counts against maxConnections)
        self.pending: deque = deque()
        self.loop = asyncio.get_event_loop()
        self._counted: set[int] = set()
        self.retired = False  # the cluster left the config: finish what runs, keep nothing idle
        self.tcp_open = 0  # relayed TCP connections (tcp.maxConnections applies to them too)

    def acquire(self, exchange, endpoint: tuple[str, int]) -> str | None:
        """Give ``exchange`` a connection now or later (exchange.upstream_ready).

        Returns None when the request is served or queued, or "UO" when the
        connection pool and its pending queue are full.
        """
        idle = self.idle.get(endpoint)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                exchange.upstream_ready(conn)
                return None
        if self.open < self.limits.max_connections:
            self._connect(exchange, endpoint)
            return None
        if len(self.pending) < self.limits.max_pending:
            self.pending.append((exchange, endpoint))
            return None
        return "UO"

    def cancel(self, exchange) -> None:
        for i, (waiting, _) in enumerate(self.pending):
            if waiting is exchange:
                del self.pending[i]
                return

    def _connect(self, exchange, endpoint) -> None:
        self.open += 1
        self.loop.create_task(self._open(exchange, endpoint))

    async def _open(self, exchange, endpoint) -> None:
        conn = None
        try:
            _, conn = await self.connector.connect(
                lambda: UpstreamConnection(self, endpoint), endpoint[0], endpoint[1],
                self.limits.connect_timeout,
            )
        except asyncio.CancelledError:
            self.open -= 1
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            self.open -= 1
            log.debug("connect to %s:%d failed: %s", endpoint[0], endpoint[1], exc)
            exchange.upstream_connect_failed(endpoint, transport_failure_reason(exc))
            self._serve_pending()
            return
        self._counted.add(id(conn))
        if conn.closed:
            self.connection_closed(conn)
            exchange.upstream_connect_failed(endpoint)
            return
        exchange.upstream_ready(conn)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """An exchange is done with ``conn``: keep it idle, hand it over, or close it."""
        limit = self.limits.max_requests_per_connection
        if not reusable or conn.closed or self.retired or (limit and conn.requests >= limit):
            conn.close()
            return
        while self.pending:
            exchange, endpoint = self.pending.popleft()
            if exchange.abandoned:
                continue
            if endpoint == conn.endpoint:
                exchange.upstream_ready(conn)
                return
            # The waiter wants another endpoint: trade this connection's slot for a new one.
            conn.close()
            self._connect_counted(exchange, endpoint)
            return
        conn.idle_since = self.loop.time()
        idle = self.idle.get(conn.endpoint)
        if idle is None:
            idle = self.idle[conn.endpoint] = []
        idle.append(conn)

    def _connect_counted(self, exchange, endpoint) -> None:
        if self.open < self.limits.max_connections:
            self._connect(exchange, endpoint)
        else:
            self.pending.appendleft((exchange, endpoint))

    def connection_closed(self, conn: UpstreamConnection) -> None:
        if id(conn) in self._counted:
            self._counted.discard(id(conn))
            self.open -= 1
            idle = self.idle.get(conn.endpoint)
            if idle and conn in idle:
                idle.remove(conn)
            self._serve_pending()

    def _serve_pending(self) -> None:
        while self.pending and self.open < self.limits.max_connections:
            exchange, endpoint = self.pending.popleft()
            if not exchange.abandoned:
                self._connect(exchange, endpoint)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than idleTimeout."""
        deadline = now - self.limits.idle_timeout
        for conns in list(self.idle.values()):
            for conn in [c for c in conns if c.idle_since < deadline]:
                conn.close()

    def close_all(self) -> None:
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn.close()
        self.idle.clear()
