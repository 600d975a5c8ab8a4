"""nodeagent.proxy.response_hook: the header bytes the engines add for CORS and hash cookies."""
from __future__ import annotations

from types import SimpleNamespace

from nodeagent.proxy.http import LocalReply, RequestHeaders
from nodeagent.proxy.response_hook import ResponseHook, preflight_reply, wants_cors_headers
from policy.cluster import HashPolicy
from policy.cors import compile_cors
from policy.lb import generated_cookie_value
from policy.model import CorsPolicy, StringMatch

CORS = compile_cors(CorsPolicy(allow_origins=(StringMatch("exact", "https://a.test"),),
                               expose_headers=("x-e",), allow_credentials=True))
COOKIE = HashPolicy("cookie", "sticky", "/", 60.0)
PEER = SimpleNamespace(remote=("127.0.0.1", 41000), local=("127.0.0.1", 15001))


def exchange(*headers, method=b"GET"):
    return SimpleNamespace(header_map=lambda: RequestHeaders(list(headers)), down=SimpleNamespace(peer=PEER),
                           method=method)


def head(*pairs):
    parts = [b"HTTP/1.1 200 OK\r\n"]
    for n, v in pairs:
        parts += (n, b": ", v, b"\r\n")
    return parts


def test_h1_replaces_the_upstreams_cors_headers_and_keeps_the_rest():
    parts = head((b"Access-Control-Allow-Origin", b"*"), (b"x-instance", b"w0"),
                 (b"access-control-expose-headers", b"x-old"), (b"set-cookie", b"a=1"))
    ResponseHook(CORS, None).h1(exchange((b"Origin", b"https://a.test")), parts)
    assert b"".join(parts) == (b"HTTP/1.1 200 OK\r\nx-instance: w0\r\nset-cookie: a=1\r\n"
                               b"access-control-allow-origin: https://a.test\r\n"
                               b"access-control-allow-credentials: true\r\n"
                               b"access-control-expose-headers: x-e\r\n")


def test_h1_leaves_a_disallowed_origins_response_alone():
    parts = head((b"access-control-allow-origin", b"*"))
    before = list(parts)
    ResponseHook(CORS, None).h1(exchange((b"Origin", b"https://b.test")), parts)
    assert parts == before


def test_generated_cookie_is_appended_only_without_the_cookie():
    value = generated_cookie_value(PEER.remote, PEER.local)
    parts = head((b"set-cookie", b"a=1"))
    ResponseHook(None, COOKIE).h1(exchange(), parts)
    assert parts[-4:] == [b"set-cookie", b": ", f'sticky="{value}"; Max-Age=60; Path=/; HttpOnly'.encode(), b"\r\n"]
    assert parts[1:5] == [b"set-cookie", b": ", b"a=1", b"\r\n"]
    parts = head()
    ResponseHook(None, COOKIE).h1(exchange((b"Cookie", b"sticky=abc")), parts)
    assert parts == head()


def test_h2_lists_and_local_replies():
    hook = ResponseHook(CORS, COOKIE)
    out = hook.h2(exchange((b"origin", b"https://a.test")), [(b"access-control-allow-origin", b"*"), (b"x", b"1")])
    names = [n for n, _ in out]
    assert names == [b"x", b"access-control-allow-origin", b"access-control-allow-credentials",
                     b"access-control-expose-headers", b"set-cookie"]
    # local replies: CORS only, never a cookie; not on fault aborts nor flagless replies
    assert [n for n, _ in hook.local(exchange((b"origin", b"https://a.test")))][0] == b"access-control-allow-origin"
    assert wants_cors_headers(LocalReply(503, "UF")) and wants_cors_headers(LocalReply(504, "UT"))
    assert not wants_cors_headers(LocalReply(503, "FI")) and not wants_cors_headers(LocalReply(200, "-"))


def test_preflight_reply():
    reply = preflight_reply(CORS, exchange((b"Origin", b"https://a.test"), (b"Access-Control-Request-Method", b"PUT"),
                                           method=b"OPTIONS"), LocalReply)
    assert reply.status == 200 and reply.flags == "-" and reply.body == b""
    assert reply.headers == [(b"access-control-allow-origin", b"https://a.test"),
                             (b"access-control-allow-credentials", b"true")]
    assert preflight_reply(CORS, exchange((b"Origin", b"https://a.test")), LocalReply) is None
