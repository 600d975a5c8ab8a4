"""Read the server name (SNI) from the first bytes of a TLS connection, without terminating TLS.

This is what Envoy's ``tls_inspector`` listener filter does for the proxy's
VirtualService ``tls`` routes: look at the client's ClientHello, take the
``server_name`` extension (RFC 6066, type 0, ``host_name`` entry) and hand the
bytes on untouched.

``server_name(data)`` takes every byte the client has sent so far and answers:

- a ``str``: the ClientHello is complete and names this host (as sent; compare
  case-insensitively);
- ``None``: a complete ClientHello without a usable server name (no extension,
  no ``host_name`` entry, an empty or non-ASCII name), or a TLS handshake whose
  ClientHello is larger than ``MAX_CLIENT_HELLO``;
- ``NEED_MORE``: the bytes so far are a valid beginning of a ClientHello; call
  again with more;
- ``NOT_TLS``: the bytes are not a TLS ClientHello (another protocol, an
  SSLv2-style hello, a malformed record or message).

The ClientHello may be split across several TLS records (fragmented
handshake, RFC 8446 5.1) and records may arrive in any number of reads.
Pure: no I/O; never raises on any input.
"""
from __future__ import annotations

__all__ = ["NEED_MORE", "NOT_TLS", "MAX_CLIENT_HELLO", "ClientHelloReader", "server_name"]


class _Verdict:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_MORE = _Verdict("NEED_MORE")
NOT_TLS = _Verdict("NOT_TLS")

#: Envoy's tls_inspector default (and maximum) ``max_client_hello_size``.
MAX_CLIENT_HELLO = 64 * 1024

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_HOST_NAME = 0
_MAX_RECORD = 16384 + 256  # TLSPlaintext: 2^14; a little slack for lenient senders


def server_name(data: bytes):
    """The SNI of the ClientHello at the start of ``data``; see the module docstring."""
    return ClientHelloReader().feed(data)


class ClientHelloReader:
    """``server_name`` fed one read at a time, in time linear in the bytes fed: each record
    is examined once, the handshake bytes are joined only when the ClientHello is whole.
    ``feed(data)`` returns the same answers as ``server_name(everything fed so far)``;
    once the answer is not ``NEED_MORE`` it no longer changes."""

    __slots__ = ("_buf", "_pos", "_hs", "_need", "result")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0          # start of the first record not yet taken into _hs
        self._hs = bytearray()  # handshake bytes of the complete records before _pos
        self._need = None      # 4 + the ClientHello's length, once its header is known
        self.result = NEED_MORE

    def feed(self, data: bytes):
        if self.result is not NEED_MORE:
            return self.result
        self._buf += data
        self.result = result = self._advance()
        if result is not NEED_MORE:
            self._buf = self._hs = None
        return result

    def _advance(self):
        buf = self._buf
        n = len(buf)
        while True:
            pos = self._pos
            if pos >= n:
                return NEED_MORE
            if buf[pos] != _HANDSHAKE:
                return NOT_TLS
            if pos + 1 < n and buf[pos + 1] != 3:
                return NOT_TLS  # record version major must be 3 (SSL 3.0 .. TLS 1.3 all say 3)
            if pos + 2 < n and buf[pos + 2] > 4:
                return NOT_TLS
            if pos + 5 > n:
                if pos + 3 < n and (buf[pos + 3] << 8) > _MAX_RECORD:
                    return NOT_TLS  # the length's high byte alone is already too much
                return NEED_MORE
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if length == 0 or length > _MAX_RECORD:
                return NOT_TLS  # empty handshake records are forbidden (RFC 8446 5.1)
            start = pos + 5
            end = start + length
            have = len(self._hs)
            avail = have + min(end, n) - start  # handshake bytes known so far
            if self._need is None and avail >= 4:
                head = bytes(self._hs[:4]) + bytes(buf[start:start + max(0, 4 - have)])
                if head[0] != _CLIENT_HELLO:
                    return NOT_TLS
                need = 4 + ((head[1] << 16) | (head[2] << 8) | head[3])
                if need > MAX_CLIENT_HELLO:
                    return None  # TLS, but too large to inspect: no SNI routing (Envoy gives up too)
                if need < 4 + 2 + 32 + 1 + 2 + 1:
                    return NOT_TLS
                self._need = need
            need = self._need
            if need is not None and avail >= need:
                hs = bytes(self._hs) + bytes(buf[start:start + need - have])
                return _parse_client_hello(hs[4:need])
            if end > n:
                return NEED_MORE
            self._hs += buf[start:end]
            self._pos = end


def _parse_client_hello(body: bytes):
    end = len(body)
    p = 2 + 32  # legacy_version, random
    if p + 1 > end:
        return NOT_TLS
    sid = body[p]
    if sid > 32:
        return NOT_TLS
    p += 1 + sid
    if p + 2 > end:
        return NOT_TLS
    suites = (body[p] << 8) | body[p + 1]
    if suites < 2 or suites % 2:
        return NOT_TLS
    p += 2 + suites
    if p + 1 > end:
        return NOT_TLS
    comp = body[p]
    if comp < 1:
        return NOT_TLS
    p += 1 + comp
    if p > end:
        return NOT_TLS
    if p == end:
        return None  # no extensions at all (legal before TLS 1.2's extensions were required)
    if p + 2 > end:
        return NOT_TLS
    ext_len = (body[p] << 8) | body[p + 1]
    p += 2
    if p + ext_len != end:
        return NOT_TLS
    found = None
    seen = set()
    while p < end:
        if p + 4 > end:
            return NOT_TLS
        etype = (body[p] << 8) | body[p + 1]
        elen = (body[p + 2] << 8) | body[p + 3]
        p += 4
        if p + elen > end:
            return NOT_TLS
        if etype in seen:
            return NOT_TLS  # a repeated extension is a decode error (RFC 8446 4.2)
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            found = _host_name(body[p:p + elen])
            if found is NOT_TLS:
                return NOT_TLS
        p += elen
    return found


def _host_name(ext: bytes):
    """The host_name of a server_name extension body; None when it has none usable."""
    if len(ext) < 2:
        return NOT_TLS
    list_len = (ext[0] << 8) | ext[1]
    if list_len + 2 != len(ext) or list_len == 0:
        return NOT_TLS
    p = 2
    end = len(ext)
    name = None
    while p < end:
        if p + 3 > end:
            return NOT_TLS
        kind = ext[p]
        nlen = (ext[p + 1] << 8) | ext[p + 2]
        p += 3
        if p + nlen > end:
            return NOT_TLS
        if kind == _HOST_NAME and name is None:
            raw = ext[p:p + nlen]
            if 0 < nlen <= 255 and all(0x21 <= b < 0x7F for b in raw):
                name = raw.decode("ascii")
        p += nlen
    return name
