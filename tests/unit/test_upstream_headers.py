"""UpstreamConnection's response-head parsing (nodeagent/proxy/upstream.py): which header
lines are forwarded as they are and which are set aside as hop-by-hop, through the real
httptools parser. Names whose length is no hop-by-hop header's length are forwarded without
being lower-cased first; these tests pin that this shortcut changes nothing."""
from __future__ import annotations

from nodeagent.proxy.upstream import HOP_HEADERS, UpstreamConnection


class Recorder:
    """The exchange side of one response: what UpstreamConnection hands over."""

    def __init__(self) -> None:
        self.out = []
        self.heads: list[tuple] = []
        self.body = bytearray()
        self.completed = 0

    def upstream_head(self, conn, status, parts, length, hop) -> None:
        self.heads.append((status, b"".join(parts[1:]), length, hop))

    def upstream_body(self, data: bytes) -> None:
        self.body += data

    def upstream_complete(self, conn) -> None:
        self.completed += 1

    def flush(self) -> None:
        pass


def parse(raw: bytes) -> Recorder:
    conn = UpstreamConnection(pool=None, endpoint=("127.0.0.1", 1))
    exchange = Recorder()
    conn.exchange = exchange
    conn.data_received(raw)
    return exchange


def test_hop_by_hop_headers_are_set_aside_in_any_case_and_the_rest_forwarded_in_order():
    ex = parse(b"HTTP/1.1 200 OK\r\n"
               b"Date: Thu, 26 Nov 2026 08:00:00 GMT\r\n"  # 4 letters, as "host": forwarded
               b"Server: haproxy\r\n"  # 6, as "expect": forwarded
               b"CONNECTION: keep-alive\r\n"
               b"Keep-Alive: timeout=5\r\n"
               b"X-Hop-Like: 1\r\n"  # 10, as "connection": forwarded
               b"Content-Type: text/plain\r\n"
               b"Content-Length: 2\r\n"
               b"te: trailers\r\n"
               b"ab: 2 letters, as te\r\n"
               b"\r\nok")
    assert len(ex.heads) == 1
    status, forwarded, length, hop = ex.heads[0]
    assert status == 200 and length == b"2"
    assert forwarded == (b"Date: Thu, 26 Nov 2026 08:00:00 GMT\r\nServer: haproxy\r\nX-Hop-Like: 1\r\n"
                         b"Content-Type: text/plain\r\nab: 2 letters, as te\r\n")
    assert hop == [(b"connection", b"CONNECTION", b"keep-alive"), (b"keep-alive", b"Keep-Alive", b"timeout=5"),
                   (b"te", b"te", b"trailers")]
    assert bytes(ex.body) == b"ok" and ex.completed == 1


def test_every_hop_by_hop_name_is_recognised_whatever_its_case():
    for name in sorted(HOP_HEADERS - {b"content-length", b"transfer-encoding", b"upgrade", b"connection"}):
        for spelled in (name, name.upper(), name.title()):
            ex = parse(b"HTTP/1.1 204 No Content\r\n" + spelled + b": x\r\nX-Other: y\r\n\r\n")
            status, forwarded, length, hop = ex.heads[0]
            assert forwarded == b"X-Other: y\r\n", spelled
            assert hop == [(name, spelled, b"x")], spelled
    ex = parse(b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert ex.heads[0][3] == [(b"transfer-encoding", b"TRANSFER-ENCODING", b"chunked")]
    assert bytes(ex.body) == b"ok" and ex.completed == 1
