"""nodeagent.httpd: the agent's small HTTP/1.1 server and client, on real sockets on 127.0.0.1."""
from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
import weakref

import pytest

from nodeagent import httpd


def _boom():
    raise RuntimeError("view exploded")


ROUTES = {
    "/data": lambda: httpd.json_response({"x": 1}),
    "/text": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", b"metric 1.0\n"),
    "/unready": lambda: httpd.json_response({"ready": False}, 503),
    "/boom": _boom,
}


class Served:
    """An HttpServer on its own event loop thread, for blocking raw-socket clients."""

    def __init__(self, routes=ROUTES) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = httpd.HttpServer(routes, "127.0.0.1", 0, name="test")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        self.port = self.server.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


_buffers: "weakref.WeakKeyDictionary[socket.socket, bytearray]" = weakref.WeakKeyDictionary()


def _recv_until(sock: socket.socket, enough) -> bytearray:
    buf = _buffers.setdefault(sock, bytearray())
    while not enough(buf):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; received {bytes(buf)!r}"
        buf += chunk
    return buf


def read_response(sock: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """The next response on a blocking socket (Content-Length framed; pipelined ones stay buffered)."""
    buf = _recv_until(sock, lambda b: b"\r\n\r\n" in b)
    end = buf.index(b"\r\n\r\n")
    lines = buf[:end].decode("latin-1").split("\r\n")
    del buf[:end + 4]
    assert lines[0].startswith("HTTP/1.1 "), f"not a response: {lines[0]!r}"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_only else int(headers["content-length"])
    buf = _recv_until(sock, lambda b: len(b) >= length)
    body = bytes(buf[:length])
    del buf[:length]
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_get_json_and_keep_alive_on_one_connection(served):
    with served.connect() as sock:
        for _ in range(3):
            sock.sendall(b"GET /data?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(sock)
            assert status == 200
            assert headers["content-type"] == "application/json; charset=utf-8"
            assert json.loads(body) == {"x": 1}
            assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order(served):
    with served.connect() as sock:
        sock.sendall(b"GET /text HTTP/1.1\r\n\r\nGET /unready HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n")
        assert read_response(sock)[2] == b"metric 1.0\n"
        assert read_response(sock)[0] == 503
        assert read_response(sock)[0] == 404


def test_head_has_the_get_headers_and_no_body(served):
    with served.connect() as sock:
        sock.sendall(b"HEAD /text HTTP/1.1\r\n\r\n")
        status, headers, body = read_response(sock, head_only=True)
        assert (status, headers["content-length"], body) == (200, "11", b"")
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        sock.sendall(b"GET /text HTTP/1.1\r\n\r\n")  # the connection stays usable
        assert read_response(sock)[2] == b"metric 1.0\n"


def test_unknown_path_404_and_other_methods_405(served):
    with served.connect() as sock:
        sock.sendall(b"GET /missing HTTP/1.1\r\n\r\n")
        assert read_response(sock)[:1] == (404,)
        sock.sendall(b"POST /data HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, _ = read_response(sock)
        assert status == 405 and headers["allow"] == "GET, HEAD"
        sock.sendall(b"DELETE /data HTTP/1.1\r\n\r\n")
        assert read_response(sock)[0] == 405


def test_failing_route_is_500_json_without_traceback(served):
    with served.connect() as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 500 and headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"error": "/boom: view exploded"}
        assert b"Traceback" not in body
        sock.sendall(b"GET /data HTTP/1.1\r\n\r\n")  # the server survived, the connection too
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
    (b"GET /data HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET /data HTTP/1.1\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", 431),
    (b"GET /data HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    # a body one byte over the bound, and no more (unread bytes would make the close a reset)
    (b"POST /data HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" + b"z" * (httpd.MAX_REQUEST_BODY + 1), 413),
    (b"GET /data HTTP/2.0\r\n\r\n", 505),
])
def test_bad_requests_are_refused_and_the_connection_closed(served, request_bytes, status):
    with served.connect() as sock:
        sock.sendall(request_bytes)
        got, headers, body = read_response(sock)
        assert got == status and headers["connection"] == "close"
        assert body.startswith(str(status).encode())
        assert closed_by_peer(sock)


def test_a_head_sent_in_pieces_is_bounded(served):
    start = b"GET /data HTTP/1.1\r\nX-Slow: "
    pieces = (httpd.MAX_HEAD - len(start)) // 1000 + 1  # the last piece crosses MAX_HEAD
    with served.connect() as sock:
        sock.sendall(start)
        for _ in range(pieces):  # one header line that never ends
            time.sleep(0.002)
            sock.sendall(b"y" * 1000)
        status, headers, _ = read_response(sock)
        assert status == 431 and headers["connection"] == "close"


def test_http10_closes_unless_keep_alive_is_asked(served):
    with served.connect() as sock:
        sock.sendall(b"GET /data HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 200 and headers["connection"] == "close"
        assert closed_by_peer(sock)
    with served.connect() as sock:
        sock.sendall(b"GET /data HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(sock)[1]["connection"] == "keep-alive"
        sock.sendall(b"GET /data HTTP/1.0\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_connection_close_is_honoured(served):
    with served.connect() as sock:
        sock.sendall(b"GET /data HTTP/1.1\r\nConnection: close\r\n\r\nGET /data HTTP/1.1\r\n\r\n")
        assert read_response(sock)[1]["connection"] == "close"
        assert closed_by_peer(sock)  # the pipelined second request is not answered


def test_idle_and_unfinished_requests_time_out(monkeypatch):
    monkeypatch.setattr(httpd, "KEEPALIVE_TIMEOUT", 0.2)
    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 0.2)
    served = Served()
    try:
        with served.connect() as sock:
            sock.sendall(b"GET /data HTTP/1.1\r\n\r\n")
            assert read_response(sock)[0] == 200
            assert closed_by_peer(sock)  # idle after its answer: closed silently
        with served.connect() as sock:
            sock.sendall(b"GET /data HTTP/1.1\r\nX-Never: ")
            status, headers, _ = read_response(sock)
            assert status == 408 and headers["connection"] == "close"
    finally:
        served.close()


def test_at_the_connection_cap_an_idle_connection_makes_room(monkeypatch):
    monkeypatch.setattr(httpd, "MAX_CONNECTIONS", 2)
    served = Served()
    try:
        with served.connect() as idle, served.connect() as busy:
            idle.sendall(b"GET /data HTTP/1.1\r\n\r\n")
            assert read_response(idle)[0] == 200           # answered, now idle (keep-alive)
            busy.sendall(b"GET /data HTTP/1.1\r\nX-Unfinished: ")  # a request in progress
            time.sleep(0.2)
            with served.connect() as third:                  # at the cap: the idle one is closed for it
                third.sendall(b"GET /data HTTP/1.1\r\n\r\n")
                assert read_response(third)[0] == 200
                assert closed_by_peer(idle)
                busy.sendall(b"1\r\n\r\n")                 # the busy one was kept
                assert read_response(busy)[0] == 200
    finally:
        served.close()


def test_at_the_connection_cap_with_no_idle_connection_the_new_one_is_closed(monkeypatch):
    monkeypatch.setattr(httpd, "MAX_CONNECTIONS", 2)
    served = Served()
    try:
        with served.connect() as first, served.connect() as second:
            for sock in (first, second):
                sock.sendall(b"GET /data HTTP/1.1\r\nX-Unfinished: ")
            time.sleep(0.2)
            with served.connect() as third:
                assert closed_by_peer(third)
            first.sendall(b"1\r\n\r\n")
            assert read_response(first)[0] == 200
    finally:
        served.close()


def test_responses_carry_a_date(served):
    with served.connect() as sock:
        sock.sendall(b"GET /data HTTP/1.1\r\n\r\n")
        date = read_response(sock)[1]["date"]
    assert date.endswith(" GMT")
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5


def test_listen_error_is_an_oserror():
    async def main():
        first = httpd.HttpServer(ROUTES, "127.0.0.1", 0)
        await first.start()
        try:
            with pytest.raises(OSError):
                await httpd.HttpServer(ROUTES, "127.0.0.1", first.port).start()
        finally:
            await first.close()
    asyncio.run(main())


# -- client --------------------------------------------------------------------

async def _raw_server(answer: bytes, close: bool = True):
    """A server that reads one request head and writes ``answer`` verbatim."""
    seen: list[bytes] = []

    async def handle(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()
        else:
            await asyncio.sleep(5)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def test_client_against_the_server():
    async def main():
        server = httpd.HttpServer(ROUTES, "127.0.0.1", 0)
        await server.start()
        try:
            resp = await httpd.request("GET", "127.0.0.1", server.port, "/data")
            assert (resp.status, json.loads(resp.body)) == (200, {"x": 1})
            resp = await httpd.request("POST", "127.0.0.1", server.port, "/data", body=b'{"a": 1}')
            assert resp.status == 405 and resp.headers["allow"] == "GET, HEAD"
        finally:
            await server.close()
    asyncio.run(main())


@pytest.mark.parametrize("answer, body", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
    (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"until the end"),
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", b"no"),
])
def test_client_reads_every_framing(answer, body):
    async def main():
        server, port, seen = await _raw_server(answer)
        async with server:
            resp = await httpd.request("POST", "127.0.0.1", port, "/v1/x", body=b"{}")
            assert resp.body == body
            head = seen[0].decode()
            assert head.startswith("POST /v1/x HTTP/1.1\r\n") and "Content-Length: 2\r\n" in head
            assert f"Host: 127.0.0.1:{port}\r\n" in head and "Connection: close\r\n" in head
    asyncio.run(main())


@pytest.mark.parametrize("answer, close, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True, "closed before the response was complete"),
    (b"NOT HTTP\r\n\r\n", True, "bad HTTP response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, True, "larger than 50 bytes"),
])
def test_client_refuses_broken_answers(answer, close, error):
    async def main():
        server, port, _ = await _raw_server(answer, close)
        async with server:
            with pytest.raises(httpd.HttpClientError, match=error):
                await httpd.request("GET", "127.0.0.1", port, "/", max_body=50)
    asyncio.run(main())


def test_client_times_out():
    async def main():
        server, port, _ = await _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", close=False)
        async with server:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await httpd.request("GET", "127.0.0.1", port, "/", timeout=0.3)
            assert time.monotonic() - started < 2
    asyncio.run(main())
