"""The ClientHello SNI parser (policy/sni.py): real ClientHellos from the ssl module,
fragmented into records and reads, and fuzzed garbage."""
from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.sni import MAX_CLIENT_HELLO, NEED_MORE, NOT_TLS, ClientHelloReader, server_name


def client_hello(sni: str | None, alpn=None, tls13_only=False) -> bytes:
    """The exact bytes Python's TLS client sends first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def handshake_message(data: bytes) -> bytes:
    """The handshake bytes of a ClientHello record stream (records must be whole)."""
    out = b""
    while data:
        length = struct.unpack("!H", data[3:5])[0]
        out += data[5:5 + length]
        data = data[5 + length:]
    return out


def records(message: bytes, sizes) -> bytes:
    """``message`` re-framed into handshake records of the given sizes (the last takes the rest)."""
    out = b""
    sizes = list(sizes)
    while message:
        n = sizes.pop(0) if sizes else len(message)
        n = max(1, min(n, len(message), 16384))
        out += b"\x16\x03\x01" + struct.pack("!H", n) + message[:n]
        message = message[n:]
    return out


HELLO = client_hello("api.example.com")
SNIS = ["api.example.com", "a.b.c.example.org", "x" * 63 + ".example.com", "UPPER.Example.COM", "db-1.internal"]


@pytest.mark.parametrize("sni", SNIS)
def test_real_client_hello(sni):
    assert server_name(client_hello(sni)) == sni


def test_real_client_hello_variants():
    assert server_name(client_hello("h2.example.com", alpn=["h2", "http/1.1"])) == "h2.example.com"
    assert server_name(client_hello("t13.example.com", tls13_only=True)) == "t13.example.com"


def test_no_sni_is_none():
    # an IP address as server_hostname: Python (like every client) sends no SNI
    assert server_name(client_hello("127.0.0.1")) is None
    assert server_name(client_hello(None)) is None


def test_every_strict_prefix_needs_more_and_trailing_bytes_are_ignored():
    for i in range(len(HELLO)):
        assert server_name(HELLO[:i]) is NEED_MORE, i
    assert server_name(HELLO + b"\x17\x03\x03\x00\x05hello" + b"garbage") == "api.example.com"


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x00",
    b"\x80\x2e\x01\x03\x01",              # SSLv2-compatible hello: no extensions, no SNI
    b"\x16\x02\x00\x00\x05",              # record version major 2
    b"\x16\x03\x09",                      # minor version out of range
    b"\x16\x03\x01\x00\x00",              # empty handshake record
    b"\x16\x03\x01\xff\xff",              # record longer than 2^14 (+slack)
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x26",  # a ServerHello, not a ClientHello
    b"\x16\x03\x01\x00\x04\x01\x00\x00\x02\x03\x03",  # ClientHello body too short to hold its fields
])
def test_not_tls(data):
    assert server_name(data) is NOT_TLS


def test_corrupt_client_hellos_are_not_tls():
    msg = handshake_message(HELLO)
    assert server_name(records(msg, [len(msg)])) == "api.example.com"
    # a ClientHello whose declared length cuts it short of its extensions
    truncated = msg[:4 + 40]
    hdr = b"\x01" + len(truncated[4:]).to_bytes(3, "big")
    assert server_name(records(hdr + truncated[4:], [1000])) is NOT_TLS
    # a non-handshake record in the middle of a fragmented ClientHello
    two = records(msg, [10])
    broken = two[:15] + b"\x17" + two[16:]
    assert server_name(broken) is NOT_TLS


def test_client_hello_larger_than_the_limit_is_tls_without_sni():
    header = b"\x01" + (MAX_CLIENT_HELLO + 10).to_bytes(3, "big")
    assert server_name(b"\x16\x03\x01\x00\x04" + header) is None


def test_server_name_extension_edge_cases():
    def hello_with(ext_body: bytes, ext_type: int = 0, twice: bool = False) -> bytes:
        ext = struct.pack("!HH", ext_type, len(ext_body)) + ext_body
        if twice:
            ext += ext
        body = (b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
                + struct.pack("!H", len(ext)) + ext)
        return records(b"\x01" + len(body).to_bytes(3, "big") + body, [len(body) + 4])

    def sni_ext(*entries) -> bytes:
        lst = b"".join(struct.pack("!BH", kind, len(name)) + name for kind, name in entries)
        return struct.pack("!H", len(lst)) + lst

    assert server_name(hello_with(sni_ext((0, b"ok.example")))) == "ok.example"
    # an unknown name type before the host_name is skipped
    assert server_name(hello_with(sni_ext((7, b"zz"), (0, b"ok.example")))) == "ok.example"
    # empty, non-ASCII or NUL-carrying names are not usable: TLS without SNI
    assert server_name(hello_with(sni_ext((0, b"")))) is None
    assert server_name(hello_with(sni_ext((0, "é.example".encode())))) is None
    assert server_name(hello_with(sni_ext((0, b"a\x00b")))) is None
    # a server_name list whose length is wrong, or a repeated extension: malformed
    assert server_name(hello_with(b"\x00\x09\x00\x00\x03abc")) is NOT_TLS
    assert server_name(hello_with(sni_ext((0, b"a.b")), twice=True)) is NOT_TLS
    # another extension only: no SNI
    assert server_name(hello_with(b"\x00\x01\x00", ext_type=0x2B)) is None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SNIS), st.lists(st.integers(min_value=1, max_value=600), max_size=12),
       st.lists(st.integers(min_value=1, max_value=700), max_size=12))
def test_fragmented_records_and_reads_give_the_same_name(sni, record_sizes, read_sizes):
    stream = records(handshake_message(client_hello(sni)), record_sizes)
    # feed it the way a relay does: whatever arrived so far, one read at a time
    seen = b""
    result = NEED_MORE
    reads = list(read_sizes)
    while result is NEED_MORE:
        assert len(seen) < len(stream)
        n = reads.pop(0) if reads else len(stream)
        seen = stream[:len(seen) + n]
        result = server_name(seen)
    assert result == sni
    assert seen == stream  # the name is known exactly when the last byte of the hello is in


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data):
    result = server_name(data)
    assert result in (NEED_MORE, NOT_TLS, None) or isinstance(result, str)


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=len(HELLO) - 1), st.integers(min_value=0, max_value=255),
       st.integers(min_value=1, max_value=len(HELLO)))
def test_mutated_client_hellos_never_raise_and_truncations_need_more(pos, value, cut):
    mutated = bytearray(HELLO)
    mutated[pos] = value
    result = server_name(bytes(mutated))
    assert result in (NEED_MORE, NOT_TLS, None) or isinstance(result, str)
    if cut < len(HELLO):
        assert server_name(HELLO[:cut]) is NEED_MORE
    else:
        assert server_name(HELLO[:cut]) == "api.example.com"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.lists(st.integers(1, 40), max_size=6))
def test_random_handshake_bodies_in_valid_records_never_raise(body, sizes):
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    result = server_name(records(msg, sizes))
    assert result in (NEED_MORE, NOT_TLS, None) or isinstance(result, str)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.just(HELLO), st.binary(max_size=300),
                 st.builds(lambda sizes: records(handshake_message(HELLO), sizes),
                           st.lists(st.integers(1, 300), max_size=8))),
       st.lists(st.integers(min_value=1, max_value=200), max_size=20))
def test_reader_fed_read_by_read_answers_as_server_name_on_the_whole_prefix(stream, read_sizes):
    reader = ClientHelloReader()
    fed = 0
    final = NEED_MORE
    for n in read_sizes + [len(stream)]:
        chunk = stream[fed:fed + n]
        fed += len(chunk)
        answer = reader.feed(chunk)
        if final is NEED_MORE:
            assert answer == server_name(stream[:fed]) or answer is server_name(stream[:fed])
            final = answer
        else:
            assert answer is final or answer == final  # settled: later bytes change nothing


def test_reader_takes_a_64k_hello_in_one_byte_records_one_byte_per_read():
    name = b"big.example.com"
    sni_ext = struct.pack("!HH", 0, len(name) + 5) + struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    padding = struct.pack("!HH", 21, 60000) + bytes(60000)  # RFC 7685 padding extension
    ext = sni_ext + padding
    body = (b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(ext)) + ext)
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    stream = records(msg, [1] * len(msg))
    assert len(stream) == 6 * len(msg) > 360000
    reader = ClientHelloReader()
    answers = [reader.feed(stream[i:i + 1]) for i in range(len(stream))]
    assert answers[-1] == "big.example.com"
    assert all(a is NEED_MORE for a in answers[:-1])
