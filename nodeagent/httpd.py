"""A small HTTP/1.1 server and client on asyncio + httptools, for the agent.

The daemon serves its admin API, metrics and readiness with ``HttpServer``
and talks to ``nodeagent ca serve`` with ``request``; httptools is already
the proxy's parser, so the daemon never imports aiohttp. Why: the agent's
memory budget (issue #5, 40 MiB Rss with 100 pods). Importing aiohttp's
server and client cost the daemon ~110 modules and ~10 MiB Rss (measured
with ``python -m bench memory``: see docs/operations.md); this module and
httptools cost well under 1 MiB. The CA server itself keeps aiohttp.

Server: GET and HEAD on exact paths (the query string is ignored), each
route a plain function returning ``(status, content type, body)``; any other
method on a known path is 405 with ``Allow``, an unknown path 404. HTTP/1.1
keep-alive (and HTTP/1.0 ``Connection: keep-alive``), pipelined requests
answered in order. Bounded: request line, each header and the whole head
(431/414), header count, request body (413, no route reads one), time to
send a request (408) and idle keep-alive time, concurrent connections (at
the cap, an idle keep-alive connection makes room; a probe is not locked
out by idle clients).
A failing route is logged with its traceback and answered 500 with a
one-line JSON error: a client never sees a traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl as _ssl
import time
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import unquote

from httptools import (HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser,
                       HttpResponseParser, parse_url)

log = logging.getLogger("nodeagent.httpd")

MAX_URL = 8190               # request target, as aiohttp's max_line_size
MAX_FIELD = 8190             # one header (name + value)
MAX_HEAD = 32768             # request line + all headers
MAX_HEADERS = 100
MAX_REQUEST_BODY = 65536     # no route reads a body; a small one is read and dropped
REQUEST_TIMEOUT = 10.0       # from a request's first byte to its last
KEEPALIVE_TIMEOUT = 75.0     # an idle connection is closed after this (aiohttp's default)
MAX_CONNECTIONS = 256        # per server: at the cap an idle one is closed, or the new one

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}

Response = tuple[int, str, bytes]     # status, Content-Type, body
Route = Callable[[], Response]

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


def json_response(data, status: int = 200) -> Response:
    return status, JSON, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """RFC 9110 IMF-fixdate of now, formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, "%s, %02d %s %d %02d:%02d:%02d GMT" % _imf(time.gmtime(now)))
    return _date[1]


def _imf(t: time.struct_time) -> tuple:
    return (("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday], t.tm_mday,
            ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[t.tm_mon - 1],
            t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


class _Refused(Exception):
    """A request this server answers with ``status`` and then closes the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class HttpServer:
    """One listening address serving ``routes`` (path -> function)."""

    def __init__(self, routes: Mapping[str, Route], host: str, port: int, *, name: str = "http") -> None:
        self.routes = dict(routes)
        self.host, self.port, self.name = host, port, name
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()

    async def start(self) -> None:
        """Listen (``port`` 0 picks one; ``self.port`` is then the bound port). Raises OSError."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), self.host, self.port,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.close()
        await self._server.wait_closed()
        self._server = None

    def answer(self, method: str, target: bytes) -> tuple[Response, tuple[str, ...]]:
        """The response to ``method target``, and extra header lines."""
        try:
            path = unquote(parse_url(target).path.decode("latin-1")) if target != b"*" else "*"
        except (HttpParserError, AttributeError):
            return (400, TEXT, b"400: Bad Request\n"), ()
        route = self.routes.get(path)
        if route is None:
            return (404, TEXT, b"404: Not Found\n"), ()
        if method not in ("GET", "HEAD"):
            return (405, TEXT, b"405: Method Not Allowed\n"), ("Allow: GET, HEAD",)
        try:
            return route(), ()
        except Exception as exc:  # the server reports, it must not die nor show a traceback
            log.exception("%s %s failed", self.name, path)
            return json_response({"error": f"{path}: {exc}"}, 500), ()


class _ServerConnection(asyncio.Protocol):
    __slots__ = ("server", "transport", "parser", "_target", "_head", "_head_raw", "_headers", "_body", "_in_head",
                 "_busy", "_timer", "_closing")

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self._target = b""
        self._head = self._head_raw = self._headers = self._body = 0
        self._in_head = self._busy = self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio ---------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        connections = self.server._connections
        if len(connections) >= MAX_CONNECTIONS:
            idle = next((c for c in connections if not c._busy and not c._closing), None)
            if idle is None:
                transport.abort()
                return
            idle._finish()
            connections.discard(idle)
        connections.add(self)
        self._arm(KEEPALIVE_TIMEOUT)

    def connection_lost(self, exc) -> None:
        self.server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:  # a client that does not read its answers stops being read
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
            if self._in_head:
                # A head arriving in pieces: what httptools buffers of an unfinished
                # line is bounded here (counting, from the read where the request
                # began, what preceded it there too: an overestimate, never under).
                self._head_raw += len(data)
                if self._head_raw > MAX_HEAD:
                    raise _Refused(431, "request head too large")
        except HttpParserUpgrade:
            self._finish()  # an Upgrade or CONNECT request was answered; nothing is upgraded here
        except _Refused as refused:
            self._refuse(refused.status)
        except HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            self._refuse(cause.status if isinstance(cause, _Refused) else 400)
        except HttpParserError:
            self._refuse(400)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- httptools callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        self._target = b""
        self._head = self._head_raw = self._headers = self._body = 0
        self._in_head = self._busy = True
        if not self._closing:
            self._arm(REQUEST_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._head += len(url)
        if len(self._target) > MAX_URL:
            raise _Refused(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        self._head += len(name) + len(value) + 4
        if len(name) + len(value) > MAX_FIELD or self._head > MAX_HEAD or self._headers > MAX_HEADERS:
            raise _Refused(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > MAX_REQUEST_BODY:
            raise _Refused(413, "request body too large")

    def on_message_complete(self) -> None:
        self._busy = False
        if self._closing:  # pipelined after a request that closes the connection
            return
        method = self.parser.get_method().decode("ascii", "replace")
        version = self.parser.get_http_version()
        keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        if version not in ("1.0", "1.1"):
            (status, ctype, body), extra = (505, TEXT, b"505: HTTP Version Not Supported\n"), ()
            keep_alive = False
        else:
            (status, ctype, body), extra = self.server.answer(method, self._target)
        if keep_alive and version == "1.0":
            extra = (*extra, "Connection: keep-alive")
        self._write(status, ctype, body, extra, keep_alive, head_only=method == "HEAD")
        if not self._closing:
            self._arm(KEEPALIVE_TIMEOUT)

    # -- answers -------------------------------------------------------------

    def _write(self, status: int, ctype: str, body: bytes, extra: tuple[str, ...], keep_alive: bool,
               head_only: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Date: {_http_date()}",
                 f"Content-Type: {ctype}", f"Content-Length: {len(body)}", *extra]
        if not keep_alive:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        if not keep_alive:
            self._finish()

    def _refuse(self, status: int) -> None:
        self._write(status, TEXT, f"{status}: {REASONS[status]}\n".encode(), (), keep_alive=False)

    def _finish(self) -> None:
        self._closing = True
        self.close()

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._closing:
            return
        if self._busy:
            self._refuse(408)  # a request started and was not finished in time
        else:
            self._finish()     # idle keep-alive connection


# -- client ------------------------------------------------------------------

MAX_RESPONSE_HEAD = 65536
MAX_RESPONSE_BODY = 16 * 1024 * 1024


class HttpClientError(Exception):
    """The server's answer was not a readable HTTP/1.1 response (or too large)."""


@dataclass(slots=True)
class ClientResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class _ClientConnection(asyncio.Protocol):
    def __init__(self, done: asyncio.Future, max_body: int) -> None:
        self.done = done
        self.max_body = max_body
        self.parser = HttpResponseParser(self)
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = self.head = 0
        self.headers_done = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed_data(data)
            if not self.headers_done:
                self.head += len(data)
                if self.head > MAX_RESPONSE_HEAD:
                    raise HttpClientError(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
        except HttpClientError as exc:
            self._fail(exc)
        except HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            self._fail(cause if isinstance(cause, HttpClientError) else HttpClientError(f"bad HTTP response: {exc}"))
        except HttpParserError as exc:
            self._fail(HttpClientError(f"bad HTTP response: {exc}"))

    def eof_received(self):
        if not self.done.done():
            # a response without Content-Length or chunked encoding ends at EOF
            if self.headers_done and "content-length" not in self.headers \
                    and "transfer-encoding" not in self.headers:
                self.on_message_complete()
            else:
                self._fail(HttpClientError("connection closed before the response was complete"))
        return False

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self._fail(exc if exc is not None else HttpClientError("connection closed before the response"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise HttpClientError(f"response body larger than {self.max_body} bytes")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(ClientResponse(self.parser.get_status_code(), self.headers, b"".join(self.chunks)))

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


async def request(method: str, host: str, port: int, path: str, *, body: bytes = b"",
                  content_type: str = "application/json", ssl: _ssl.SSLContext | None = None,
                  timeout: float = 10.0, max_body: int = MAX_RESPONSE_BODY) -> ClientResponse:
    """One request on a new connection (``Connection: close``), TLS when ``ssl``
    is given (the certificate is checked against ``host``). Raises OSError
    (including ssl.SSLError), TimeoutError or HttpClientError."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = [f"{method} {path} HTTP/1.1", f"Host: {authority}", "Connection: close",
            "Accept: application/json", f"Content-Length: {len(body)}"]
    if body:
        head.append(f"Content-Type: {content_type}")
    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: _ClientConnection(done, max_body), host, port,
                                                        ssl=ssl, server_hostname=host if ssl else None)
            transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            return await done
    finally:
        if transport is not None:
            transport.close()
