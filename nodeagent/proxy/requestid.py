"""x-request-id values as Envoy makes them: random (version 4) RFC 4122 UUIDs in text form.

Envoy's generator (``Random::RandomUtility::uuid``) takes 16 bytes from a per-thread buffer of
2048 bytes filled by BoringSSL's ``RAND_bytes`` (a CSPRNG), sets the version nibble to 4 and
the variant bits to 10, and prints them as ``8-4-4-4-12`` lower-case hex digits. This module
does the same with a 4096-byte buffer filled by OpenSSL's ``RAND_bytes`` (``ssl.RAND_bytes``:
OpenSSL's DRBG, seeded from the kernel and fork-safe; ~1.1 µs per 4096 bytes, where
getrandom(2) takes ~7 µs), so an id costs 16 bytes of a buffer and 32 hex digits.
Compiled (nodeagent/accel.py), C writes the digits two at a time from a 512-byte table into a
new ``bytes``; as Python, ``bytes.hex`` and one format do it. Both take the same 16 bytes
from the same buffer and give the same text for them (tests/unit/test_requestid.py checks
one against the other and both against the standard library's ``uuid.UUID``).

The ids are as unpredictable as a CSPRNG's output (a fast non-cryptographic generator would
let whoever sees a few ids predict the next ones), but an id is a correlation handle, not a
secret or a token: clients may send their own, so nothing may authorize on it.

The buffer is per process. A forked child (the proxy's workers) drops the copy it inherited
(``os.register_at_fork``), so parent and child never hand out the same ids. It is used from
one thread (the process's event loop).
"""
from __future__ import annotations

import os
from ssl import RAND_bytes  # already imported by the proxy (TLS); _ssl's C function

POOL_BYTES = 4096  # random bytes fetched at once: 256 ids per RAND_bytes call
_LAST = POOL_BYTES - 16  # the last position an id can start at
HEADER = b"x-request-id: "  # new_request_id_line(): the header line the HTTP/1.1 engine forwards
# What the compiled formatter starts from: the hyphens are in place, the digits overwritten.
_TEMPLATE = b"00000000-0000-4000-8000-000000000000"
_LINE_TEMPLATE = HEADER + _TEMPLATE + b"\r\n"
_PAIRS = "".join("%02x" % i for i in range(256)).encode("ascii")  # byte i's two digits at 2 * i
_VARIANT = "89ab"  # the variant digit: 10 in the top two bits, then two random bits

_pool = b""
_pos = POOL_BYTES  # where the next id starts in _pool; past _LAST: fetch a new pool first
# Whether this module runs compiled (its __file__ is then the extension module): the C
# formatter is used only then (it calls functions only the .pxd declares).
COMPILED = not __file__.endswith(".py")
_compiled = COMPILED


def _take():
    """The position of the next 16 unused bytes of _pool (refilled when used up)."""
    global _pool, _pos
    pos = _pos
    if pos > _LAST:
        _pool = RAND_bytes(POOL_BYTES)
        pos = 0
    _pos = pos + 16
    return pos


def new_request_id() -> bytes:
    """A new random UUID (version 4) as 36 ASCII bytes, e.g. b"1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b"."""
    pos = _take()
    if _compiled:
        return _format_c(_TEMPLATE, 0, _pool, pos)
    return _format_py(_pool, pos)


def new_request_id_line() -> bytes:
    """A new id as the header line b"x-request-id: <uuid>\\r\\n" (52 bytes), made in one piece."""
    pos = _take()
    if _compiled:
        return _format_c(_LINE_TEMPLATE, 14, _pool, pos)
    return HEADER + _format_py(_pool, pos) + b"\r\n"


def format_uuid4(raw: bytes) -> bytes:
    """The text form of the version 4 UUID made of 16 random bytes ``raw`` (its version and
    variant bits overwritten), by the same formatter new_request_id uses."""
    if len(raw) != 16:
        raise ValueError(f"a UUID is made of 16 bytes, not {len(raw)}")
    if _compiled:
        return _format_c(_TEMPLATE, 0, bytes(raw), 0)
    return _format_py(raw, 0)


def _format_py(pool, pos):
    """Python: byte 6's high nibble becomes 4 (the version), byte 8's top two bits 10 (the variant)."""
    h = pool[pos:pos + 16].hex()
    return ("%s-%s-4%s-%s%s-%s" % (h[:8], h[8:12], h[13:16], _VARIANT[int(h[16], 16) & 3],
                                   h[17:20], h[20:])).encode("ascii")


def _format_c(template, at, pool, pos):
    """Compiled only: a copy of ``template`` with the UUID made of pool[pos:pos + 16] written
    at offset ``at``. The copy is new and nobody else holds it yet: filling it in place is safe."""
    out = PyBytes_FromStringAndSize(template, len(template))  # noqa: F821 (declared in requestid.pxd)
    dst = PyBytes_AS_STRING(out) + at  # noqa: F821
    src = pool
    src += pos
    pairs = _PAIRS
    # where byte i's two digits go: 8-4-4-4-12, around the hyphens at 8, 13, 18 and 23
    offsets = b"\x00\x02\x04\x06\x09\x0b\x0e\x10\x13\x15\x18\x1a\x1c\x1e\x20\x22"
    for i in range(16):
        memcpy(dst + offsets[i], pairs + 2 * src[i], 2)  # noqa: F821
    dst[14] = 52  # "4": the version nibble
    variants = b"89ab"
    dst[19] = variants[(src[8] >> 4) & 3]  # the variant: 10, then byte 8's bits 5 and 4
    return out


def _forget_pool() -> None:
    """In a forked child: the inherited buffer is the parent's; fetch a new one first."""
    global _pool, _pos
    _pool = b""
    _pos = POOL_BYTES


os.register_at_fork(after_in_child=_forget_pool)
