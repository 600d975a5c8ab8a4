"""Downstream HTTP/1.1: an asyncio Protocol around httptools' request parser.

One ``HttpDownstream`` per accepted connection parses requests and runs them
one at a time in arrival order (pipelined requests wait in a queue, so their
responses go out in order). Each request is an ``Exchange``: it asks the
runtime for a plan (route, cluster, timeouts, retries, faults, mirror), gets
an upstream connection from the cluster's pool and streams the body both
ways chunk by chunk. Nothing is buffered whole: request bytes that arrive
before the upstream connection is ready are held up to ``BUFFER_LIMIT``, then
the client is paused; write-buffer high-water marks pause the other side.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Mapping

from httptools import (
    HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url,
)

from nodeagent.proxy.context import RequestInfo
from nodeagent.proxy.requestid import new_request_id_line
from nodeagent.proxy.response_hook import wants_cors_headers
from nodeagent.proxy.upstream import HOP_HEADERS, direct_fd, wire_write

log = logging.getLogger(__name__)
_monotonic = time.monotonic

BUFFER_LIMIT = 256 * 1024  # request bytes held while no upstream connection is ready
REPLAY_LIMIT = 64 * 1024  # a request body up to this size is kept for retries and mirrors
PIPELINE_LIMIT = 32  # queued pipelined requests before the client is paused
WRITE_HIGH_WATER = 256 * 1024
# After answering a request we could not parse, the rest of what the client sent is read and
# dropped for at most this long before the socket is closed (Envoy's delayed_close_timeout):
# closing with unread input makes the kernel send a reset, which can destroy the answer
# before the client reads it.
DELAYED_CLOSE = 1.0

_PAUSE_PIPELINE, _PAUSE_BUFFER, _PAUSE_UPSTREAM = 1, 2, 4
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP reset

# Headers that describe one hop (never forwarded as they are), and x-request-id: the request
# head's headers the Exchange looks at, found with the one set lookup every header costs anyway.
_SPECIAL = HOP_HEADERS | {b"x-request-id"}
# Their lengths: a request header name of another length (user-agent's 10 is one, accept's 6
# another; x-envoy-attempt-count, cookie, ... are not) is kept without bytes.lower() (~300
# instructions per header).
_SPECIAL_LENGTHS = frozenset(len(h) for h in _SPECIAL)

_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created", 204: b"No Content",
    301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 307: b"Temporary Redirect",
    308: b"Permanent Redirect", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reset_transport(transport) -> None:
    """Close ``transport`` with a TCP reset (SO_LINGER 0): what is still buffered is not sent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


class RequestHeaders:
    """Request headers as a read-only lower-case str Mapping, decoded on first use.

    Routing looks at headers only when a route matches on them, so most
    requests never pay for the decoding."""

    __slots__ = ("_pairs", "_map")

    def __init__(self, pairs: list) -> None:
        self._pairs = pairs
        self._map = None

    def _dict(self) -> dict:
        hmap = self._map
        if hmap is None:
            hmap = {}
            for name, value in self._pairs:
                key = name.decode("latin-1").lower()
                val = value.decode("latin-1")
                hmap[key] = hmap[key] + "," + val if key in hmap else val
            self._map = hmap
        return hmap

    def __getitem__(self, key: str) -> str:
        return self._dict()[key]

    def get(self, key: str, default=None):
        return self._dict().get(key, default)

    def __contains__(self, key) -> bool:
        return key in self._dict()

    def __iter__(self):
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def keys(self):
        return self._dict().keys()

    def items(self):
        return self._dict().items()

    def values(self):
        return self._dict().values()


Mapping.register(RequestHeaders)


class LocalReply:
    """A response the proxy itself answers (no route, fault abort, overflow, redirect...)."""

    __slots__ = ("status", "flags", "body", "headers")

    def __init__(self, status: int, flags: str, body: bytes = b"", headers=()) -> None:
        self.status = status
        self.flags = flags
        self.body = body
        self.headers = headers


_FIRST_ATTEMPT = b"x-envoy-attempt-count: 1\r\n\r\n"  # the header and the end of the head
_STATUS_LINES = {code: b"HTTP/1.1 %d %b\r\n" % (code, reason) for code, reason in _REASONS.items()}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def apply_header_ops(headers: list, ops) -> list:
    """Apply a route's policy.routing.HeaderOps to (bytes, bytes) header pairs."""
    pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.apply_pairs(pairs)]


class HttpDownstream:
    """One downstream connection speaking HTTP/1.1 (or 1.0)."""

    __slots__ = (
        "runtime", "ctx", "peer", "transport", "parser", "active", "queue", "parsing",
        "url", "headers", "head_bytes", "raw_pending", "reading_head", "head_age",
        "idle_age", "pauses", "write_paused", "closing", "tunnel", "error_status", "target",
        "routes", "max_header_bytes", "max_headers", "head_room", "chunk_len", "head_fed", "exact_head",
        "first_try", "fd",
    )

    def __init__(self, runtime, ctx, peer=None, target=None) -> None:
        self.runtime = runtime
        self.ctx = ctx
        self.peer = peer
        self.target = target  # (service host, port) when the listener knows the destination service
        self.transport = None
        self.fd = -1  # direct_fd(transport): where wire_write may send directly
        self.parser = HttpRequestParser(self)
        self.active = None
        self.queue = []
        self.parsing = None
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.raw_pending = 0
        self.reading_head = False
        # Ages in seconds, advanced by the runtime's sweep tick and reset by activity
        # (a plain store per read instead of a clock call).
        self.head_age = 0.0
        self.idle_age = 0.0
        self.pauses = 0
        self.write_paused = False
        self.closing = False
        self.tunnel = None
        self.error_status = 0
        self.routes = None  # the runtime's route entries for this connection's listener (ProxyRuntime.plan)
        limits = runtime.limits
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        # The head's byte count (url + name + value + 4 per header, checked against
        # max_header_bytes) is kept exactly only when it could reach the limit: a head
        # has at least (name + value + 3) raw bytes per header, so while the bytes fed
        # since it began stay within head_room it cannot (the header count is always checked).
        self.head_room = limits.max_header_bytes - limits.max_headers
        self.chunk_len = 0  # length of the chunk being parsed
        self.head_fed = 0  # bytes fed since the current head began (an upper bound of its size)
        self.exact_head = False
        # The end of a first try's head: Istio sets include_request_attempt_count on the
        # outbound (source-reporting) routes, not on the inbound ones.
        self.first_try = _FIRST_ATTEMPT if ctx.reporter == "source" else b"\r\n"

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.fd = direct_fd(transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        if self.peer is None:
            self.peer = self.runtime.peer_info(self.ctx, transport)
            if not self.runtime.authorize_connection(self.ctx, self.peer):
                self.closing = True
                transport.abort()
                return
        self.runtime.downstreams.add(self)

    def data_received(self, data: bytes) -> None:
        self.idle_age = 0.0  # progress: the idle, stream idle and tunnel idle timeouts restart
        if self.tunnel is not None:
            self.tunnel.downstream_raw(data)
            return
        if self.closing:
            return
        n = self.chunk_len = len(data)
        if not self.reading_head:
            self.raw_pending = 0
        else:
            # the current head continues in this chunk
            fed = self.head_fed = self.head_fed + n
            if fed > self.head_room and not self.exact_head:
                self._count_head()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.parsing is not None:
                # Everything after the upgrade request belongs to the new protocol.
                self.tunnel = self.parsing
                self.parsing.downstream_raw(data[exc.args[0]:])
            return
        except HttpParserCallbackError as exc:
            if self.error_status:
                self.protocol_error(self.error_status)
            else:
                # A bug of ours, not the client's: say so (500) and keep the traceback in the log.
                log.error("request handling failed", exc_info=exc.__context__ or exc)
                self.internal_error()
            return
        except HttpParserError as exc:
            if exc.args and exc.args[0] == "Pause on PRI/Upgrade":  # HTTP/2 preface (docs/http2.md)
                from nodeagent.proxy.h2 import take_over
                if take_over(self, data):
                    return
            self.protocol_error(400)
            return
        if self.reading_head:
            # Bytes of one head the parser holds internally (a header still arriving).
            self.raw_pending += n
            if self.raw_pending > self.max_header_bytes:
                self.protocol_error(431)

    def eof_received(self):
        return None  # asyncio.Protocol's answer: the transport closes itself

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.runtime.downstreams.discard(self)
        active = self.active
        if active is not None:
            active.downstream_lost()
        for queued in self.queue:
            queued.abandoned = True
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.active is not None:
            self.active.downstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.idle_age = 0.0  # the client is reading again: progress
        if self.active is not None:
            self.active.downstream_resume_writing()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.reading_head = True
        self.head_age = 0.0
        fed = self.head_fed = self.chunk_len
        self.exact_head = fed > self.head_room

    def _count_head(self) -> None:
        """Start counting the head's bytes exactly: what was skipped so far, then per callback."""
        self.exact_head = True
        self.head_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.raw_pending = 0
        if self.exact_head:
            self.head_bytes += len(url)
            if self.head_bytes > self.max_header_bytes:
                self.error_status = 431
                raise ValueError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self.raw_pending = 0
        if self.exact_head:
            size = self.head_bytes = self.head_bytes + len(name) + len(value) + 4
            if size > self.max_header_bytes:
                self.error_status = 431
                raise ValueError("request head too large")
        if len(headers) > self.max_headers:
            self.error_status = 431
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        self.reading_head = False
        parser = self.parser
        exchange = Exchange(self, parser.get_method(), self.url, self.headers, None, parser.should_keep_alive(), None)
        self.parsing = exchange
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            if len(self.queue) >= PIPELINE_LIMIT:
                self.pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        self.parsing.request_complete()

    # flow control
    def pause(self, reason: int) -> None:
        if not self.pauses and not self.closing:
            self.transport.pause_reading()
        self.pauses |= reason

    def resume(self, reason: int) -> None:
        if self.pauses & reason:
            self.pauses &= ~reason
            if not self.pauses and not self.closing:
                self.transport.resume_reading()

    # called by exchanges
    def exchange_done(self, exchange, keep_alive: bool) -> None:
        if exchange is not self.active:
            return
        self.active = None
        self.idle_age = 0.0
        if not keep_alive:
            self.close()
            return
        if self.queue:
            nxt = self.queue.pop(0)
            self.resume(_PAUSE_PIPELINE)
            self.active = nxt
            nxt.start()

    def protocol_error(self, status: int) -> None:
        """Answer a request we cannot parse (400/431/408) and close."""
        if self.closing:
            return
        if self.active is None:
            body = _REASONS.get(status, b"error").lower()
            wire_write(self.transport, self.fd,
                b"HTTP/1.1 %d %b\r\ncontent-length: %d\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n%b"
                % (status, _REASONS.get(status, b"Error"), len(body), body)
            )
            self.runtime.telemetry_local_error(self, status)
            self._delayed_close()
            return
        self.close()

    def _delayed_close(self) -> None:
        """Send the answer and a FIN, drop what the client still sends (data_received ignores a
        closing connection), and close when the client does or after DELAYED_CLOSE."""
        self.closing = True
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.runtime.loop.call_later(DELAYED_CLOSE, transport.close)

    def internal_error(self) -> None:
        active = self.active
        if active is not None and not active.response_started and not self.closing:
            active.keep_alive = False
            active.local_reply(LocalReply(500, "-", b"internal error"))
        self.close()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()

    def reset(self) -> None:
        """Reset the connection (TCP RST; what is still buffered is not sent)."""
        self.closing = True
        reset_transport(self.transport)

    def check_timers(self, tick: float, limits) -> None:
        """Called by the runtime's sweep every ``tick`` seconds: slow request heads get 408,
        idle connections close, a request in flight (or an Upgrade tunnel) that makes no
        progress either way for the stream (tunnel) idle timeout ends. ``idle_age`` counts
        from the last progress: a downstream read, an upstream read, a write that drained."""
        if self.closing:
            return
        exchange = self.tunnel or self.active
        if exchange is not None:
            age = self.idle_age = self.idle_age + tick
            limit = limits.tunnel_idle_timeout if exchange.tunneling else limits.stream_idle_timeout
            if limit and age > limit:
                exchange.idle_timeout()
            return
        if self.reading_head:
            self.head_age += tick
            if self.head_age > limits.header_timeout:
                self.protocol_error(408)
        elif not self.queue:
            self.idle_age += tick
            if self.idle_age > limits.idle_timeout:
                self.close()


def retire_endpoint(exchange, cluster):
    """The start of a (re)try, for HTTP/1.1 exchanges and HTTP/2 streams: the previous
    attempt's endpoint is released (LB bookkeeping) and remembered in ``exchange.tried``;
    ``cluster`` becomes the exchange's. Returns the endpoints tried so far (None: none)."""
    if type(exchange) is Exchange:
        x = exchange  # the same steps, on C fields (typed in http.pxd)
        tried = x.tried
        previous = x.endpoint
        if previous is not None:
            x.cluster.done(previous)
            x.endpoint = None
            if tried is None:
                tried = x.tried = [previous]
            else:
                tried.append(previous)
        x.cluster = cluster
        return tried
    tried = exchange.tried
    previous = exchange.endpoint
    if previous is not None:
        exchange.cluster.done(previous)
        exchange.endpoint = None
        if tried is None:
            tried = exchange.tried = [previous]
        else:
            tried.append(previous)
    exchange.cluster = cluster
    return tried


def pick_endpoint(exchange, cluster, tried, state=None):
    """The endpoint of this attempt: one not ``tried`` when there is one, else any; None after
    answering 503 UH when the cluster has no healthy endpoint. Counts the attempt. ``state``:
    ``cluster`` itself when it is known to be a ClusterState (ForwardPlan.state), whose picks
    and UpstreamEndpoints are then read as C calls and fields when compiled."""
    if state is not None:
        endpoint = state.pick(exchange, tried)
        if endpoint is None and tried:
            endpoint = state.pick(exchange, None)
    else:
        endpoint = cluster.pick(exchange, tried)
        if endpoint is None and tried:
            endpoint = cluster.pick(exchange, None)
    if endpoint is None:
        exchange.dest = cluster.labels_for(None)
        exchange.local_reply(LocalReply(503, "UH", b"no healthy upstream"))
        return None
    if state is not None:
        ep = endpoint  # a ClusterState picks UpstreamEndpoints
        labels = ep.labels
        host = ep.host
    else:
        labels = endpoint.labels
        host = endpoint.host
    if type(exchange) is Exchange:
        x = exchange  # C fields (typed in http.pxd)
        x.endpoint = endpoint
        x.dest = labels
        x.upstream_host = host
        x.attempt += 1
    else:
        exchange.endpoint = endpoint
        exchange.dest = labels
        exchange.upstream_host = host
        exchange.attempt += 1
    return endpoint


def take_retry_slot(exchange) -> bool:
    """A retry the cluster's retry circuit breaker (connectionPool.http.maxRetries) allows:
    True, counted as outstanding (``exchange.retry_slot``) until its attempt ends. Else
    Envoy's retry overflow: the answer goes to the client as it is, flagged UO
    (upstream_rq_retry_overflow). HTTP/1.1 exchanges and HTTP/2 streams alike."""
    if exchange.cluster.retry_begin():
        exchange.retry_slot = 1
        return True
    exchange.flags = "UO" if exchange.flags == "-" else exchange.flags + ",UO"
    return False


def connect_failure_body(reason) -> bytes:
    """Envoy's local reply body for a connect failure, with the transport's reason when it
    gave one (a TLS handshake or verification failure of TLS origination)."""
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    if reason:
        body += b", transport failure reason: " + reason.encode("utf-8", "replace")
    return body


def header_map(exchange) -> RequestHeaders:
    """An exchange's (HTTP/1.1 or HTTP/2 stream's) request headers as a lower-case str
    Mapping, decoded lazily, once."""
    hmap = exchange._hmap
    if hmap is None:
        hmap = exchange._hmap = RequestHeaders(exchange.headers)
    return hmap


def request_id(exchange) -> bytes:
    """An exchange's (HTTP/1.1 or HTTP/2 stream's) x-request-id value: the client's, or the one
    the proxy generated (an HTTP/1.1 exchange keeps a generated one as its header line,
    ``id_line``, until it is needed on its own)."""
    rid = exchange.request_id
    if rid is None:
        rid = exchange.id_line[14:50]  # b"x-request-id: " is 14 bytes, the id 36
    return rid


def note_forwarded_id(exchange, headers) -> None:
    """After route header operations: an x-request-id they set is the request's id from now on,
    as Envoy's router sets it in the request's own headers (so the access log, and the next
    agent, show the value forwarded). One they removed leaves the id the request had."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"x-request-id":
            exchange.request_id = value
            return


def request_id_str(exchange) -> str:
    """request_id() as the access log writes it."""
    return request_id(exchange).decode("latin-1")


def path_str(exchange) -> str:
    return exchange.path.decode("latin-1")


class Exchange:
    """One request/response, from the parsed request head to the last response byte."""

    __slots__ = (
        "down", "runtime", "method", "headers", "version", "keep_alive", "upgrade",
        "path", "authority", "body_mode", "expect_continue", "chunks", "buffered", "replay",
        "replay_bytes", "request_done", "response_done", "upstream", "plan", "endpoint",
        "tried", "attempt", "response_started", "out_chunked", "close_delimited",
        "status", "flags", "req_bytes", "resp_bytes", "t0", "abandoned", "timer", "try_timer",
        "finished", "tunneling", "dest", "upstream_host", "cluster", "_hmap", "mirrored", "out", "eof_body",
        "retry_slot", "failure_reason", "request_id", "id_line",
    )

    def __init__(self, down: HttpDownstream, method, url, headers, version, keep_alive, upgrade) -> None:
        """``version`` None: read it from ``down.parser`` (the head was just parsed); so for
        ``upgrade`` None, asked only when the request can be one (an Upgrade header or CONNECT)."""
        self.down = down
        self.runtime = down.runtime
        self.method = method
        self.keep_alive = keep_alive
        self.body_mode = 0  # 0 none, 1 content-length, 2 chunked
        self.expect_continue = False
        self.chunks = ()  # request bytes waiting for an upstream connection (a list once there are any)
        self.buffered = 0
        self.replay = ()  # the body kept for retries and mirrors (a list once there is any; None: too big)
        self.replay_bytes = 0
        self.request_done = False
        self.response_done = False
        self.upstream = None
        self.plan = None
        self.endpoint = None
        self.tried = None
        self.attempt = 0
        self.response_started = False
        self.out_chunked = False
        self.close_delimited = False
        self.status = 0
        self.flags = "-"
        self.req_bytes = 0
        self.resp_bytes = 0
        self.t0 = _monotonic()
        self.abandoned = False
        self.timer = None
        self.try_timer = None
        self.finished = False
        self.tunneling = False
        self.dest = None
        self.upstream_host = ""
        self.cluster = None
        self._hmap = None
        self.mirrored = False
        # response bytes gathered during one upstream read, written once: the head's parts
        # list once the head is in (a list from then on), () before and after
        self.out = ()
        self.eof_body = False  # the upstream response body ends when its connection closes
        # The cluster's retry circuit breaker (maxRetries): 1 while this exchange holds one of
        # its outstanding retries (from the decision to the end of that retry's attempt), 2 when
        # a retry was refused for it (the local reply then also carries UO), else 0.
        self.retry_slot = 0
        self.failure_reason = None  # the last upstream transport failure (upstream_connect_failed)
        authority = b""
        keep = []
        connection = False  # a Connection or Proxy-Connection header
        upgrade_header = None
        request_id = None
        for h in headers:
            name = h[0]
            if len(name) in _SPECIAL_LENGTHS:  # only then can it be one of _SPECIAL: lower-case it
                name = name.lower()
                if name in _SPECIAL:
                    if name == b"host":
                        authority = h[1]
                    elif name == b"content-length":
                        if h[1] != b"0":
                            self.body_mode = 1
                            keep.append((b"content-length", h[1]))
                    elif name == b"x-request-id":
                        # kept as the client sent it (the first one is the request's id); an empty
                        # one is dropped and replaced
                        if h[1]:
                            if request_id is None:
                                request_id = h[1]
                            keep.append(h)
                    elif name == b"transfer-encoding":
                        self.body_mode = 2
                    elif name == b"expect":
                        self.expect_continue = h[1].lower() == b"100-continue"
                    elif name == b"upgrade":
                        upgrade_header = h
                    elif name == b"connection" or name == b"proxy-connection":
                        connection = True
                    continue
            keep.append(h)
        # x-request-id: Envoy's HTTP connection manager (generate_request_id) gives every request
        # one, here before authorization and routing, so local replies, retries and mirrors carry
        # it too. A generated one is the ready header line ``id_line`` (request_id None meanwhile:
        # see request_id()) until something needs the headers as pairs (_own_id_header).
        self.request_id = request_id
        self.id_line = new_request_id_line() if request_id is None else None
        if upgrade is None:
            # httptools' upgrade flag needs an Upgrade header (with Connection: upgrade) or CONNECT
            upgrade = (upgrade_header is not None or method == b"CONNECT") and down.parser.should_upgrade()
        self.upgrade = upgrade
        if upgrade and upgrade_header is not None:
            keep.append(upgrade_header)
        if version is None:
            # The parser's version string costs a format call. The parser accepts only
            # 0.9, 1.0, 1.1 and 2.0, and keeps the connection alive without a Connection
            # (or Proxy-Connection) header only for 1.1.
            version = "1.1" if keep_alive and not connection else down.parser.get_http_version()
        self.version = version
        if url[:1] == b"/" or url == b"*":
            self.path = url
        else:
            # absolute-form target (explicit proxy): the URL's host wins over Host.
            try:
                parsed = parse_url(url)
            except HttpParserError:
                parsed = None
            if parsed is not None and parsed.host:
                authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
                path = parsed.path or b"/"
                self.path = path + (b"?" + parsed.query if parsed.query else b"")
            else:
                self.path = url
        self.authority = authority
        self.headers = keep

    def header_map(self) -> RequestHeaders:
        """Request headers as a lower-case str Mapping (decoded lazily, once)."""
        if self.id_line is not None:
            self._own_id_header()
        return header_map(self)

    def _own_id_header(self) -> None:
        """A generated x-request-id joins the (name, value) pairs of ``headers`` instead of being
        forwarded as the ready line ``id_line``: for what reads the headers as pairs (the header
        map, route header operations, a mirror's copy). Once: from then on every try sends it
        as a pair."""
        rid = self.request_id = request_id(self)
        self.id_line = None
        self.headers.append((b"x-request-id", rid))

    def path_str(self) -> str:
        return self.path.decode("latin-1")

    def request_id_str(self) -> str:
        return request_id_str(self)

    # --- request side -------------------------------------------------
    def start(self) -> None:
        if self.abandoned:
            return
        if self.upgrade and self.method == b"CONNECT":
            self.local_reply(LocalReply(405, "-", b"CONNECT is not supported on this listener\n"))
            return
        authorizer = self.down.ctx.authorizer
        if authorizer is not None:
            denied = authorizer.authorize_request(self.down.peer, RequestInfo(
                self.method.decode("latin-1"), self.path.decode("latin-1"),
                self.authority.decode("latin-1"), self.header_map()))
            if denied:
                self.local_reply(LocalReply(403, "RBAC", b"RBAC: access denied"))
                return
        result = self.runtime.plan(self)
        if type(result) is LocalReply:
            self.local_reply(result)
            return
        plan = self.plan = result  # typed (http.pxd): its fields are read as C fields
        if plan.timeout:
            self.timer = self.runtime.loop.call_later(plan.timeout, self._route_timeout)
        if plan.delay:
            self.flags = "DI"
            self.runtime.loop.call_later(plan.delay, self._after_delay)
        elif plan.abort is None and plan.mirror is None and not self.expect_continue:
            self._attempt()  # what _after_delay comes to for most requests
        else:
            self._after_delay()

    def _after_delay(self) -> None:
        if self.finished or self.abandoned:
            return
        plan = self.plan
        abort = plan.abort
        if abort is not None:
            # a fault's status, or a CORS preflight's answer after a fault delay (runtime)
            self.local_reply(abort if abort.__class__ is LocalReply else LocalReply(abort, "FI", b"fault filter abort"))
            return
        if self.expect_continue and not self.request_done:
            self.down.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if plan.mirror is not None and self.request_done:
            self._mirror()
        self._attempt()

    def _mirror(self) -> None:
        # Only a complete, replayable request is copied (bodies are streamed, not kept).
        if not self.mirrored and self.replay is not None:
            self.mirrored = True
            if self.id_line is not None:
                self._own_id_header()  # the shadow copy carries the request's id (Envoy's does)
            self.runtime.mirror(self, self.plan)

    def _attempt(self) -> None:
        plan = self.plan
        cluster = plan.cluster
        state = plan.state  # cluster, when it is a ClusterState (typed in http.pxd)
        endpoint = pick_endpoint(self, cluster, retire_endpoint(self, cluster), state)
        if endpoint is None:
            return
        if state is not None:
            ep = endpoint  # a ClusterState picks UpstreamEndpoints
            pool = state.pool
            addr = ep.addr
        else:
            pool = cluster.pool  # a ClusterPool (typed in http.pxd: acquire is a C call)
            addr = endpoint.addr
        overflow = pool.acquire(self, addr)
        if overflow is not None:
            self.local_reply(LocalReply(503, "UO", b"upstream connect error or disconnect/reset before headers. reset reason: overflow"))

    def request_body(self, body: bytes) -> None:
        n = len(body)
        self.req_bytes += n
        replay = self.replay
        if replay is not None:
            if self.replay_bytes + n <= REPLAY_LIMIT:
                if replay:
                    replay.append(body)
                else:
                    self.replay = [body]
                self.replay_bytes += n
            else:
                self.replay = None
        if self.response_done or self.finished:
            return  # the response is already complete; the rest of the body is discarded
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            upstream.transport.write(_chunk(body) if self.body_mode == 2 else body)
        else:
            if self.chunks:
                self.chunks.append(body)
            else:
                self.chunks = [body]
            self.buffered += n
            if self.buffered > BUFFER_LIMIT:
                self.down.pause(_PAUSE_BUFFER)

    def request_complete(self) -> None:
        self.request_done = True
        if self.upgrade:
            return
        if self.finished:
            self.down.exchange_done(self, self.keep_alive and not self.close_delimited)
            return
        upstream = self.upstream
        if upstream is not None and self.body_mode == 2 and not upstream.closed:
            upstream.transport.write(b"0\r\n\r\n")
        plan = self.plan
        if plan is not None and plan.mirror is not None:
            self._mirror()
        if self.response_done:
            self._finish()

    def downstream_raw(self, data: bytes) -> None:
        if not data or self.finished:
            return
        self.req_bytes += len(data)
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            upstream.transport.write(data)
        elif self.chunks:
            self.chunks.append(data)
        else:
            self.chunks = [data]

    # --- upstream side ------------------------------------------------
    def upstream_ready(self, conn) -> None:
        if self.finished or self.abandoned:
            conn.pool.release(conn, True)
            return
        self.upstream = conn
        plan = self.plan
        if plan.request_ops is not None:
            if self.id_line is not None:
                self._own_id_header()  # route header operations see the id (and may set or remove it)
            headers = apply_header_ops(list(self.headers), plan.request_ops)
            note_forwarded_id(self, headers)
        else:
            headers = self.headers
        parts = [self.method, b" ", plan.path or self.path, b" HTTP/1.1\r\nhost: ", plan.authority or self.authority, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")  # cheaper than joining each line first
        append = parts.append
        id_line = self.id_line
        if id_line is not None:
            append(id_line)  # a generated x-request-id, in one piece
        body_mode = self.body_mode
        if body_mode == 2:
            append(b"transfer-encoding: chunked\r\n")
        if self.upgrade:
            append(b"connection: upgrade\r\n")
        attempt = self.attempt
        # Istio turns on Envoy's x-envoy-attempt-count on outbound routes: every try carries it.
        append(self.down.first_try if attempt == 1 else b"x-envoy-attempt-count: %d\r\n\r\n" % attempt)
        if attempt > 1 and self.replay is not None:
            chunks = self.replay
        else:
            chunks = self.chunks
        if chunks:
            if body_mode == 2:
                parts += [_chunk(c) for c in chunks]
            else:
                parts.extend(chunks)
        if body_mode == 2 and self.request_done:
            append(b"0\r\n\r\n")
        if self.chunks:
            self.chunks = ()
        if self.buffered:
            self.buffered = 0
            self.down.resume(_PAUSE_BUFFER)
        # conn.send(), inlined
        conn.exchange = self
        conn.head_only = self.method == b"HEAD"
        conn.requests += 1
        wire_write(conn.transport, conn.fd, b"".join(parts))
        if self.down.write_paused:
            conn.transport.pause_reading()
        per_try = plan.per_try_timeout
        if per_try:
            self.try_timer = self.runtime.loop.call_later(per_try, self._try_timeout, conn)

    def upstream_connect_failed(self, endpoint, reason=None) -> None:
        """The pool could not connect to ``endpoint``; ``reason``: the transport's own failure
        (TLS origination), Envoy's upstream_transport_failure_reason, else None."""
        if self.finished or self.abandoned:
            return
        self.failure_reason = reason
        if self.retry_slot == 1:
            self._retry_end()
        self.cluster.record(self.endpoint, 0, self.runtime.loop.time())
        if self._retry("connect-failure", 0):
            return
        self.local_reply(LocalReply(503, "UF", connect_failure_body(reason)))

    def upstream_failed(self, conn, flag: str) -> None:
        """The upstream connection reset or spoke garbage."""
        if self.finished:
            return
        self._cancel_try_timer()
        self.upstream = None
        if self.retry_slot == 1:
            self._retry_end()
        if self.response_started and self.eof_body and flag == "UC":
            # An HTTP/1.0-style body delimited by the connection closing: this IS its end.
            if self.out_chunked:
                self.out.append(b"0\r\n\r\n")
            self.flush()
            self.response_done = True
            if self.request_done or self.body_mode == 0:
                self._finish()
            return
        self.cluster.record(self.endpoint, 0, self.runtime.loop.time())
        if self.response_started:
            self.flags = flag
            self.response_done = True
            self.close_delimited = True
            self._finish_abort()
            return
        if self._retry("reset", 0):
            return
        status = 502 if flag == "UPE" else 503
        self.local_reply(LocalReply(status, flag, b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"))

    def upstream_head(self, conn, status: int, parts: list, length, hop) -> None:
        """The response head: ``parts`` are the forwarded header lines serialized after a
        slot for the status line, ``length`` the Content-Length value (None: none),
        ``hop`` the other hop-by-hop headers as (lower-case name, name, value) or None
        (see UpstreamConnection.on_header)."""
        if self.try_timer is not None:
            self._cancel_try_timer()
        if self.retry_slot == 1:
            self._retry_end()  # this retry's attempt is over: its response head is in
        state = self.plan.state
        if state is None or state is not self.cluster:
            self.cluster.record(self.endpoint, status, self.runtime.loop.time())
        elif state.outlier is not None:  # else record() does nothing: the clock is not read
            state.record(self.endpoint, status, self.runtime.loop.time())
        if status >= self.plan.retry_floor and not self.upgrade and self._retryable_status(status):
            conn.exchange = None
            conn.keep_alive = False
            conn.close()
            self.upstream = None
            self._retry("status", status)
            return
        self.status = status
        self.response_started = True
        parts[0] = _STATUS_LINES.get(status) or b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown"))
        chunked = False
        upgrade = None
        if hop is not None:
            for lname, name, value in hop:
                if lname == b"transfer-encoding":
                    chunked = True
                elif lname == b"upgrade" and status == 101:
                    upgrade = (name, value)
        ops = self.plan.response_ops
        if ops is not None:
            # the forwarded headers as pairs, for the route's header operations to see first
            pairs = [(parts[i], parts[i + 2]) for i in range(1, len(parts), 4)]
            if upgrade is not None:
                pairs.append(upgrade)
            del parts[1:]
            for name, value in apply_header_ops(pairs, ops):
                parts += (name, b": ", value, b"\r\n")
        elif upgrade is not None:
            parts += (upgrade[0], b": ", upgrade[1], b"\r\n")
        hook = self.plan.response_hook
        if hook is not None:
            hook.h1(self, parts)  # CORS headers, a generated hash cookie (response_hook)
        if length is not None and not chunked and status != 101:
            parts.append(b"content-length: " + length + b"\r\n")  # the common case
        elif status == 101:
            parts.append(b"connection: upgrade\r\n")
        elif self.method == b"HEAD" or status == 204 or status == 304:
            if length is not None:
                parts += (b"content-length: ", length, b"\r\n")
        elif self.version == "1.1":
            self.eof_body = not chunked and status >= 200
            self.out_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self.eof_body = not chunked and status >= 200
            self.close_delimited = True
        if self.upgrade and status != 101:
            self.keep_alive = False  # the client may already have sent bytes of the new protocol
        if not self.keep_alive or self.close_delimited or (self.expect_continue and not self.request_done):
            self.keep_alive = False
            parts.append(b"connection: close\r\n\r\n")
        elif self.version == "1.0" and status != 101:
            parts.append(b"connection: keep-alive\r\n\r\n")  # HTTP/1.0 closes unless told otherwise
        else:
            parts.append(b"\r\n")
        out = self.out
        if out:
            out += parts
        else:
            self.out = parts  # joined with the body when written (one join, not two)

    def upstream_body(self, body: bytes) -> None:
        self.resp_bytes += len(body)
        self.out.append(_chunk(body) if self.out_chunked else body)

    def flush(self) -> None:
        """Write what one upstream read produced in one send (head and body together)."""
        out = self.out
        if out:
            self.out = []
            down = self.down
            down.idle_age = 0.0  # upstream progress
            if not down.closing:
                wire_write(down.transport, down.fd, out[0] if len(out) == 1 else b"".join(out))

    def upstream_complete(self, conn) -> None:
        if self.finished:
            return
        out = self.out
        if self.out_chunked:
            out.append(b"0\r\n\r\n")
        down = self.down
        if out:
            self.out = ()
            if not down.closing:
                wire_write(down.transport, down.fd, b"".join(out))
        self.upstream = None
        if down.write_paused:
            conn.transport.resume_reading()
        conn.pool.release(conn, conn.keep_alive and self.request_done)
        self.response_done = True
        if self.request_done:
            self._finish()
        elif self.body_mode == 0:
            self._finish()

    def upstream_upgraded(self, tail: bytes) -> None:
        """101 from upstream: from now on both sides are a raw byte relay."""
        self.flush()
        self.tunneling = True
        self.down.tunnel = self
        if tail:
            self.resp_bytes += len(tail)
            self.down.transport.write(tail)
        if self.chunks:
            data = b"".join(self.chunks)
            self.chunks = ()
            self.upstream.transport.write(data)

    def upstream_raw(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        down = self.down
        down.idle_age = 0.0  # tunnel progress
        down.transport.write(data)

    def upstream_raw_closed(self) -> None:
        self.upstream = None
        self.response_done = True
        self.keep_alive = False
        self._finish()
        self.down.close()

    def upstream_pause_writing(self) -> None:
        self.down.pause(_PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.down.idle_age = 0.0  # the upstream drained what we wrote: progress
        self.down.resume(_PAUSE_UPSTREAM)

    def downstream_pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            upstream.transport.pause_reading()

    def downstream_resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            upstream.transport.resume_reading()

    def downstream_lost(self) -> None:
        """The client went away: drop the upstream connection mid-flight."""
        if self.finished:
            return
        self.abandoned = True
        self.keep_alive = False
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            if self.tunneling:
                upstream.exchange = None
                upstream.close()
            else:
                upstream.exchange = None
                upstream.close()
        elif self.cluster is not None:
            self.cluster.pool.cancel(self)
        if not self.tunneling:
            self.flags = "DC" if self.flags == "-" else self.flags + ",DC"
        self._finish()

    # --- retries and timeouts -----------------------------------------
    def _retryable_status(self, status: int) -> bool:
        plan = self.plan
        if plan.retry is None or self.response_started:
            return False
        if not self.request_done or self.replay is None:
            return False
        if not plan.retry_on_status(status, self.attempt):
            return False
        return take_retry_slot(self)

    def _retry(self, reason: str, status: int) -> bool:
        plan = self.plan
        if plan is None or plan.retry is None or self.response_started or self.finished:
            return False
        if not self.request_done or self.replay is None:
            return False
        if reason != "status" and not plan.retry_on_failure(reason, self.attempt):
            return False
        if self.upgrade:
            return False
        if reason != "status":
            if not self.cluster.retry_begin():
                self.retry_slot = 2  # retry overflow: the local reply carries UO after its own flag
                return False
            self.retry_slot = 1
        # Envoy's jittered exponential back-off before the next try; the route timeout keeps
        # running. try_timer (free between tries) holds it, so every end of the exchange cancels it.
        self.try_timer = self.runtime.loop.call_later(
            plan.backoff_delay(self.attempt, self.runtime.rand), self._after_backoff)
        return True

    def _after_backoff(self) -> None:
        self.try_timer = None
        if not self.finished and not self.abandoned:
            self._attempt()

    def _retry_end(self) -> None:
        self.retry_slot = 0
        self.cluster.retry_end()

    def _try_timeout(self, conn) -> None:
        self.try_timer = None
        if self.finished or self.response_started or self.upstream is not conn:
            return
        conn.exchange = None
        conn.close()
        self.upstream = None
        if self.retry_slot == 1:
            self._retry_end()
        self.cluster.record(self.endpoint, 504, self.runtime.loop.time())
        if self._retry("per-try-timeout", 0):
            return
        self.local_reply(LocalReply(504, "UT", b"upstream request timeout"))

    def _route_timeout(self) -> None:
        self.timer = None
        if self.finished:
            return
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.close()
            if not self.response_started:
                # Envoy reports a request still waiting for its response head to outlier
                # detection (LocalOriginTimeout, a 504 when local-origin errors are not split).
                self.cluster.record(self.endpoint, 504, self.runtime.loop.time())
        elif self.cluster is not None:
            self.cluster.pool.cancel(self)
        if self.response_started:
            self.flags = "UT"
            self.close_delimited = True
            self._finish_abort()
            return
        self.local_reply(LocalReply(504, "UT", b"upstream request timeout"))

    def idle_timeout(self) -> None:
        """Envoy's stream idle timeout (tunnel idle timeout once upgraded): nothing moved either
        way for too long. The upstream connection is closed, never pooled (it is mid-request);
        408 when no response byte went out, else the client connection is reset."""
        down = self.down
        if self.finished:
            # The response is complete but the rest of the request body never came.
            down.reset()
            return
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.close()
        elif self.cluster is not None:
            self.cluster.pool.cancel(self)
        if not self.response_started:
            self.keep_alive = False
            self.local_reply(LocalReply(408, "SI", b"stream timeout"))
            return
        self.flags = "SI" if self.flags == "-" else self.flags + ",SI"
        self.response_done = True
        self.keep_alive = False
        self.close_delimited = True
        self.flush()
        if self.tunneling:
            down.close()  # a TCP proxy idle timeout closes both sides
        else:
            down.reset()  # before _finish, whose exchange_done would close it gracefully
        self._finish()

    def _cancel_try_timer(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    # --- completion ---------------------------------------------------
    def local_reply(self, reply: LocalReply) -> None:
        if self.finished:
            return
        self.status = reply.status
        if reply.flags != "-":
            self.flags = reply.flags if self.flags == "-" else self.flags + "," + reply.flags
        if self.retry_slot == 2:
            self.flags += ",UO"  # the failure was not retried: retry overflow (Envoy: "UF,UO")
            self.retry_slot = 0
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.exchange = None
            upstream.close()
        if self.cluster is not None:
            self.cluster.pool.cancel(self)
        if (self.body_mode and not self.request_done) or self.upgrade:
            self.keep_alive = False  # the rest of the request body will not be read
        body = reply.body
        if body and not body.endswith(b"\n"):
            body += b"\n"
        parts = [b"HTTP/1.1 %d %b\r\n" % (reply.status, _REASONS.get(reply.status, b"Unknown"))]
        for name, value in reply.headers:
            parts += (name, b": ", value, b"\r\n")
        plan = self.plan
        if plan is not None and plan.response_hook is not None and wants_cors_headers(reply):
            for name, value in plan.response_hook.local(self):
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"content-length: %d\r\ncontent-type: text/plain\r\n" % len(body))
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if self.method != b"HEAD":
            parts.append(body)
            self.resp_bytes = len(body)
        self.response_started = True
        self.response_done = True
        down = self.down
        if not down.closing:
            wire_write(down.transport, down.fd, b"".join(parts))
        self._finish()

    def _finish_abort(self) -> None:
        self.flush()
        self.keep_alive = False
        self._finish()
        self.down.close()

    def record_in(self, runtime) -> None:
        """ProxyRuntime.record_exchange of this exchange: its fields read as C fields."""
        down = self.down
        runtime.record_fields(self, down, down.ctx, self.dest, self.status, self.flags, self.t0,
                              self.req_bytes, self.resp_bytes, self.endpoint, self.cluster)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.try_timer is not None:
            self._cancel_try_timer()
        if self.retry_slot == 1:
            self._retry_end()  # the exchange ended with a retry outstanding (timeout, client gone...)
        self.runtime.record_exchange(self)
        if self.request_done:
            down = self.down
            if self.keep_alive and down.active is self and not down.queue:
                # exchange_done's common case, inlined: the connection waits for its next request
                down.active = None
                down.idle_age = 0.0
            else:
                down.exchange_done(self, self.keep_alive)
        elif not self.keep_alive:
            self.down.exchange_done(self, False)
        # else: wait for request_complete() to hand the connection to the next request
