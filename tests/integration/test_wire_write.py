"""upstream.wire_write: the proxy's writes go straight to the socket with send(2) only
when that is the same as transport.write (uvloop's plain TCP transport, nothing buffered,
not closing); real sockets on loopback, a real TLS server, uvloop's own transports."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import time

import pytest
import uvloop

from nodeagent import accel
from nodeagent.proxy import upstream
from nodeagent.proxy.upstream import direct_fd, wire_write
from tests.integration.tls_upstream import TestCA

BLOCK = 256 * 1024


def block(i: int) -> bytes:
    return i.to_bytes(8, "big") * (BLOCK // 8)


def _run(coro):
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 20))
    finally:
        loop.close()


class _Quiet(asyncio.Protocol):
    def data_received(self, data) -> None:
        pass


def test_direct_writes_are_on_exactly_when_the_request_path_is_compiled():
    compiled = accel.status()["nodeagent.proxy.upstream"]
    assert upstream.DIRECT_WRITES == (compiled and os.environ.get("NODEAGENT_DIRECT_WRITES", "1") != "0")
    if os.environ.get("CI"):
        assert upstream.DIRECT_WRITES, "CI runs the compiled request path, direct writes included"


def test_direct_fd_is_the_socket_of_a_plain_uvloop_tcp_transport_only(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    ca = TestCA(tmp_path, "wire")
    cert, key = ca.issue("wire.test", dns=["wire.test"])
    tls_server = socket.create_server(("127.0.0.1", 0))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def accept_tls() -> None:
        conn, _ = tls_server.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass

    threading.Thread(target=accept_tls, daemon=True).start()

    async def main():
        loop = asyncio.get_running_loop()
        plain, _ = await loop.create_connection(_Quiet, *server.getsockname())
        client_ctx = ssl.create_default_context(cafile=str(ca.cert_file))
        tls, _ = await loop.create_connection(_Quiet, *tls_server.getsockname(), ssl=client_ctx,
                                              server_hostname="wire.test")
        try:
            fd = plain.get_extra_info("socket").fileno()
            assert direct_fd(plain) == (fd if upstream.DIRECT_WRITES else -1)
            # a TLS transport's socket carries ciphertext: never written to directly
            assert tls.get_extra_info("socket") is not None
            assert direct_fd(tls) == -1
        finally:
            plain.close()
            tls.close()

    try:
        _run(main())
    finally:
        server.close()
        tls_server.close()

    # asyncio's own selector transports are not uvloop's: their buffering is not ours to know
    async def selector_main():
        loop = asyncio.get_running_loop()
        srv = socket.create_server(("127.0.0.1", 0))
        try:
            transport, _ = await loop.create_connection(_Quiet, *srv.getsockname())
            assert direct_fd(transport) == -1
            transport.close()
        finally:
            srv.close()

    asyncio.run(selector_main())


def test_writes_keep_their_order_when_the_kernel_pushes_back():
    """A peer that does not read: the first sends go straight out, then come back short or
    EAGAIN and the rest is buffered by the transport; later writes must queue behind it."""
    server = socket.create_server(("127.0.0.1", 0))
    count = 96
    received = hashlib.sha256()
    got = [0]
    done = threading.Event()
    go = threading.Event()

    def reader() -> None:
        conn, _ = server.accept()
        with conn:
            go.wait(10)
            while got[0] < count * BLOCK:
                data = conn.recv(1 << 20)
                if not data:
                    break
                received.update(data)
                got[0] += len(data)
        done.set()

    threading.Thread(target=reader, daemon=True).start()

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(_Quiet, *server.getsockname())
        transport.set_write_buffer_limits(1 << 30)
        fd = direct_fd(transport)
        half = count // 2
        for i in range(half):
            wire_write(transport, fd, block(i))
        assert transport.get_write_buffer_size() > 0, "the kernel never pushed back: the buffered path was not reached"
        # The peer starts reading while the transport still holds bytes (the loop is blocked
        # here, so it cannot flush them): the kernel takes bytes again, and a direct send now
        # would overtake what the transport holds.
        go.set()
        time.sleep(0.05)
        for i in range(half, count):
            wire_write(transport, fd, block(i))
        while transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, done.wait, 10)
        transport.close()

    try:
        _run(main())
    finally:
        server.close()
    expected = hashlib.sha256(b"".join(block(i) for i in range(count)))
    assert got[0] == count * BLOCK
    assert received.hexdigest() == expected.hexdigest(), "blocks reordered or lost"


def test_a_closed_transport_is_never_written_to_directly():
    """After close() uvloop closes the descriptor and the kernel may give its number to the
    next socket: a late write on the old connection must not land on the new one."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)

    async def main():
        loop = asyncio.get_running_loop()
        old, _ = await loop.create_connection(_Quiet, *server.getsockname())
        old_peer, _ = server.accept()
        fd = direct_fd(old)
        old.close()
        await asyncio.sleep(0.05)  # the handle is closed, the descriptor freed
        new, _ = await loop.create_connection(_Quiet, *server.getsockname())
        new_peer, _ = server.accept()
        try:
            reused = new.get_extra_info("socket").fileno() == fd
            with pytest.raises(RuntimeError):  # what old.write() itself answers once closed
                wire_write(old, fd, b"leaked")
            new.write(b"mine")
            new_peer.settimeout(2)
            assert new_peer.recv(100) == b"mine"
            return reused
        finally:
            new.close()
            old_peer.close()
            new_peer.close()

    try:
        reused = _run(main())
    finally:
        server.close()
    if upstream.DIRECT_WRITES:
        assert reused, "the descriptor was not reused: the test did not check what it is for"
