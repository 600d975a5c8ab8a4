"""The small seams between a listener and the shared proxy engine.

A listener (the explicit proxy, or 15001/15006/15008 opened by the agent inside
pod network namespaces) hands every accepted connection a ``ListenerContext``: who
the workload on this side is, where the connection was meant to go (when the
listener knows it, e.g. from SO_ORIGINAL_DST), how upstream connections are
opened (``Connector``: plain TCP, or the mTLS tunnel) and which
inbound authorization hook applies (``InboundAuthorizer``: L4 at connect, L7
per request). The engine only calls these; it never guesses identities.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

PROXY_SOCKET_MARK = 0x539


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """The workload on one side of a connection, as metrics and policies see it."""

    namespace: str
    name: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    principal: str = ""  # "<trust-domain>/ns/<ns>/sa/<sa>" once mTLS proves it

    @property
    def app(self) -> str:
        return self.labels.get("app", self.labels.get("app.kubernetes.io/name", "unknown"))

    @property
    def version(self) -> str:
        return self.labels.get("version", self.labels.get("app.kubernetes.io/version", "unknown"))


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What is known about a downstream connection when it is accepted."""

    remote: tuple[str, int]
    local: tuple[str, int]
    original_destination: tuple[str, int] | None
    peer_principal: str = ""  # set by the 15008 tunnel after the mTLS handshake


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The L7 facts an inbound authorization hook may look at."""

    method: str
    path: str
    authority: str
    headers: Mapping[str, str]


class InboundAuthorizer(Protocol):
    """Inbound authorization hook: L4 when a connection is accepted, L7 per request.

    Both return None to allow, or a short reason string to deny (the engine
    answers 403 with flag RBAC / closes the connection).
    """

    def authorize_connection(self, peer: PeerInfo) -> str | None: ...

    def authorize_request(self, peer: PeerInfo, request: RequestInfo) -> str | None: ...


class Connector(Protocol):
    """Opens an upstream byte stream to an endpoint (plain TCP, or later the mTLS tunnel)."""

    async def connect(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        address: str,
        port: int,
        timeout: float,
    ) -> tuple[asyncio.Transport, asyncio.Protocol]: ...


class PlainConnector:
    """Plain TCP to the endpoint; optionally marks the socket so capture rules skip it."""

    __slots__ = ("mark",)

    def __init__(self, mark: int | None = None) -> None:
        self.mark = mark

    async def connect(self, protocol_factory, address, port, timeout):
        loop = asyncio.get_running_loop()
        if self.mark is None:
            coro = loop.create_connection(protocol_factory, address, port)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
            except BaseException:
                sock.close()
                raise
            coro = loop.create_connection(protocol_factory, sock=sock)
        return await asyncio.wait_for(coro, timeout)


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """Everything the engine needs to know about the listener that accepted a connection.

    ``source``: the workload sending outbound traffic through this listener
    (None for inbound listeners, where the peer identity comes from mTLS).
    ``fixed_destination``: (service host, port) for a listener bound to one
    service; transparent listeners will instead read SO_ORIGINAL_DST through
    ``original_destination``.
    """

    name: str
    source: WorkloadIdentity | None
    reporter: str = "source"
    connector: Connector = field(default_factory=PlainConnector)
    authorizer: InboundAuthorizer | None = None
    fixed_destination: tuple[str, int] | None = None
    original_destination: Callable[[socket.socket], tuple[str, int] | None] | None = None
