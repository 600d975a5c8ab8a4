"""HTTP/2 and gRPC: downstream h2c (prior knowledge), upstream HTTP/2 or HTTP/1.1.

``HttpDownstream`` hands a connection over (``take_over``) when httptools stops
on the HTTP/2 connection preface (``PRI * HTTP/2.0``). From then on
``H2Downstream`` owns the transport: the python-hyper ``h2`` state machine
frames and deframes, and every stream is an ``H2Stream`` routed by the same
runtime as an HTTP/1.1 ``Exchange`` (``ProxyRuntime.plan``: VirtualService
matches, weights, rewrites, header ops, faults, timeouts, retries; the same
``ClusterState`` objects: LB, outlier detection, connection pool limits).

Upstream protocol (Envoy's, from the service port as Istio declares it):
HTTP/2 when the port is ``grpc*``/``http2*`` or protocol GRPC/HTTP2/GRPC-WEB,
multiplexed on pooled connections (``H2Pool``: SETTINGS_MAX_CONCURRENT_STREAMS,
maxConnections, http1MaxPendingRequests, http2MaxRequests,
maxRequestsPerConnection, idleTimeout); HTTP/1.1 otherwise, through the
cluster's ordinary pool (``UpstreamConnection``). A gRPC request whose
destination speaks only HTTP/1.1 is answered UNAVAILABLE.

Flow control is end to end: a DATA frame is acknowledged (WINDOW_UPDATE) to
its sender only once the next hop took it, so what the proxy holds is bounded
by the windows it advertises (256 KiB per stream, 1 MiB per connection).

Local replies to gRPC requests (``content-type: application/grpc*``) are
trailers-only responses: ``:status 200`` with ``grpc-status``/``grpc-message``,
the HTTP status mapped to a gRPC code as Envoy does (503 -> UNAVAILABLE,
404 -> UNIMPLEMENTED, 403 -> PERMISSION_DENIED, ...).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from urllib.parse import quote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, InformationalResponseReceived, RemoteSettingsChanged,
    RequestReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived, WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from policy import retry as retry_mod

from nodeagent.proxy.context import RequestInfo
from nodeagent.proxy.http import (
    Exchange, LocalReply, apply_header_ops, connect_failure_body, header_map as _header_map, note_forwarded_id,
    path_str as _path_str, pick_endpoint, request_id_str as _request_id_str, retire_endpoint, take_retry_slot,
)
from nodeagent.proxy.requestid import new_request_id
from nodeagent.proxy.response_hook import wants_cors_headers
from nodeagent.proxy.upstream import UNLIMITED, transport_failure_reason

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 256 * 1024  # what a peer may send on one stream before the proxy forwards it
CONNECTION_WINDOW = 1024 * 1024  # ... and on one connection
MAX_CONCURRENT_STREAMS = 100  # advertised to clients (Envoy's default is unlimited; gRPC's is 100)
REPLAY_LIMIT = 64 * 1024  # a request body up to this size is kept for retries (as HTTP/1.1)
WRITE_HIGH_WATER = 256 * 1024

# gRPC status codes (grpc/doc/statuscodes.md) by the names Istio's grpcStatus uses.
GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
# Envoy's Grpc::Utility::grpcToHttpStatus: what outlier detection records for a gRPC status.
_GRPC_TO_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
                 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}

# Request headers that describe one HTTP/1.1 hop or are carried by pseudo-headers.
_H1_ONLY = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host",
    b"te", b"trailer", b"expect", b"proxy-authorization",
))
_RESPONSE_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer",
))


def http_to_grpc(status: int) -> int:
    """Envoy's Grpc::Utility::httpToGrpcStatus: the gRPC code of an HTTP status."""
    if status == 400:
        return 13  # INTERNAL
    if status == 401:
        return 16  # UNAUTHENTICATED
    if status == 403:
        return 7  # PERMISSION_DENIED
    if status == 404:
        return 12  # UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return 14  # UNAVAILABLE
    return 2  # UNKNOWN


_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(value) -> float | None:
    """Seconds of a ``grpc-timeout`` header (1 to 8 digits and a unit: H M S m u n); None
    when absent or malformed (then it is ignored, as Envoy does)."""
    if not value or len(value) > 9:
        return None
    digits, unit = value[:-1], _GRPC_TIMEOUT_UNITS.get(value[-1])
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def is_h2_port(port) -> bool:
    """Istio's protocol selection: HTTP/2 to the endpoint (Envoy's http2_protocol_options)."""
    if port is None:
        return False
    proto = (port.protocol or "").upper()
    name = (port.name or "").lower()
    return proto in ("HTTP2", "GRPC", "GRPC-WEB") or name.startswith(("http2", "grpc"))


def _cluster_speaks_h2(cluster) -> bool:
    """Whether ``cluster`` (a ClusterState) is reached over HTTP/2, cached per config version."""
    cache = _PROTO_CACHE
    key = id(cluster)
    version = getattr(cluster, "version", None)
    hit = cache.get(key)
    if hit is not None and hit[0] is cluster and hit[1] == version:
        return hit[2]
    service = getattr(cluster, "service", None)
    ck = getattr(cluster, "key", None)
    answer = False
    if service is not None and ck is not None:
        answer = is_h2_port(service.port(ck.port))
    else:
        answer = bool(getattr(cluster, "http2", False))
    if len(cache) > 4096:
        cache.clear()
    cache[key] = (cluster, version, answer)
    return answer


_PROTO_CACHE: dict = {}
_GRPC_DEST: dict = {}

# Frames are written once per connection per batch of events: a connection with frames to
# send is listed in _DIRTY and written by flush_pending() at the end of the protocol callback
# that produced them (_BATCH[0]: callbacks running), or by a call_soon for other entry points
# (timers, HTTP/1.1 upstream reads) (_BATCH[1]: one is scheduled).
_DIRTY: list = []
_BATCH = [0, False]


def flush_pending() -> None:
    """Write what every connection touched since the last call has to send."""
    _BATCH[1] = False
    dirty = _DIRTY
    while dirty:
        conn = dirty.pop()
        conn.dirty = False
        conn.write_out()


def _scheduled_flush() -> None:
    if _BATCH[1]:
        flush_pending()


def _mark_dirty(conn) -> None:
    conn.dirty = True
    _DIRTY.append(conn)
    if not _BATCH[0] and not _BATCH[1]:
        _BATCH[1] = True
        asyncio.get_running_loop().call_soon(_scheduled_flush)


def _grpc_dest(dest: tuple) -> tuple:
    """The destination label tuple with request_protocol="grpc" (one object per source tuple)."""
    hit = _GRPC_DEST.get(id(dest))
    if hit is not None and hit[0] is dest:
        return hit[1]
    out = dest[:-1] + ("grpc",)
    if len(_GRPC_DEST) > 4096:
        _GRPC_DEST.clear()
    _GRPC_DEST[id(dest)] = (dest, out)
    return out


def _settings() -> dict:
    return {
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.ENABLE_PUSH: 0,
    }


def take_over(down, data: bytes) -> bool:
    """Called by ``HttpDownstream`` when httptools stops on ``PRI * HTTP/2.0``: serve the
    connection as HTTP/2 from now on. ``data`` is the read the parser stopped in; the
    bytes of the preface before it (a preface split over reads) are implied. Returns False
    when this is not a connection preface (the caller answers 400)."""
    if getattr(down, "parsing", True) is not None:
        return False  # HTTP/1.1 requests came first: not a prior-knowledge connection
    start = data.find(b"PRI * ")
    if start == 0:
        stream = data
    else:
        # The preface began in an earlier read: find where this read continues it.
        stream = None
        for k in range(1, len(PREFACE)):
            tail = PREFACE[k:]
            if data[:len(tail)] == tail[:len(data)]:
                stream = PREFACE[:k] + data
                break
        if stream is None:
            return False
    if not PREFACE.startswith(stream[:len(PREFACE)]):
        return False
    runtime = down.runtime
    runtime.downstreams.discard(down)
    down.closing = True  # the HTTP/1.1 protocol object is done; the timers skip it
    h2down = H2Downstream(runtime, down.ctx, down.peer, down.target)
    h2down.routes = down.routes
    h2down.decision = getattr(down, "decision", None)
    h2down.entry = getattr(down, "entry", None)
    transport = down.transport
    transport.set_protocol(h2down)
    h2down.connection_made(transport)
    h2down.data_received(stream)
    return True


class H2Downstream(asyncio.Protocol):
    """One downstream HTTP/2 connection (server side)."""

    __slots__ = (
        "runtime", "ctx", "peer", "target", "transport", "conn", "streams", "closing", "idle_age",
        "write_paused", "routes", "decision", "entry", "first_try", "goaway", "blocked", "dirty",
    )

    def __init__(self, runtime, ctx, peer, target=None) -> None:
        self.runtime = runtime
        self.ctx = ctx
        self.peer = peer
        self.target = target
        self.transport = None
        config = H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False,
                                 normalize_outbound_headers=False)
        self.conn = H2Connection(config=config)
        self.streams: dict[int, H2Stream] = {}
        self.closing = False
        self.idle_age = 0.0
        self.write_paused = False
        self.routes = None
        self.decision = None  # the inbound plane's per-connection policy decision
        self.entry = None  # the inbound plane's registration of this stream
        self.first_try = ctx.reporter == "source"
        self.goaway = False  # the client said GOAWAY: close once its streams are done
        self.blocked: set = set()  # streams with response bytes waiting for window
        self.dirty = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        if self.peer is None:
            self.peer = self.runtime.peer_info(self.ctx, transport)
            if not self.runtime.authorize_connection(self.ctx, self.peer):
                self.closing = True
                transport.abort()
                return
        self.runtime.downstreams.add(self)
        conn = self.conn
        conn.initiate_connection()
        settings = _settings()
        settings[SettingCodes.MAX_HEADER_LIST_SIZE] = self.runtime.limits.max_header_bytes
        conn.update_settings(settings)
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.write_out()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.idle_age = 0.0
        _BATCH[0] += 1
        try:
            self._received(data)
        except Exception:  # a bug of ours: log it, never show the client a traceback
            log.exception("HTTP/2 request handling failed")
            self._fail_all()
            self.close()
        finally:
            _BATCH[0] -= 1
        flush_pending()

    def _received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s:%s: %s", self.peer.remote[0], self.peer.remote[1], exc)
            self.write_out()
            self._fail_all()
            self.close()
            return
        for event in events:
            cls = event.__class__
            if cls is DataReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.request_data(event.data, event.flow_controlled_length)
                else:
                    self._ack(event.stream_id, event.flow_controlled_length)
                if event.stream_ended is not None:
                    self._ended(event.stream_id)
            elif cls is RequestReceived:
                self._request(event)
            elif cls is StreamEnded:
                self._ended(event.stream_id)
            elif cls is WindowUpdated:
                self._window(event.stream_id)
            elif cls is StreamReset:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.downstream_reset()
            elif cls is TrailersReceived:
                # Request trailers are not forwarded (as HTTP/1.1's chunked trailers); the end counts.
                if event.stream_ended is not None:
                    self._ended(event.stream_id)
            elif cls is ConnectionTerminated:
                self.goaway = True
                if not self.streams:
                    self.close()
        self.flush()

    def _request(self, event) -> None:
        sid = event.stream_id
        if self.goaway:
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, sid, event.headers)
        self.streams[sid] = stream
        if event.stream_ended is not None:
            stream.request_done = True
        stream.start()

    def _ended(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None and not stream.request_done:
            stream.request_complete()

    def _ack(self, sid: int, n: int) -> None:
        if n and not self.closing:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except ProtocolError:
                pass  # the stream is closed: h2 still credits the connection window

    def _window(self, sid: int) -> None:
        if not self.blocked:
            return
        if sid:
            stream = self.streams.get(sid)
            if stream is not None and stream in self.blocked:
                stream.drain()
        else:
            for stream in list(self.blocked):
                stream.drain()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.runtime.downstreams.discard(self)
        entry = self.entry
        if entry is not None:
            connections = getattr(self.runtime, "connections", None)
            if connections is not None:
                connections.discard(entry)
        self._fail_all()

    def _fail_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.downstream_reset()
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.idle_age = 0.0
        for stream in list(self.streams.values()):
            stream.downstream_writable()
        flush_pending()

    # helpers
    def flush(self) -> None:
        """Have the pending frames written at the end of this batch of events (flush_pending)."""
        if not self.dirty:
            _mark_dirty(self)

    def write_out(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closing:
            self.transport.write(data)

    def stream_done(self, stream) -> None:
        self.streams.pop(stream.sid, None)
        self.blocked.discard(stream)
        self.idle_age = 0.0
        if self.goaway and not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closing:
            try:
                self.conn.close_connection()
                self.write_out()
            except ProtocolError:
                pass
            self.closing = True
            self.transport.close()

    def check_timers(self, tick: float, limits) -> None:
        """The runtime's sweep: per-stream idle timeouts, and the connection idle timeout."""
        if self.closing:
            return
        if self.streams:
            limit = limits.stream_idle_timeout
            if limit:
                for stream in list(self.streams.values()):
                    stream.idle_age += tick
                    if stream.idle_age > limit:
                        stream.idle_timeout()
                self.flush()
            return
        self.idle_age += tick
        if self.idle_age > limits.idle_timeout:
            self.close()


class H2Stream:
    """One HTTP/2 request/response. Implements the upstream callbacks of both the HTTP/1.1
    ``UpstreamConnection`` and ``H2UpstreamConnection``, and what ``ProxyRuntime.plan``,
    ``ClusterState.pick`` and the access log read of an exchange."""

    __slots__ = (
        "down", "runtime", "sid", "method", "path", "authority", "headers", "grpc",
        "request_done", "response_started", "response_done", "finished", "abandoned",
        "chunks", "replay", "replay_bytes", "plan", "cluster", "endpoint", "tried", "attempt",
        "upstream", "up_sid", "h1", "status", "grpc_status", "flags", "req_bytes", "resp_bytes", "t0",
        "timer", "try_timer", "dest", "upstream_host", "_hmap", "out", "out_q", "out_end", "out_trailers",
        "unacked_up", "unacked_down", "idle_age", "body_mode", "version",
        "held", "up_paused", "eof_body", "retry_slot", "failure_reason", "request_id",
    )

    def __init__(self, down: H2Downstream, sid: int, raw_headers) -> None:
        self.down = down
        self.runtime = down.runtime
        self.sid = sid
        method = path = authority = b""
        headers = []
        grpc = False
        request_id = None
        for name, value in raw_headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"host":
                if not authority:
                    authority = value
                continue
            if name == b"content-type" and value[:16] == b"application/grpc":
                grpc = True
            elif name == b"x-request-id":
                if not value:
                    continue  # an empty one is dropped and replaced, as on HTTP/1.1
                if request_id is None:
                    request_id = value
            headers.append((name, value))
        if request_id is None:
            # as Exchange: generated once, before authorization and routing (local replies,
            # retries and the access log carry it)
            request_id = new_request_id()
            headers.append((b"x-request-id", request_id))
        self.request_id = request_id
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.grpc = grpc
        self.version = "2"
        self.body_mode = 0
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.finished = False
        self.abandoned = False
        self.chunks = []  # (bytes, flow-controlled length) waiting for an upstream
        self.replay = []  # the body kept for retries (None: too big)
        self.replay_bytes = 0
        self.plan = None
        self.cluster = None
        self.endpoint = None
        self.tried = None
        self.attempt = 0
        self.upstream = None
        self.up_sid = 0
        self.h1 = False
        self.status = 0
        self.grpc_status = None
        self.flags = "-"
        self.req_bytes = 0
        self.resp_bytes = 0
        self.t0 = time.monotonic()
        self.timer = None
        self.try_timer = None
        self.dest = None
        self.upstream_host = ""
        self._hmap = None
        # UpstreamConnection calls flush() after each read when ``out`` is true: always, so what
        # one upstream read produced goes to the client in one write (down.flush)
        self.out = (True,)
        self.out_q = []  # response DATA waiting for flow-control window
        self.out_end = False
        self.out_trailers = None
        self.unacked_up = 0  # upstream response bytes not yet acknowledged (held for backpressure)
        self.unacked_down = 0  # client request bytes not yet acknowledged
        self.idle_age = 0.0
        self.held = []  # request body for an HTTP/2 upstream beyond its window: (bytes, fc length)
        # The cluster's retry circuit breaker (maxRetries), as Exchange.retry_slot: 1 while this
        # stream holds an outstanding retry, 2 when one was refused (its local reply adds UO).
        self.retry_slot = 0
        self.failure_reason = None  # as Exchange.failure_reason
        self.up_paused = False  # the HTTP/1.1 upstream's reading is paused for backpressure
        self.eof_body = False  # the HTTP/1.1 upstream's body ends when its connection closes

    # --- what routing and the access log read (the same as an HTTP/1.1 exchange's) ---
    header_map = _header_map
    path_str = _path_str
    request_id_str = _request_id_str

    # --- request side -------------------------------------------------
    def start(self) -> None:
        down = self.down
        if not self.method or not self.path or self.method == b"CONNECT":
            # CONNECT (and extended CONNECT) is not proxied on this listener.
            self.local_reply(LocalReply(405 if self.method == b"CONNECT" else 400, "-",
                                        b"CONNECT is not supported on this listener" if self.method == b"CONNECT"
                                        else b"Bad Request"))
            return
        if len(self.headers) > self.runtime.limits.max_headers:
            self.local_reply(LocalReply(431, "-", b"Request Header Fields Too Large"))
            return
        authorizer = down.ctx.authorizer
        if authorizer is not None:
            denied = authorizer.authorize_request(down.peer, RequestInfo(
                self.method.decode("latin-1"), self.path.decode("latin-1"),
                self.authority.decode("latin-1"), self.header_map()))
            if denied:
                self.local_reply(LocalReply(403, "RBAC", b"RBAC: access denied"))
                return
        try:
            plan = self.runtime.plan(self)
        except Exception:  # a bug of ours, never the client's: 500, traceback in the log
            log.exception("HTTP/2 request routing failed")
            self.local_reply(LocalReply(500, "-", b"internal error"))
            return
        if plan.__class__ is LocalReply:
            self.local_reply(plan)
            return
        self.plan = plan
        if plan.timeout:
            self.timer = self.runtime.loop.call_later(plan.timeout, self._route_timeout)
        if self.grpc:
            # Istio sets the route's max stream duration to honour grpc-timeout, capped by the
            # route timeout (grpcTimeoutHeaderMax = timeout, 0: uncapped): DEADLINE_EXCEEDED (DT).
            deadline = grpc_timeout(self.header_map().get("grpc-timeout"))
            if deadline is not None and (not plan.timeout or deadline < plan.timeout):
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.runtime.loop.call_later(deadline, self._duration_timeout)
        if plan.delay:
            self.flags = "DI"
            self.runtime.loop.call_later(plan.delay, self._after_delay)
        else:
            self._after_delay()

    def _after_delay(self) -> None:
        if self.finished:
            return
        plan = self.plan
        grpc_abort = getattr(plan, "abort_grpc", None)
        if grpc_abort is not None and plan.abort is None:
            self.local_reply(LocalReply(200, "FI", b"fault filter abort"), grpc_code=GRPC_CODES.get(grpc_abort, 2))
            return
        abort = plan.abort
        if abort is not None:
            # a fault's status, or a CORS preflight's answer after a fault delay (runtime)
            self.local_reply(abort if abort.__class__ is LocalReply else LocalReply(abort, "FI", b"fault filter abort"))
            return
        if plan.mirror is not None and not self.grpc and self.request_done and self.replay is not None:
            self.runtime.mirror(self, plan)
        self._attempt()

    def _attempt(self) -> None:
        cluster = self.plan.cluster
        tried = retire_endpoint(self, cluster)
        h2 = _cluster_speaks_h2(cluster)
        if not h2:
            # The inbound plane's application cluster has no service port: the stream's
            # admission says whether the port is an HTTP2/GRPC one ("sniff").
            admission = getattr(self.down.entry, "admission", None)
            h2 = admission is not None and admission.kind == "sniff"
        if self.grpc and not h2:
            self.dest = cluster.labels_for(None)
            self.local_reply(LocalReply(
                503, "-", b"gRPC needs HTTP/2 to the destination, but its service port is declared as HTTP/1.1 "
                          b"(name the port grpc* or http2*, or set protocol GRPC/HTTP2)"))
            return
        endpoint = pick_endpoint(self, cluster, tried)
        if endpoint is None:
            return
        self.h1 = not h2
        if h2:
            overflow = pool_for(self.runtime, cluster).acquire(self, endpoint.addr)
        else:
            overflow = cluster.pool.acquire(self, endpoint.addr)
        if overflow is not None:
            self.local_reply(LocalReply(503, "UO", b"upstream connect error or disconnect/reset before headers. "
                                                   b"reset reason: overflow"))

    def request_data(self, data: bytes, fc: int) -> None:
        self.idle_age = 0.0
        n = len(data)
        self.req_bytes += n
        replay = self.replay
        if replay is not None:
            if self.replay_bytes + n <= REPLAY_LIMIT:
                replay.append(data)
                self.replay_bytes += n
            else:
                self.replay = None
        if self.finished or self.response_done:
            self.down._ack(self.sid, fc)  # the response is complete: the rest is discarded
            return
        upstream = self.upstream
        if upstream is None:
            self.chunks.append((data, fc))  # bounded by the window we advertised
            return
        self._send_up(data, fc, False)

    def request_complete(self) -> None:
        self.request_done = True
        if self.finished:
            return
        upstream = self.upstream
        if upstream is not None:
            self._send_up(b"", 0, True)
        plan = self.plan
        if plan is not None and plan.mirror is not None and not self.grpc and self.replay is not None \
                and self.attempt and not self.tried:
            self.runtime.mirror(self, plan)
        if self.response_done:
            self._finish()

    def _send_up(self, data: bytes, fc: int, end: bool) -> None:
        """Forward request bytes to the current upstream; acknowledge them to the client once taken."""
        upstream = self.upstream
        if self.h1:
            transport = upstream.transport
            if upstream.closed:
                self.down._ack(self.sid, fc)
                return
            if self.body_mode == 2:
                if data:
                    transport.write(b"%x\r\n%b\r\n" % (len(data), data))
                if end:
                    transport.write(b"0\r\n\r\n")
            elif data:
                transport.write(data)
            if fc:
                if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    self.unacked_down += fc  # acknowledged when the upstream drains
                else:
                    self.down._ack(self.sid, fc)
            return
        if self.held:
            self.held.append((data, fc, end))
            return
        sent = upstream.send_body(self, data, end)
        upstream.flush()
        if sent < len(data):
            self.held.append((data[sent:], fc, end))
            return
        if fc:
            self.down._ack(self.sid, fc)

    def upstream_window(self) -> None:
        """The HTTP/2 upstream opened its window: send what the client sent meanwhile."""
        held = self.held
        upstream = self.upstream
        while held and upstream is not None:
            data, fc, end = held[0]
            sent = upstream.send_body(self, data, end)
            if sent < len(data):
                held[0] = (data[sent:], fc, end)
                break
            held.pop(0)
            if fc:
                self.down._ack(self.sid, fc)
        if upstream is not None:
            upstream.flush()
        self.down.flush()

    # --- upstream side: common ------------------------------------------
    def upstream_connect_failed(self, endpoint, reason=None) -> None:
        if self.finished:
            return
        self.failure_reason = reason
        if self.retry_slot == 1:
            self._retry_end()
        self.cluster.record(self.endpoint, 0, self.runtime.loop.time())
        if self._retry("connect-failure"):
            return
        self.local_reply(LocalReply(503, "UF", connect_failure_body(reason)))

    def _ready_common(self) -> list:
        """The request headers as forwarded (route ops applied), without pseudo-headers."""
        plan = self.plan
        headers = self.headers
        if plan.request_ops is not None:
            headers = [(n.lower(), v) for n, v in apply_header_ops(list(headers), plan.request_ops)]
            note_forwarded_id(self, headers)
        return headers

    # --- HTTP/1.1 upstream (UpstreamConnection callbacks) ----------------
    def upstream_ready(self, conn) -> None:
        if self.finished:
            conn.pool.release(conn, True)
            return
        self.upstream = conn
        plan = self.plan
        parts = [self.method, b" ", plan.path or self.path, b" HTTP/1.1\r\nhost: ", plan.authority or self.authority, b"\r\n"]
        length_known = False
        for name, value in self._ready_common():
            if name in _H1_ONLY:
                continue
            if name == b"content-length":
                length_known = True
            parts += (name, b": ", value, b"\r\n")
        attempt = self.attempt
        if self.down.first_try or attempt > 1:
            parts.append(b"x-envoy-attempt-count: %d\r\n" % attempt)
        body = b"".join(self.replay) if attempt > 1 and self.replay else None
        if body is not None:
            # A retry resends the whole (small, complete) body with its length.
            if not length_known:
                parts.append(b"content-length: %d\r\n" % len(body))
            self.body_mode = 1
            parts += (b"\r\n", body)
            chunks = ()
        else:
            chunks = self.chunks
            if length_known:
                self.body_mode = 1
            elif self.request_done and not chunks:
                self.body_mode = 0
                if self.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
                    parts.append(b"content-length: 0\r\n")
            elif self.request_done:
                self.body_mode = 1
                parts.append(b"content-length: %d\r\n" % sum(len(c) for c, _ in chunks))
            else:
                self.body_mode = 2
                parts.append(b"transfer-encoding: chunked\r\n")
            parts.append(b"\r\n")
            for data, _ in chunks:
                parts.append(b"%x\r\n%b\r\n" % (len(data), data) if self.body_mode == 2 else data)
            if self.body_mode == 2 and self.request_done:
                parts.append(b"0\r\n\r\n")
        conn.exchange = self
        conn.head_only = self.method == b"HEAD"
        conn.requests += 1
        conn.transport.write(b"".join(parts))
        if chunks:
            fc = sum(f for _, f in chunks)
            self.chunks = []
            self.down._ack(self.sid, fc)
            self.down.flush()
        self._arm_try_timer(conn)

    def upstream_failed(self, conn, flag: str) -> None:
        if self.finished:
            return
        self._cancel_try_timer()
        self.upstream = None
        if self.retry_slot == 1:
            self._retry_end()
        if self.eof_body and flag == "UC" and self.response_started:
            self._end_down(None)  # an HTTP/1.0-style body delimited by the connection closing: its end
            return
        self.cluster.record(self.endpoint, 0, self.runtime.loop.time())
        self._upstream_gone(flag, "reset")

    def upstream_head(self, conn, status: int, headers: list, length=None, hop=None) -> None:
        """The HTTP/1.1 upstream's response head. ``headers`` is either (name, value) pairs, or
        (UpstreamConnection serializing as it parses) a slot for the status line followed by
        the forwarded header lines as ``name, b": ", value, b"\r\n"``, with Content-Length in
        ``length`` and the other hop-by-hop headers in ``hop`` as (lower name, name, value)."""
        if headers and headers[0].__class__ is bytes:
            pairs = [(headers[i], headers[i + 2]) for i in range(1, len(headers) - 3, 4)]
            if length is not None:
                pairs.append((b"content-length", length))
            if hop is not None:
                pairs += [(name, value) for _, name, value in hop]
            headers = pairs
        self._cancel_try_timer()
        if self.retry_slot == 1:
            self._retry_end()  # this retry's attempt is over: its response head is in
        self.cluster.record(self.endpoint, status, self.runtime.loop.time())
        if status >= self.plan.retry_floor and self._retryable(status, None):
            conn.exchange = None
            conn.keep_alive = False
            conn.close()
            self.upstream = None
            self._back_off()
            return
        out = []
        delimited = False
        for name, value in headers:
            low = name.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                delimited = True
            if low in _RESPONSE_HOP:
                continue
            out.append((low, value))
        self.eof_body = not delimited and status >= 200 and status not in (204, 304) and self.method != b"HEAD"
        self._respond(status, out, False)

    def upstream_body(self, body: bytes) -> None:
        if not self.finished:
            self._send_down(body)

    def flush(self) -> None:
        self.down.flush()
        flush_pending()

    def upstream_complete(self, conn) -> None:
        if self.finished:
            return
        self.upstream = None
        if self.up_paused:
            self.up_paused = False
            conn.transport.resume_reading()
        conn.pool.release(conn, conn.keep_alive and self.request_done)
        self._end_down(None)
        self.down.flush()

    def upstream_upgraded(self, tail: bytes) -> None:  # never asked for: treat as a protocol error
        self.upstream_failed(self.upstream, "UPE")

    def upstream_raw(self, data: bytes) -> None:
        pass

    def upstream_raw_closed(self) -> None:
        pass

    def upstream_pause_writing(self) -> None:
        pass  # the client's bytes are acknowledged only when the upstream drains (unacked_down)

    def upstream_resume_writing(self) -> None:
        self.idle_age = 0.0
        if self.unacked_down:
            n, self.unacked_down = self.unacked_down, 0
            self.down._ack(self.sid, n)
            self.down.flush()

    # --- HTTP/2 upstream (H2UpstreamConnection callbacks) ----------------
    def h2_ready(self, up) -> None:
        """An HTTP/2 upstream connection has a stream for us."""
        if self.finished:
            up._released()
            return
        self.upstream = up
        plan = self.plan
        headers = [
            (b":method", self.method), (b":scheme", b"http"), (b":path", plan.path or self.path),
            (b":authority", plan.authority or self.authority),
        ]
        for name, value in self._ready_common():
            if name in _H1_ONLY and not (name == b"te" and value == b"trailers"):
                continue
            headers.append((name, value))
        attempt = self.attempt
        if self.down.first_try or attempt > 1:
            headers.append((b"x-envoy-attempt-count", b"%d" % attempt))
        if attempt > 1 and self.replay is not None:
            body = b"".join(self.replay)
            self.chunks = [(body, 0)] if body else []
        end_now = self.request_done and not self.chunks
        self.up_sid = up.open_stream(self, headers, end_now)
        if self.up_sid is None:
            return
        chunks = self.chunks
        self.chunks = []
        for i, (data, fc) in enumerate(chunks):
            self._send_up(data, fc, self.request_done and i == len(chunks) - 1)
        up.flush()
        self.down.flush()
        self._arm_try_timer(up)

    def h2_head(self, status: int, headers: list, end: bool) -> None:
        if self.finished:
            return
        self._cancel_try_timer()
        if self.retry_slot == 1:
            self._retry_end()  # this retry's attempt is over: its response head is in
        grpc_status = None
        out = []
        for name, value in headers:
            if name[:1] == b":":
                continue
            if name == b"grpc-status":
                grpc_status = value
            out.append((name, value))
        if grpc_status is not None or not self.grpc:
            recorded = _GRPC_TO_HTTP.get(_int(grpc_status), 500) if grpc_status is not None and self.grpc else status
            self.cluster.record(self.endpoint, recorded, self.runtime.loop.time())
        code = _int(grpc_status) if grpc_status is not None else None
        if (status >= self.plan.retry_floor or code is not None) and self._retryable(status, code):
            self._drop_upstream(ErrorCodes.CANCEL)
            self._back_off()
            return
        if grpc_status is not None:
            self.grpc_status = grpc_status.decode("latin-1")
        self._respond(status, out, end)
        if end:
            self.response_done = True
            self._ended_down()

    def h2_data(self, data: bytes, fc: int) -> None:
        if self.finished:
            if self.upstream is not None:
                self.upstream.ack(self, fc)
            return
        blocked = self._send_down(data)
        if blocked:
            self.unacked_up += fc
        else:
            self.upstream.ack(self, fc)

    def h2_trailers(self, headers: list) -> None:
        if self.finished:
            return
        out = [(n, v) for n, v in headers if n[:1] != b":"]
        for name, value in out:
            if name == b"grpc-status":
                self.grpc_status = value.decode("latin-1")
        if self.grpc:
            code = _int(self.grpc_status.encode()) if self.grpc_status is not None else None
            status = _GRPC_TO_HTTP.get(code, 500) if code is not None else self.status
            self.cluster.record(self.endpoint, status, self.runtime.loop.time())
        self._end_down(out)

    def h2_end(self) -> None:
        """END_STREAM on the upstream stream (after DATA, or trailers already handled)."""
        if self.finished or self.response_done:
            return
        if self.grpc:
            # A gRPC response that ends without trailers lacks its status: outlier detection
            # sees the HTTP status.
            self.cluster.record(self.endpoint, self.status, self.runtime.loop.time())
        self._end_down(None)

    def h2_reset(self, code: int, refused: bool, flag: str) -> None:
        """The upstream stream was reset (RST_STREAM, refused by GOAWAY, or its connection closed)."""
        if self.finished:
            return
        self._cancel_try_timer()
        self.upstream = None
        if self.retry_slot == 1:
            self._retry_end()
        self.cluster.record(self.endpoint, 0, self.runtime.loop.time())
        self._upstream_gone(flag, "refused-stream" if refused else "reset")

    def h2_writable(self) -> None:
        self.upstream_window()

    # --- shared response path -----------------------------------------
    def _upstream_gone(self, flag: str, reason: str) -> None:
        if self.response_started:
            self.flags = flag if self.flags == "-" else self.flags + "," + flag
            self._reset_down(ErrorCodes.INTERNAL_ERROR if flag == "UPE" else ErrorCodes.CANCEL)
            return
        if self._retry(reason):
            return
        status = 502 if flag == "UPE" else 503
        self.local_reply(LocalReply(status, flag, b"upstream connect error or disconnect/reset before headers. "
                                                  b"reset reason: " + (b"protocol error" if flag == "UPE"
                                                                       else b"remote reset" if flag == "UR"
                                                                       else b"connection termination")))

    def _respond(self, status: int, headers: list, end: bool) -> None:
        self.status = status
        self.response_started = True
        plan = self.plan
        ops = plan.response_ops if plan is not None else None
        if ops is not None:
            headers = [(n.lower(), v) for n, v in apply_header_ops(headers, ops)]  # HTTP/2: lower-case names
        if plan is not None and plan.response_hook is not None:
            headers = plan.response_hook.h2(self, headers)  # CORS headers, a generated hash cookie
        down = self.down
        try:
            down.conn.send_headers(self.sid, [(b":status", b"%d" % status)] + headers, end_stream=end)
        except ProtocolError as exc:
            log.debug("stream %d: response headers not sent: %s", self.sid, exc)
            self._reset_down(ErrorCodes.PROTOCOL_ERROR)
            return
        self.idle_age = 0.0

    def _send_down(self, data: bytes) -> bool:
        """Send response DATA as the client's window allows; True when some is left waiting."""
        self.resp_bytes += len(data)
        self.idle_age = 0.0
        down = self.down
        if self.out_q:
            self.out_q.append(data)
            return True
        sent = self._push(data)
        if sent < len(data):
            self.out_q.append(data[sent:])
            down.blocked.add(self)
            self._pause_upstream()
            return True
        if down.write_paused:
            self._pause_upstream()
            return True
        return False

    def _push(self, data: bytes) -> int:
        conn = self.down.conn
        sid = self.sid
        total = 0
        try:
            window = conn.local_flow_control_window(sid)
            size = conn.max_outbound_frame_size
            while total < len(data) and window > 0:
                n = min(window, size, len(data) - total)
                conn.send_data(sid, data[total:total + n])
                total += n
                window -= n
        except ProtocolError:
            return len(data)  # the stream is gone (client reset): nothing more to send
        return total

    def drain(self) -> None:
        """The client opened its window: send what waits, then what was held back."""
        q = self.out_q
        while q:
            data = q[0]
            sent = self._push(data)
            if sent < len(data):
                q[0] = data[sent:]
                return
            q.pop(0)
        self.down.blocked.discard(self)
        if self.out_end:
            self.out_end = False
            self._finish_down(self.out_trailers)
            return
        if not self.down.write_paused:
            self._resume_upstream()

    def downstream_writable(self) -> None:
        if not self.out_q:
            self._resume_upstream()

    def _pause_upstream(self) -> None:
        if self.h1:
            up = self.upstream
            if up is not None and not up.closed and not self.up_paused:
                self.up_paused = True
                up.transport.pause_reading()
        # HTTP/2 upstream: h2_data keeps the bytes unacknowledged (unacked_up)

    def _resume_upstream(self) -> None:
        if self.h1:
            up = self.upstream
            if self.up_paused and up is not None and not up.closed:
                self.up_paused = False
                up.transport.resume_reading()
            return
        if self.unacked_up and self.upstream is not None:
            n, self.unacked_up = self.unacked_up, 0
            self.upstream.ack(self, n)
            self.upstream.flush()

    def _end_down(self, trailers) -> None:
        """The upstream response is complete: end the client's stream (with trailers)."""
        self.response_done = True
        if self.out_q:
            self.out_end = True
            self.out_trailers = trailers
            return
        self._finish_down(trailers)

    def _finish_down(self, trailers) -> None:
        conn = self.down.conn
        try:
            if trailers:
                conn.send_headers(self.sid, trailers, end_stream=True)
            else:
                conn.end_stream(self.sid)
        except ProtocolError:
            pass
        self._ended_down()

    def _ended_down(self) -> None:
        """The client's stream has its END_STREAM: finish the exchange."""
        conn = self.down.conn
        self.down.flush()
        if self.request_done:
            self._finish()
        elif not self.finished:
            # The response is complete before the request (e.g. an early gRPC status): Envoy
            # resets the rest of the request stream (NO_ERROR) and the exchange is over.
            try:
                conn.reset_stream(self.sid, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
            self.down.flush()
            self._drop_upstream(ErrorCodes.CANCEL)
            self._finish()

    def _reset_down(self, code) -> None:
        try:
            self.down.conn.reset_stream(self.sid, code)
        except ProtocolError:
            pass
        self.down.flush()
        self._drop_upstream(ErrorCodes.CANCEL)
        self._finish()

    def _drop_upstream(self, code) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is None:
            if self.cluster is not None:
                if self.h1:
                    self.cluster.pool.cancel(self)
                else:
                    pool_for(self.runtime, self.cluster).cancel(self)
            return
        if self.h1:
            upstream.exchange = None
            upstream.close()
        else:
            upstream.reset(self, code)

    def downstream_reset(self) -> None:
        """The client reset the stream (or went away)."""
        if self.finished:
            return
        self.abandoned = True
        self._drop_upstream(ErrorCodes.CANCEL)
        self.flags = "DC" if self.flags == "-" else self.flags + ",DC"
        self._finish()

    # --- retries and timeouts -----------------------------------------
    def _retryable(self, status: int, grpc_code) -> bool:
        plan = self.plan
        if plan.retry is None or self.response_started or not self.request_done or self.replay is None:
            return False
        if not retry_mod.should_retry(plan.retry, self.attempt, status, None, grpc_code):
            return False
        return take_retry_slot(self)

    def _retry(self, reason: str) -> bool:
        plan = self.plan
        if plan is None or plan.retry is None or self.response_started or self.finished:
            return False
        if not self.request_done or self.replay is None:
            return False
        error = {"per-try-timeout": "timeout"}.get(reason, reason)
        if not retry_mod.should_retry(plan.retry, self.attempt, None, error):
            return False
        if not self.cluster.retry_begin():
            self.retry_slot = 2  # retry overflow: the local reply carries UO after its own flag
            return False
        self.retry_slot = 1
        self._back_off()
        return True

    def _back_off(self) -> None:
        """Envoy's jittered exponential back-off, then the next try; try_timer (free between
        tries) holds it, so every end of the stream cancels it."""
        self.try_timer = self.runtime.loop.call_later(
            retry_mod.backoff_delay(self.plan.retry, self.attempt, self.runtime.rand), self._after_backoff)

    def _after_backoff(self) -> None:
        self.try_timer = None
        if not self.finished:
            self._attempt()

    def _retry_end(self) -> None:
        self.retry_slot = 0
        self.cluster.retry_end()

    def _arm_try_timer(self, upstream) -> None:
        per_try = self.plan.per_try_timeout
        if per_try:
            self.try_timer = self.runtime.loop.call_later(per_try, self._try_timeout, upstream)

    def _cancel_try_timer(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def _try_timeout(self, upstream) -> None:
        self.try_timer = None
        if self.finished or self.response_started or self.upstream is not upstream:
            return
        self._drop_upstream(ErrorCodes.CANCEL)
        if self.retry_slot == 1:
            self._retry_end()
        self.cluster.record(self.endpoint, 504, self.runtime.loop.time())
        if self._retry("per-try-timeout"):
            return
        self.local_reply(LocalReply(504, "UT", b"upstream request timeout"))

    def _route_timeout(self) -> None:
        self.timer = None
        if self.finished:
            return
        waiting = self.upstream is not None and not self.response_started
        self._drop_upstream(ErrorCodes.CANCEL)
        if waiting:
            # as Envoy: a request still waiting for its response head counts for outlier detection
            self.cluster.record(self.endpoint, 504, self.runtime.loop.time())
        if self.response_started:
            self.flags = "UT"
            self._reset_down(ErrorCodes.CANCEL)
            return
        self.local_reply(LocalReply(504, "UT", b"upstream request timeout"))

    def _duration_timeout(self) -> None:
        """The gRPC deadline (grpc-timeout) passed: Envoy's max stream duration."""
        self.timer = None
        if self.finished:
            return
        self._drop_upstream(ErrorCodes.CANCEL)
        if self.response_started:
            self.flags = "DT" if self.flags == "-" else self.flags + ",DT"
            self._reset_down(ErrorCodes.CANCEL)
            return
        self.local_reply(LocalReply(408, "DT", b"downstream duration timeout"), grpc_code=4)

    def idle_timeout(self) -> None:
        if self.finished:
            return
        self._drop_upstream(ErrorCodes.CANCEL)
        if not self.response_started:
            self.local_reply(LocalReply(408, "SI", b"stream timeout"))
            return
        self.flags = "SI" if self.flags == "-" else self.flags + ",SI"
        self._reset_down(ErrorCodes.CANCEL)

    # --- completion ---------------------------------------------------
    def local_reply(self, reply: LocalReply, grpc_code: int | None = None) -> None:
        """Answer the stream ourselves: a gRPC trailers-only response for gRPC requests."""
        if self.finished:
            return
        self.status = reply.status
        if reply.flags != "-":
            self.flags = reply.flags if self.flags == "-" else self.flags + "," + reply.flags
        if self.retry_slot == 2:
            self.flags += ",UO"  # the failure was not retried: retry overflow (Envoy: "UF,UO")
            self.retry_slot = 0
        self._cancel_try_timer()
        self._drop_upstream(ErrorCodes.CANCEL)
        down = self.down
        extra = [(n.lower(), v) for n, v in reply.headers]
        plan = self.plan
        if plan is not None and plan.response_hook is not None and wants_cors_headers(reply):
            extra += plan.response_hook.local(self)
        if self.grpc:
            code = grpc_code if grpc_code is not None else http_to_grpc(reply.status)
            self.grpc_status = str(code)
            message = reply.body.decode("latin-1").strip()
            headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", b"%d" % code)]
            if message:
                headers.append((b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()))
            body = b""
        else:
            body = reply.body
            if body and not body.endswith(b"\n"):
                body += b"\n"
            headers = [(b":status", b"%d" % reply.status)] + extra + [
                (b"content-length", b"%d" % len(body)), (b"content-type", b"text/plain")]
            if self.method == b"HEAD":
                body = b""
        self.response_started = True
        self.response_done = True
        try:
            down.conn.send_headers(self.sid, headers, end_stream=not body)
            if body:
                if self._send_down(body):  # counts resp_bytes
                    self.out_end = True
                    self.out_trailers = None
                    down.flush()
                    return
                down.conn.end_stream(self.sid)
        except ProtocolError:
            pass
        if not self.request_done:
            try:
                down.conn.reset_stream(self.sid, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
        down.flush()
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._cancel_try_timer()
        if self.retry_slot == 1:
            self._retry_end()  # the stream ended with a retry outstanding (timeout, client reset...)
        if self.unacked_down:
            self.down._ack(self.sid, self.unacked_down)
            self.unacked_down = 0
        pending = sum(fc for _, fc in self.chunks) + sum(fc for _, fc, _ in self.held)
        if pending:
            self.down._ack(self.sid, pending)
        self.chunks = []
        self.held = []
        upstream = self.upstream
        if upstream is not None and not self.h1:
            upstream.stream_closed(self, self.up_sid)
            self.upstream = None
        self._record()
        self.down.stream_done(self)

    def _record(self) -> None:
        runtime = self.runtime
        down = self.down
        duration_ms = (time.monotonic() - self.t0) * 1000.0
        dest = self.dest or ("unknown",) * 8 + ("http",)
        status = self.status
        telemetry = runtime.telemetry
        if self.grpc:
            dest = _grpc_dest(dest)
            if self.grpc_status is not None:
                status = (status, self.grpc_status)  # export() gives grpc_response_status
        telemetry.record_http(down.ctx, dest, status, self.flags, duration_ms, self.req_bytes, self.resp_bytes)
        if self.endpoint is not None and self.cluster is not None:
            self.cluster.done(self.endpoint)
        if runtime.access_log is not None:
            runtime.access_log.http(self, down, down.ctx.source, duration_ms)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------
# upstream HTTP/2


def pool_for(runtime, cluster) -> "H2Pool":
    """The HTTP/2 connection pool of a cluster (one per ClusterState, kept on the runtime)."""
    pools = runtime.h2_pools
    hit = pools.get(id(cluster))
    if hit is not None and hit.cluster is cluster:
        return hit
    if len(pools) > 1024:
        for key, pool in list(pools.items()):
            if pool.retired():
                pool.close_all()
                del pools[key]
    pool = pools[id(cluster)] = H2Pool(cluster)
    return pool


class H2Pool:
    """HTTP/2 connections of one cluster, streams multiplexed on them.

    Envoy's HTTP/2 connection pool with Istio's connectionPool settings: a stream goes
    on an open connection to its endpoint with room (the server's
    SETTINGS_MAX_CONCURRENT_STREAMS, maxRequestsPerConnection); else a new connection
    within maxConnections; else it waits (http1MaxPendingRequests, Envoy applies it to
    HTTP/2 pools too); beyond that 503 UO. http2MaxRequests bounds the streams active
    on the cluster at once (503 UO)."""

    __slots__ = ("cluster", "conns", "open", "pending", "active")

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.conns: dict[tuple, list] = {}
        self.open = 0
        self.pending: deque = deque()
        self.active = 0

    def retired(self) -> bool:
        return bool(getattr(self.cluster.pool, "retired", False))

    def _limits(self):
        return self.cluster.pool.limits

    def acquire(self, stream, endpoint) -> str | None:
        policy = getattr(self.cluster, "policy", None)
        max_requests = getattr(policy, "max_requests", UNLIMITED) or UNLIMITED
        if self.active >= max_requests:
            return "UO"
        connecting = None
        for up in self.conns.get(endpoint, ()):
            if up.has_room():
                if up.ready:
                    up.take(stream)
                    return None
                if connecting is None:
                    connecting = up
        limits = self._limits()
        # A stream that waits for a connection someone else is opening, or in the queue, is
        # pending (http1MaxPendingRequests); the one that opens a connection is not (as the
        # HTTP/1.1 pool counts them).
        if connecting is not None:
            if self._pending_count() >= limits.max_pending:
                return "UO"
            connecting.take(stream)
            return None
        if self.open < limits.max_connections:
            self._connect(endpoint, stream)
            return None
        if self._pending_count() < limits.max_pending:
            self.pending.append((stream, endpoint))
            return None
        return "UO"

    def _pending_count(self) -> int:
        waiting = len(self.pending)
        for conns in self.conns.values():
            for up in conns:
                if up.waiting:
                    waiting += len(up.waiting) - 1  # its first stream opened it
        return waiting

    def cancel(self, stream) -> None:
        for i, (waiting, _) in enumerate(self.pending):
            if waiting is stream:
                del self.pending[i]
                return
        for conns in self.conns.values():
            for up in conns:
                if stream in up.waiting:
                    up.waiting.remove(stream)
                    up._released()
                    return

    def _connect(self, endpoint, stream) -> None:
        self.open += 1
        limits = self._limits()
        up = H2UpstreamConnection(self, endpoint, limits.max_requests_per_connection)
        self.conns.setdefault(endpoint, []).append(up)
        up.take(stream)
        loop = asyncio.get_running_loop()
        loop.create_task(self._open(up, limits.connect_timeout))

    async def _open(self, up, timeout: float) -> None:
        host, port = up.endpoint
        try:
            await self.cluster.pool.connector.connect(lambda: up, host, port, timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            log.debug("HTTP/2 connect to %s:%d failed: %s", host, port, exc)
            up.connect_failed(transport_failure_reason(exc))
        except asyncio.CancelledError:
            up.connect_failed()
            raise
        except Exception:  # a connector's own error: the streams must not hang on it
            log.exception("HTTP/2 connect to %s:%d failed", host, port)
            up.connect_failed()

    def removed(self, up) -> None:
        conns = self.conns.get(up.endpoint)
        if conns and up in conns:
            conns.remove(up)
            self.open -= 1
            if not conns:
                del self.conns[up.endpoint]
        self.serve_pending()

    def serve_pending(self) -> None:
        limits = self._limits()
        pending = self.pending
        while pending:
            stream, endpoint = pending[0]
            if stream.finished:
                pending.popleft()
                continue
            target = next((up for up in self.conns.get(endpoint, ()) if up.has_room()), None)
            if target is not None:
                pending.popleft()
                target.take(stream)
                continue
            if self.open < limits.max_connections:
                pending.popleft()
                self._connect(endpoint, stream)
                continue
            break

    def close_all(self) -> None:
        for conns in list(self.conns.values()):
            for up in list(conns):
                up.close()


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint (client side), carrying many streams."""

    __slots__ = (
        "pool", "endpoint", "transport", "conn", "streams", "waiting", "reserved", "ready",
        "closed", "draining", "requests", "max_requests", "idle_handle", "idle_since", "write_paused", "dirty",
    )

    def __init__(self, pool: H2Pool, endpoint, max_requests: int) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.transport = None
        self.conn = H2Connection(config=H2Configuration(client_side=True, header_encoding=None,
                                                        validate_outbound_headers=False,
                                                        normalize_outbound_headers=False))
        self.streams: dict[int, H2Stream] = {}
        self.waiting: list = []  # streams given to this connection before it is open
        self.reserved = 0  # streams taken: open ones plus waiting ones
        self.ready = False
        self.closed = False
        self.draining = False  # GOAWAY received, or maxRequestsPerConnection reached
        self.requests = 0
        self.max_requests = max_requests or 0
        self.idle_handle = None
        self.idle_since = 0.0
        self.write_paused = False
        self.dirty = False

    def has_room(self) -> bool:
        if self.closed or self.draining:
            return False
        if self.max_requests and self.requests >= self.max_requests:
            return False
        limit = self.conn.remote_settings.max_concurrent_streams if self.ready else MAX_CONCURRENT_STREAMS
        return self.reserved < limit

    def take(self, stream) -> None:
        self.reserved += 1
        self.requests += 1
        self.pool.active += 1
        if self.ready:
            stream.h2_ready(self)
        else:
            self.waiting.append(stream)

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings(_settings())
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.write_out()  # streams wait for the server's SETTINGS (its SETTINGS_MAX_CONCURRENT_STREAMS)

    def _settled(self) -> None:
        """The server's first SETTINGS arrived: start as many waiting streams as it allows;
        the others go back to the pool (another connection, or the pending queue)."""
        self.ready = True
        waiting, self.waiting = self.waiting, []
        room = self.conn.remote_settings.max_concurrent_streams
        for stream in waiting[:room]:
            stream.h2_ready(self)
        extra = waiting[room:]
        if extra:
            self.reserved -= len(extra)
            self.requests -= len(extra)
            self.pool.active -= len(extra)
            for stream in reversed(extra):
                self.pool.pending.appendleft((stream, self.endpoint))
        self.flush()

    def connect_failed(self, reason=None) -> None:
        if self.closed:
            return
        self.closed = True
        waiting, self.waiting = self.waiting, []
        self.pool.active -= len(waiting)
        self.pool.removed(self)
        for stream in waiting:
            stream.upstream_connect_failed(self.endpoint, reason)

    def data_received(self, data: bytes) -> None:
        _BATCH[0] += 1
        try:
            self._received(data)
        except Exception:  # a bug of ours: log it; the streams fail as on a lost connection
            log.exception("HTTP/2 upstream response handling failed")
            self._lost("UPE")
        finally:
            _BATCH[0] -= 1
        flush_pending()

    def _received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            log.info("HTTP/2 protocol error from upstream %s:%d: %s", self.endpoint[0], self.endpoint[1], exc)
            self.write_out()
            self._lost("UPE")
            return
        streams = self.streams
        touched = set()  # the client connections to flush once this read is processed
        for event in events:
            cls = event.__class__
            stream = streams.get(getattr(event, "stream_id", 0) or 0)
            if stream is not None:
                touched.add(stream.down)
            if cls is DataReceived:
                if stream is not None:
                    if event.data or event.flow_controlled_length:
                        stream.h2_data(event.data, event.flow_controlled_length)
                    if event.stream_ended is not None and event.stream_id in streams:
                        self._end(event.stream_id)
                elif event.flow_controlled_length:
                    self._ack_closed(event.stream_id, event.flow_controlled_length)
            elif cls is ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    status = 0
                    for name, value in event.headers:
                        if name == b":status":
                            status = _int(value) or 0
                            break
                    ended = event.stream_ended is not None
                    if ended:
                        streams.pop(event.stream_id, None)
                        self._released()
                    stream.h2_head(status, event.headers, ended)
            elif cls is TrailersReceived:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    self._released()
                    stream.h2_trailers(event.headers)
            elif cls is StreamEnded:
                if event.stream_id in streams:
                    self._end(event.stream_id)
            elif cls is StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    self._released()
                    refused = event.error_code == ErrorCodes.REFUSED_STREAM
                    stream.h2_reset(event.error_code, refused, "UR")
            elif cls is WindowUpdated:
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None and stream.held:
                        stream.h2_writable()
                else:
                    for stream in list(streams.values()):
                        if stream.held:
                            stream.h2_writable()
            elif cls is ConnectionTerminated:
                self.draining = True
                last = event.last_stream_id if event.last_stream_id is not None else 0
                for sid in [s for s in streams if s > last]:
                    stream = streams.pop(sid)
                    self._released()
                    stream.h2_reset(ErrorCodes.REFUSED_STREAM, True, "UR")
                if not streams:
                    self.close()
            elif cls is RemoteSettingsChanged:
                if not self.ready:
                    self._settled()
                self.pool.serve_pending()
            elif cls is InformationalResponseReceived:
                pass
        self.flush()
        for down in touched:
            down.flush()

    def _end(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self._released()
            stream.h2_end()

    def _ack_closed(self, sid: int, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, sid)
        except ProtocolError:
            pass

    def _released(self) -> None:
        """One stream of this connection is over."""
        self.reserved -= 1
        self.pool.active -= 1
        if self.closed:
            return
        if self.draining or (self.max_requests and self.requests >= self.max_requests):
            if not self.streams and not self.waiting:
                self.close()
                return
        elif self.reserved <= 0:
            loop = asyncio.get_running_loop()
            self.idle_since = loop.time()
            if self.idle_handle is None:  # one timer per idle period, not one per stream
                self.idle_handle = loop.call_later(self.pool._limits().idle_timeout, self._idle)
        self.pool.serve_pending()

    def _idle(self) -> None:
        """idleTimeout: close the connection once it has had no stream for that long."""
        self.idle_handle = None
        if self.closed or self.reserved > 0:
            return  # busy again: the next idle period arms a new timer
        loop = asyncio.get_running_loop()
        left = self.idle_since + self.pool._limits().idle_timeout - loop.time()
        if left > 0:
            self.idle_handle = loop.call_later(left, self._idle)
        else:
            self.close()

    def connection_lost(self, exc) -> None:
        self._lost("UC")

    def _lost(self, flag: str) -> None:
        was_closed = self.closed
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        streams = list(self.streams.values())
        self.streams.clear()
        waiting, self.waiting = self.waiting, []
        self.pool.active -= len(streams) + len(waiting)
        self.reserved = 0
        if not was_closed or self in self.pool.conns.get(self.endpoint, ()):
            self.pool.removed(self)
        if self.transport is not None:
            self.transport.close()
        for stream in streams:
            stream.h2_reset(ErrorCodes.CONNECT_ERROR, False, flag)
        for stream in waiting:
            stream.upstream_connect_failed(self.endpoint)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.held:
                stream.h2_writable()

    # used by H2Stream
    def open_stream(self, stream, headers, end: bool):
        sid = self.conn.get_next_available_stream_id()
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except ProtocolError as exc:
            log.info("HTTP/2 request to %s:%d not sent: %s", self.endpoint[0], self.endpoint[1], exc)
            self._released()
            stream.upstream = None
            stream.local_reply(LocalReply(503, "UPE", b"request headers refused by the HTTP/2 encoder"))
            return None
        self.streams[sid] = stream
        return sid

    def send_body(self, stream, data: bytes, end: bool) -> int:
        """Send request DATA as the window allows (END_STREAM with the last byte): bytes sent."""
        conn = self.conn
        sid = stream.up_sid
        total = 0
        try:
            window = conn.local_flow_control_window(sid)
            size = conn.max_outbound_frame_size
            while total < len(data) and window > 0:
                n = min(window, size, len(data) - total)
                last = end and total + n == len(data)
                conn.send_data(sid, data[total:total + n], end_stream=last)
                total += n
                window -= n
            if end and total == len(data) and not data:
                conn.end_stream(sid)
        except ProtocolError:
            return len(data)  # the upstream stream is gone: its reset event follows
        return total

    def ack(self, stream, n: int) -> None:
        if n and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, stream.up_sid)
            except ProtocolError:
                pass

    def reset(self, stream, code) -> None:
        sid = stream.up_sid
        if self.streams.pop(sid, None) is not None:
            try:
                self.conn.reset_stream(sid, code)
            except ProtocolError:
                pass
            self.flush()
            self._released()
        elif stream in self.waiting:
            self.waiting.remove(stream)
            self._released()

    def stream_closed(self, stream, sid: int) -> None:
        """The downstream side finished while the upstream stream may still be open."""
        if sid and self.streams.get(sid) is stream:
            self.reset(stream, ErrorCodes.CANCEL)

    def flush(self) -> None:
        if not self.dirty:
            _mark_dirty(self)

    def write_out(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.closed and self.transport is None:
            return
        if not self.closed:
            self.closed = True
            if self.idle_handle is not None:
                self.idle_handle.cancel()
                self.idle_handle = None
            self.pool.removed(self)
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.conn.close_connection()
                self.write_out()
            except ProtocolError:
                pass
            self.transport.close()
