"""nodeagent/proxy/requestid.py: x-request-id values as Envoy makes them (RFC 4122 version 4
UUIDs in text form), the same whether the module runs compiled or as Python."""
from __future__ import annotations

import importlib.util
import os
import re
import uuid
from pathlib import Path

import pytest

from nodeagent.proxy import requestid

UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _python_copy():
    """The module's .py loaded on its own, under another name: it runs as Python whether or
    not the imported module runs compiled (tests/unit/test_accel.py checks that it does)."""
    path = Path(__file__).resolve().parents[2] / "nodeagent" / "proxy" / "requestid.py"
    spec = importlib.util.spec_from_file_location("requestid_as_python", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.COMPILED is False
    return module


PY = _python_copy()
MODES = pytest.mark.parametrize("mod", [requestid, PY], ids=["imported", "python"])


@MODES
def test_the_text_form_of_a_version_4_uuid(mod):
    for _ in range(1000):
        rid = mod.new_request_id()
        assert type(rid) is bytes and len(rid) == 36, rid
        assert [i for i, c in enumerate(rid) if c == ord("-")] == [8, 13, 18, 23], rid
        assert rid[14:15] == b"4", rid  # version
        assert rid[19:20] in (b"8", b"9", b"a", b"b"), rid  # variant 10xx
        assert UUID4.fullmatch(rid), rid
        parsed = uuid.UUID(rid.decode())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed).encode() == rid


@MODES
def test_100k_ids_are_unique(mod):
    ids = {mod.new_request_id() for _ in range(100_000)}
    assert len(ids) == 100_000


@MODES
def test_every_random_bit_varies(mod):
    """Over 2000 ids each of the 122 random bits is seen both set and clear (a bit stuck at
    one value would fail this with probability 1 - 2 * 2**-2000); the 6 fixed bits never vary."""
    ones, zeros = 0, 0
    for _ in range(2000):
        n = uuid.UUID(mod.new_request_id().decode()).int
        ones |= n
        zeros |= ~n & ((1 << 128) - 1)
    fixed = (0xF << 76) | (0x3 << 62)  # the version nibble, the variant's two bits
    assert ones & zeros == ((1 << 128) - 1) & ~fixed
    assert (ones >> 76) & 0xF == 4 and (zeros >> 76) & 0xF == 0xB  # 0100: version 4
    assert (ones >> 62) & 0x3 == 2 and (zeros >> 62) & 0x3 == 1  # 10: the RFC 4122 variant


def test_both_formatters_agree_with_the_standard_library():
    """The compiled formatter (when built) and the Python one give uuid.UUID(bytes, version=4)'s
    text for the same 16 bytes: byte 6's high nibble and byte 8's top two bits overwritten."""
    samples = [bytes(16), b"\xff" * 16, bytes(range(16)), bytes(range(240, 256))]
    samples += [os.urandom(16) for _ in range(5000)]
    for raw in samples:
        want = str(uuid.UUID(bytes=raw, version=4)).encode()
        assert requestid.format_uuid4(raw) == want, raw
        assert PY.format_uuid4(raw) == want, raw
    with pytest.raises(ValueError, match="16 bytes"):
        PY.format_uuid4(b"short")


@MODES
def test_ids_cross_the_pool_boundary(mod):
    """A pool holds POOL_BYTES // 16 ids; the ids across several refills stay valid and distinct."""
    n = 3 * mod.POOL_BYTES // 16 + 5
    ids = [mod.new_request_id() for _ in range(n)]
    assert len(set(ids)) == n and all(UUID4.fullmatch(i) for i in ids)


@MODES
@pytest.mark.parametrize("parent_refills", [False, True], ids=["parent-pool", "both-refill"])
def test_a_forked_child_does_not_repeat_its_parents_ids(mod, parent_refills):
    """The child inherits the parent's buffer of random bytes: without the fork hook both would
    hand out the same ids next. With both fetching new bytes right after the fork, the random
    source itself must not repeat in the child what the parent gets (OpenSSL reseeds a forked
    child's generator)."""
    mod.new_request_id()  # the pool is filled and partly used before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids to the parent, then exit at once
        try:
            os.close(r)
            os.write(w, b"".join(mod.new_request_id() for _ in range(8)))
        finally:
            os._exit(0)
    os.close(w)
    try:
        child = b""
        while len(child) < 8 * 36:
            part = os.read(r, 8 * 36)
            if not part:
                break
            child += part
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    theirs = {child[i:i + 36] for i in range(0, len(child), 36)}
    assert len(theirs) == 8 and all(UUID4.fullmatch(i) for i in theirs), child
    if parent_refills:
        mod._forget_pool()
    mine = {mod.new_request_id() for _ in range(8)}
    assert not mine & theirs
