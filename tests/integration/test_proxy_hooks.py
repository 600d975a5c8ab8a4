"""The listener seams the transparent listeners will use: the inbound
authorization hook (L4 at accept, L7 per request) and the upstream connector,
exercised in-process on a real loop, real sockets and a real upstream."""
from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from nodeagent.proxy.context import ListenerContext, PlainConnector, WorkloadIdentity
from nodeagent.proxy.runtime import ProxyRuntime
from nodeagent.proxy.server import ListenerSpec, protocol_factory
from nodeagent.proxy.snapshots import open_config
from nodeagent.telemetry import Telemetry
from tests.integration.proxy_harness import service_config
from tests.integration.upstream import UpstreamServer

HOST = "hooked.shop.svc.cluster.local"


class PathAndAddressAuthorizer:
    """Denies one client address at connect time and /admin paths per request."""

    def __init__(self, denied_ip: str) -> None:
        self.denied_ip = denied_ip
        self.requests = []

    def authorize_connection(self, peer):
        return "address denied" if peer.remote[0] == self.denied_ip else None

    def authorize_request(self, peer, request):
        self.requests.append((request.method, request.path, request.authority))
        return "path denied" if request.path.startswith("/admin") else None


class CountingConnector(PlainConnector):
    def __init__(self) -> None:
        super().__init__()
        self.opened = []

    async def connect(self, protocol_factory, address, port, timeout):
        self.opened.append((address, port))
        return await super().connect(protocol_factory, address, port, timeout)


@pytest.fixture
def hooked(tmp_path):
    upstream = UpstreamServer("h0", host="127.0.0.71").start()
    (tmp_path / "svc.yaml").write_text(service_config("hooked", [upstream]))
    source = open_config(str(tmp_path))
    authorizer = PathAndAddressAuthorizer("127.0.0.99")
    connector = CountingConnector()
    ctx = ListenerContext("inbound-test", WorkloadIdentity("shop", "hooked"), reporter="destination",
                          connector=connector, authorizer=authorizer)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    def run():
        asyncio.set_event_loop(loop)

        async def main():
            runtime = ProxyRuntime(source.current, Telemetry())
            runtime.start()
            spec = ListenerSpec(("127.0.0.1", 0), ctx)
            server = await loop.create_server(protocol_factory(runtime, spec.context), "127.0.0.1", 0)
            state["port"] = server.sockets[0].getsockname()[1]
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
            server.close()
            await runtime.close()

        loop.run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    yield state["port"], authorizer, connector, upstream
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(5)
    loop.close()
    upstream.stop()


def get(port: int, path: str, source_ip: str = "127.0.0.1") -> bytes:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source_ip, 0))
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            out += part
        return out
    finally:
        sock.close()


def test_l7_hook_denies_per_request_with_403(hooked):
    port, authorizer, connector, upstream = hooked
    ok = get(port, "/public")
    assert ok.startswith(b"HTTP/1.1 200")
    assert json.loads(ok.partition(b"\r\n\r\n")[2])["path"] == "/public"
    denied = get(port, "/admin/users")
    assert denied.startswith(b"HTTP/1.1 403") and b"RBAC: access denied" in denied
    assert ("GET", "/admin/users", HOST) in authorizer.requests
    assert [r["path"] for r in upstream.requests] == ["/public"]


def test_l4_hook_refuses_the_connection(hooked):
    port, authorizer, connector, upstream = hooked
    assert get(port, "/public", source_ip="127.0.0.99") == b""
    assert upstream.hits == 0 and authorizer.requests == []


def test_upstream_connections_go_through_the_listener_connector(hooked):
    port, _, connector, upstream = hooked
    assert get(port, "/a").startswith(b"HTTP/1.1 200")
    assert connector.opened == [upstream.address]
