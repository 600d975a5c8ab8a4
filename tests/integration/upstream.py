"""A real HTTP/1.1 test upstream on loopback, run in a background thread.

Every response carries ``x-instance: NAME``. Behaviour per request:

- default: a JSON echo ``{"instance","method","path","headers","body_len","body"}``
  (the request body is counted and hashed as it streams, kept only when small);
- ``/bytes/N``: N bytes streamed (``?chunked=1`` for chunked encoding; ``?pattern=1``: 64 KiB
  block i is ``pattern_block(i)`` instead of ``x``s);
- request header ``x-delay: SECONDS`` waits first; ``x-status: CODE`` answers that code;
- ``server.status`` / ``server.delay`` set the same for every request (e.g. a failing instance);
- ``Upgrade: websocket``: 101, then every byte is echoed back;
- request header ``x-close-delimited: 1``: a body without length that ends when the connection closes.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from urllib.parse import parse_qs, urlsplit

import httptools


def pattern_block(i: int) -> bytes:
    """The i-th 64 KiB block of a ``/bytes/N?pattern=1`` body: its number, repeated."""
    return i.to_bytes(8, "big") * 8192


class _Request:
    def __init__(self) -> None:
        self.url = b""
        self.method = ""
        self.headers: dict[str, str] = {}
        self.body_len = 0
        self.small = bytearray()
        self.sha = hashlib.sha256()
        self.done = False


class UpstreamServer:
    """One upstream instance; ``start()`` binds 127.0.0.1:0 (or the given address)."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.requests: list[dict] = []
        self.connections = 0
        self.open_connections = 0
        self._loop = None
        self._server = None
        self._thread = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> "UpstreamServer":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.open_connections -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events: list[_Request] = []
        current: list[_Request] = []

        class Callbacks:
            def on_message_begin(self_inner):
                current.append(_Request())

            def on_url(self_inner, url):
                current[-1].url += url

            def on_header(self_inner, name, value):
                current[-1].headers[name.decode().lower()] = value.decode("latin-1")

            def on_headers_complete(self_inner):
                req = current[-1]
                req.method = parser.get_method().decode()
                if req.headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

            def on_body(self_inner, body):
                req = current[-1]
                req.body_len += len(body)
                req.sha.update(body)
                if len(req.small) < 65536:
                    req.small += body[: 65536 - len(req.small)]

            def on_message_complete(self_inner):
                current[-1].done = True
                events.append(current[-1])

        parser = httptools.HttpRequestParser(Callbacks())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    await self._upgrade(current[-1], data[exc.args[0]:], reader, writer)
                    return
                except httptools.HttpParserError:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    return
                while events:
                    req = events.pop(0)
                    keep = await self._respond(req, parser, writer)
                    if not keep:
                        return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _upgrade(self, req: _Request, tail: bytes, reader, writer) -> None:
        self.hits += 1
        self.requests.append({"path": req.url.decode(), "headers": req.headers, "upgrade": True})
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nx-instance: "
            + self.name.encode() + b"\r\n\r\n"
        )
        if tail:
            writer.write(tail)
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _respond(self, req: _Request, parser, writer) -> bool:
        self.hits += 1
        url = req.url.decode("latin-1")
        parts = urlsplit(url)
        record = {
            "instance": self.name,
            "method": req.method,
            "path": url,
            "headers": req.headers,
            "body_len": req.body_len,
            "body_sha256": req.sha.hexdigest(),
        }
        self.requests.append(record)
        delay = float(req.headers.get("x-delay", self.delay) or 0)
        if delay:
            await asyncio.sleep(delay)
        status = int(req.headers.get("x-status", self.status))
        head = [b"HTTP/1.1 %d X\r\nx-instance: %s\r\n" % (status, self.name.encode())]
        if parts.path.startswith("/bytes/"):
            total = int(parts.path.split("/")[2])
            chunked = parse_qs(parts.query).get("chunked") == ["1"]
            if chunked:
                head.append(b"transfer-encoding: chunked\r\n\r\n")
            else:
                head.append(b"content-length: %d\r\n\r\n" % total)
            writer.write(b"".join(head))
            patterned = parse_qs(parts.query).get("pattern") == ["1"]
            block = b"x" * 65536
            sent = 0
            while sent < total:
                if patterned:  # block i is its own number, so a reordered or lost block shows
                    block = pattern_block(sent // 65536)
                piece = block[: min(65536, total - sent)]
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if req.headers.get("x-close-delimited"):
            # HTTP/1.0 style: no length, no chunking, the body ends when the connection closes.
            head.append(b"connection: close\r\n\r\n")
            writer.write(b"".join(head) + b"body-until-close" * 1000)
            await writer.drain()
            return False
        if req.method == "HEAD":
            head.append(b"content-length: 1234\r\n\r\n")
            writer.write(b"".join(head))
            return True
        record_out = dict(record)
        record_out["body"] = bytes(req.small).decode("latin-1") if req.body_len <= 65536 else None
        body = json.dumps(record_out).encode()
        if req.headers.get("x-chunked-response"):
            head.append(b"transfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n")
            half = len(body) // 2
            head.append(b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:]))
        else:
            head.append(b"content-length: %d\r\ncontent-type: application/json\r\n\r\n" % len(body))
            head.append(body)
        writer.write(b"".join(head))
        await writer.drain()
        return True
