"""Real HTTP/2 test upstreams on loopback: a grpcio server, and a small h2 server whose
streams misbehave on request (resets, slow answers, a low SETTINGS_MAX_CONCURRENT_STREAMS)."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded
from h2.settings import SettingCodes

SERVICE = "test.Echo"


class GrpcServer:
    """A grpcio server of ``test.Echo`` (raw bytes messages, no protobuf):

    - ``Which``: answers the server's name (``fail`` set: UNAVAILABLE);
    - ``Echo``: the request back; ``Stream``: N numbered messages (N = the request);
    - ``Collect``: client streaming, answers total bytes received;
    - ``Bidi``: every message back upper-cased;
    - ``Sleep``: answers after the request's float seconds (``cancelled`` counts the calls
      whose stream was cancelled meanwhile);
    - ``Trailers``: answers, then trailing metadata ``x-trailer: yes`` and NOT_FOUND ``missing thing``.
    """

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.fail = False
        self.hits = 0
        self.seen_metadata: list[dict] = []
        self.cancelled = 0  # Sleep calls that saw their stream cancelled before they answered
        self._lock = threading.Lock()
        self.server = None
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _count(self, ctx) -> None:
        with self._lock:
            self.hits += 1
            self.seen_metadata.append(dict(ctx.invocation_metadata()))

    def start(self) -> "GrpcServer":
        def which(req, ctx):
            self._count(ctx)
            if self.fail:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is failing")
            return self.name.encode()

        def echo(req, ctx):
            self._count(ctx)
            return req

        def stream(req, ctx):
            self._count(ctx)
            for i in range(int(req)):
                yield b"%d" % i

        def big(req, ctx):
            self._count(ctx)
            chunk = b"x" * 65536
            for _ in range(int(req)):
                yield chunk

        def collect(it, ctx):
            self._count(ctx)
            return b"%d" % sum(len(m) for m in it)

        def bidi(it, ctx):
            self._count(ctx)
            for m in it:
                yield m.upper()

        def sleep(req, ctx):
            self._count(ctx)
            deadline = time.monotonic() + float(req)
            while time.monotonic() < deadline:
                if not ctx.is_active():
                    with self._lock:
                        self.cancelled += 1
                    return b""
                time.sleep(0.01)
            return b"slept"

        def trailers(req, ctx):
            self._count(ctx)
            ctx.set_trailing_metadata((("x-trailer", "yes"),))
            ctx.abort(grpc.StatusCode.NOT_FOUND, "missing thing")

        handlers = {
            "Which": grpc.unary_unary_rpc_method_handler(which),
            "Second": grpc.unary_unary_rpc_method_handler(which),
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Big": grpc.unary_stream_rpc_method_handler(big),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Trailers": grpc.unary_unary_rpc_method_handler(trailers),
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port(f"{self.host}:0")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait(5)


class _H2ServerProtocol(asyncio.Protocol):
    def __init__(self, owner: "RawH2Server") -> None:
        self.owner = owner
        self.conn = H2Connection(config=H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport = None
        self.active = 0
        self.paths: dict[int, str] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.owner.connections += 1
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.owner.max_streams})
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                headers = dict(event.headers)
                self.paths[event.stream_id] = headers[":path"]
                self.active += 1
                self.owner.max_active = max(self.owner.max_active, self.active)
            elif isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._answer(event.stream_id)
        self.transport.write(self.conn.data_to_send())

    def _answer(self, sid: int) -> None:
        path = self.paths.get(sid, "")
        grpc_ok = [(":status", "200"), ("content-type", "application/grpc")]
        message = b"\x00\x00\x00\x00\x02ok"  # one uncompressed gRPC message: "ok"
        self.owner.hits.append(path)
        if path.endswith("/ResetBefore"):
            self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            self.active -= 1
        elif path.endswith("/ResetAfter"):
            self.conn.send_headers(sid, grpc_ok)
            self.conn.send_data(sid, message)
            self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            self.active -= 1
        elif path.endswith("/GoAway"):
            self.conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
            self.active -= 1
        else:
            self.conn.send_headers(sid, grpc_ok)
            self.conn.send_data(sid, message)
            delay = self.owner.delay
            if delay:
                asyncio.get_running_loop().call_later(delay, self._trailers, sid)
            else:
                self._trailers(sid)

    def _trailers(self, sid: int) -> None:
        self.conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        self.active -= 1
        self.transport.write(self.conn.data_to_send())


class RawH2Server:
    """An h2 (prior knowledge) server in a background thread: answers every stream with one
    gRPC message "ok" and grpc-status 0 (after ``delay`` seconds), except paths ending in
    ``/ResetBefore`` (RST_STREAM before any response), ``/ResetAfter`` (headers, one message,
    then RST_STREAM) and ``/GoAway`` (GOAWAY with last stream 0). It advertises
    SETTINGS_MAX_CONCURRENT_STREAMS = ``max_streams`` and records the highest number of
    streams it saw active on one connection (``max_active``) and its ``connections``."""

    def __init__(self, max_streams: int = 100, delay: float = 0.0) -> None:
        self.max_streams = max_streams
        self.delay = delay
        self.connections = 0
        self.max_active = 0
        self.hits: list[str] = []
        self.port = 0
        self._loop = None
        self._server = None
        self._thread = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> "RawH2Server":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                loop.create_server(lambda: _H2ServerProtocol(self), "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
