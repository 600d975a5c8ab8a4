"""TlsStream, the tunnel's TLS transport (OpenSSL on memory BIOs over a plain TCP transport):
bytes in order both ways, flow control, close_notify versus a bare TCP EOF, handshake failure
and timeout. Real TLS 1.3 with certificates of a real mesh CA, on loopback, on both event
loops the agents may run (uvloop and asyncio's)."""
from __future__ import annotations

import asyncio
import os
import ssl
import time

import pytest
import uvloop

from nodeagent.identity.ca import CADirectory
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import build_context
from nodeagent.proxy.tunnel import READ_BUFFER, TlsStream
from tests.integration.test_tunnel import adhoc

pytestmark = pytest.mark.timeout(30)

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    directory = CADirectory.init(tmp_path_factory.mktemp("tls-stream") / "ca", now=time.time() - 60)
    bundle = directory.trust_bundle(time.time())
    server = build_context(True, adhoc(directory, SpiffeId.workload("shop", "b")), bundle)
    client = build_context(False, adhoc(directory, SpiffeId.workload("shop", "a")), bundle)
    return server, client


class App(asyncio.Protocol):
    """Records every event the stream gives it, in order."""

    def __init__(self) -> None:
        self.events: list = []
        self.data = bytearray()
        self.transport = None
        self.made = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.keep_open_on_eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.events.append("made")
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data

    def eof_received(self):
        self.events.append("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc) -> None:
        self.events.append(("lost", exc))
        self.lost.set_result(exc)


async def pair(server_ctx, client_ctx, *, timeout: float = 5.0):
    """A server and a client TlsStream joined over loopback TCP; returns (server app, client app,
    server handshake outcomes, client handshake outcomes, the listener)."""
    loop = asyncio.get_running_loop()
    server_apps: list[App] = []
    outcomes: dict[str, list] = {"server": [], "client": []}

    def accept():
        app = App()
        server_apps.append(app)
        return TlsStream(server_ctx, app, server_side=True, handshake_timeout=timeout,
                         on_handshake=outcomes["server"].append)

    listener = await loop.create_server(accept, "127.0.0.1", 0)
    client = App()
    await loop.create_connection(
        lambda: TlsStream(client_ctx, client, server_side=False, handshake_timeout=timeout,
                          on_handshake=outcomes["client"].append),
        *listener.sockets[0].getsockname()[:2])
    await asyncio.wait_for(client.made, 5)
    for _ in range(100):
        if server_apps and server_apps[0].transport is not None:
            break
        await asyncio.sleep(0.01)
    return server_apps[0], client, outcomes, listener


async def until(cond, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_bytes_flow_both_ways_in_order_and_pause_holds_received_records(contexts, loop_name):
    async def scenario():
        server, client, outcomes, listener = await pair(*contexts)
        try:
            assert outcomes == {"server": [None], "client": [None]}
            st, ct = server.transport, client.transport
            assert st.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert st.get_extra_info("peername")[0] == "127.0.0.1"
            assert st.get_extra_info("socket") is not None and not st.can_write_eof()
            chunks = [os.urandom(n) for n in (1, 100, 16384, 16385, 3 * READ_BUFFER + 7, 5)]
            for chunk in chunks:
                ct.write(chunk)
            want = b"".join(chunks)
            await until(lambda: len(server.data) == len(want))
            assert bytes(server.data) == want
            st.writelines([b"re", b"ply"])
            await until(lambda: client.data == b"reply")

            st.pause_reading()
            before = len(server.data)
            for i in range(20):  # 20 records arrive while paused: none is handed on
                ct.write(b"%03d" % i)
            await asyncio.sleep(0.2)
            assert len(server.data) == before
            st.resume_reading()
            await until(lambda: len(server.data) == before + 60)
            assert bytes(server.data[before:]) == b"".join(b"%03d" % i for i in range(20))
        finally:
            client.transport.abort()
            listener.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_reader_that_stops_pauses_the_writer_and_everything_arrives_after(contexts, loop_name):
    """Write flow control is the TCP transport's: its pause_writing/resume_writing reach the app."""
    async def scenario():
        server, client, _, listener = await pair(*contexts)
        try:
            client.transport.pause_reading()
            server.transport.set_write_buffer_limits(high=65536)
            payload = os.urandom(8 * 1024 * 1024)
            for i in range(0, len(payload), 65536):
                server.transport.write(payload[i:i + 65536])
            await until(lambda: "pause_writing" in server.events)
            assert server.transport.get_write_buffer_size() > 65536
            assert len(client.data) < len(payload)
            client.transport.resume_reading()
            await until(lambda: len(client.data) == len(payload), 20)
            assert bytes(client.data) == payload
            await until(lambda: "resume_writing" in server.events)
        finally:
            client.transport.abort()
            listener.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_close_sends_close_notify_after_queued_data_and_eof_is_not_close_notify(contexts, loop_name):
    async def scenario():
        server, client, _, listener = await pair(*contexts)
        try:
            # The client reads everything the server sent (TLS 1.3 session tickets, then "hi")
            # first: a socket closed with unread bytes answers with a TCP reset, not a FIN.
            server.transport.write(b"hi")
            await until(lambda: client.data == b"hi")
            client.transport.write(b"last words")
            client.transport.close()
            client.transport.write(b"dropped")  # after close: ignored, no exception
            assert await asyncio.wait_for(server.lost, 5) is None
            assert bytes(server.data) == b"last words"
            assert server.events == ["made", "eof", ("lost", None)]  # close_notify, then closed
            await asyncio.wait_for(client.lost, 5)

            # A TCP FIN without close_notify: connection_lost only, as asyncio's TLS transports do.
            server2, client2, _, listener2 = await pair(*contexts)
            try:
                server2.transport.write(b"hi")
                await until(lambda: client2.data == b"hi")
                client2.transport.tcp.close()
                await asyncio.wait_for(server2.lost, 5)
                assert server2.events == ["made", ("lost", None)]
            finally:
                listener2.close()
        finally:
            listener.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(scenario())


def test_handshake_failure_and_timeout_are_reported_and_never_reach_the_app(contexts, tmp_path):
    server_ctx, _ = contexts

    async def scenario():
        loop = asyncio.get_running_loop()
        apps: list[App] = []
        outcomes: list = []

        def accept():
            app = App()
            apps.append(app)
            return TlsStream(server_ctx, app, server_side=True, handshake_timeout=0.3, on_handshake=outcomes.append)

        listener = await loop.create_server(accept, "127.0.0.1", 0)
        addr = listener.sockets[0].getsockname()[:2]
        try:
            # A client that says nothing: the handshake times out and the connection closes.
            reader, writer = await asyncio.open_connection(*addr)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert isinstance(outcomes[0], TimeoutError)
            writer.close()

            # A client without a certificate: the handshake fails, the app never hears of it.
            anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            anonymous.check_hostname = False
            anonymous.verify_mode = ssl.CERT_NONE
            try:
                reader, writer = await asyncio.open_connection(*addr, ssl=anonymous)
                writer.write(b"GET / HTTP/1.1\r\n\r\n")
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
            except (ssl.SSLError, ConnectionError):
                pass
            await until(lambda: len(outcomes) == 2)
            assert isinstance(outcomes[1], (ssl.SSLError, ConnectionError))
            assert all(app.events == [] for app in apps)
        finally:
            listener.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
