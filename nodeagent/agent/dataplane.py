"""The proxy runtime in the agent's event loop, and each enrolled workload's
transparent listeners.

A netns workload (a pod) gets, opened INSIDE its namespace from this process:

- 15001 outbound: the source identity is the enrolled workload (the listener
  says who is calling), the destination comes from SO_ORIGINAL_DST, and the
  proxy's engine routes it (VirtualService, DestinationRule, outlier
  detection); upstream connections are opened from inside the pod's
  namespace with mark 0x539 (the capture rules let them through, and the
  source address stays the pod's);
- 15006 inbound plaintext: PeerAuthentication (STRICT refuses plaintext) and
  AuthorizationPolicy are checked at connect, then the bytes are relayed to
  the original destination. Policies that need HTTP attributes cannot be
  decided at connect: such connections are refused (fail closed) until the
  proxy's inbound HTTP path exists.

A cgroup workload (host mode) gets one outbound listener on 127.0.0.1 at the
port the capture backend assigned to it.

Nothing here decides policy: ``policy.authz``/``policy.peerauthn`` do.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Callable

from policy.authz import AuthorizationIndex, Connection, evaluate, needs_l7
from policy.peerauthn import PeerAuthenticationIndex, accepts

from nodeagent.agent.capture import Capture, CaptureError
from nodeagent.agent.workload import WorkloadSpec, netns_path
from nodeagent.proxy.context import ListenerContext, PlainConnector, WorkloadIdentity
from nodeagent.proxy.runtime import Limits, ProxyRuntime
from nodeagent.proxy.tcp import DispatchProtocol, TcpRelay
from redirect import PROXY_MARK, marked_socket, original_dst, run_in_netns
from redirect import CaptureError as RedirectError
from redirect.plan import INBOUND_PORT, OUTBOUND_PORT

log = logging.getLogger("nodeagent.agent.dataplane")
IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)


def _original_dst_or_none(sock: socket.socket) -> tuple[str, int] | None:
    try:
        return original_dst(sock)
    except OSError:
        return None


class NetnsConnector:
    """Upstream TCP from inside a workload's namespace, marked so capture skips it."""

    __slots__ = ("netns", "mark")

    def __init__(self, netns: str, mark: int = PROXY_MARK) -> None:
        self.netns = netns
        self.mark = mark

    async def connect(self, protocol_factory, address, port, timeout):
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = marked_socket(family, netns=self.netns, mark=self.mark)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
        except BaseException:
            sock.close()
            raise
        return await loop.create_connection(protocol_factory, sock=sock)


@dataclass
class _Attached:
    spec: WorkloadSpec
    outbound: ListenerContext
    inbound: ListenerContext | None
    servers: list[asyncio.AbstractServer]
    sockets: list[socket.socket]


class DataPlane:
    def __init__(self, snapshots: Callable[[], object], telemetry, trust_domain: str,
                 limits: Limits | None = None) -> None:
        self.snapshots = snapshots
        self.telemetry = telemetry
        self.trust_domain = trust_domain
        self.limits = limits or Limits()
        self.runtime: ProxyRuntime | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.attached: dict[tuple[str, str], _Attached] = {}
        self._policy_cache: tuple[int, AuthorizationIndex, PeerAuthenticationIndex] | None = None
        self.host_port_of: Callable[[WorkloadSpec], int | None] = lambda spec: None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.runtime = ProxyRuntime(self.snapshots, self.telemetry, self.limits)
        self.runtime.start()

    async def close(self) -> None:
        for key in list(self.attached):
            self._close(self.attached.pop(key))
        if self.runtime is not None:
            await self.runtime.close()

    # -- listeners (called from the reconciler's worker thread) ----------------

    def attach(self, spec: WorkloadSpec) -> None:
        """Open the workload's listeners (idempotent; a changed spec updates the contexts)."""
        current = self.attached.get(spec.key)
        outbound, inbound = self._contexts(spec)
        if current is not None:
            current.spec, current.outbound, current.inbound = spec, outbound, inbound
            return
        if spec.kind == "netns":
            netns = netns_path(spec.target)
            sockets = _listen_in_netns(netns, OUTBOUND_PORT) + _listen_in_netns(netns, INBOUND_PORT)
        else:
            port = self.host_port_of(spec)
            if port is None:
                raise CaptureError(f"{spec.ref}: no outbound listener port assigned by the capture backend")
            sockets = [_listen_host(port)]
        entry = _Attached(spec, outbound, inbound, [], sockets)
        try:
            future = asyncio.run_coroutine_threadsafe(self._serve(entry), self.loop)
            future.result(timeout=10)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self.attached[spec.key] = entry

    def detach(self, spec: WorkloadSpec) -> None:
        entry = self.attached.pop(spec.key, None)
        if entry is not None:
            self.loop.call_soon_threadsafe(self._close, entry)

    async def _serve(self, entry: _Attached) -> None:
        key = entry.spec.key
        for sock in entry.sockets:
            inbound = sock.getsockname()[1] == INBOUND_PORT and entry.spec.kind == "netns"
            factory = (lambda k=key: self._inbound_protocol(k)) if inbound else (lambda k=key: self._outbound_protocol(k))
            entry.servers.append(await self.loop.create_server(factory, sock=sock, backlog=1024))

    def _close(self, entry: _Attached) -> None:
        for server in entry.servers:
            server.close()
        for sock in entry.sockets:
            sock.close()

    def _outbound_protocol(self, key) -> asyncio.Protocol:
        return DispatchProtocol(self.runtime, self.attached[key].outbound)

    def _inbound_protocol(self, key) -> asyncio.Protocol:
        return InboundGate(self, self.attached[key])

    def _contexts(self, spec: WorkloadSpec) -> tuple[ListenerContext, ListenerContext | None]:
        identity = WorkloadIdentity(namespace=spec.namespace, name=spec.name, service_account=spec.service_account,
                                    labels=dict(spec.labels),
                                    principal=f"{self.trust_domain}/ns/{spec.namespace}/sa/{spec.service_account}")
        if spec.kind == "netns":
            connector = NetnsConnector(netns_path(spec.target))
            outbound = ListenerContext(f"outbound {spec.namespace}/{spec.name}", identity, connector=connector,
                                       original_destination=_original_dst_or_none)
            inbound = ListenerContext(f"inbound {spec.namespace}/{spec.name}", None, reporter="destination",
                                      connector=connector, original_destination=_original_dst_or_none)
            return outbound, inbound
        outbound = ListenerContext(f"outbound {spec.namespace}/{spec.name}", identity,
                                   connector=PlainConnector(mark=PROXY_MARK), original_destination=_original_dst_or_none)
        return outbound, None

    # -- inbound policy ---------------------------------------------------------

    def inbound_denial(self, spec: WorkloadSpec, remote: tuple[str, int], dest: tuple[str, int] | None) -> str | None:
        """None to admit a plaintext inbound connection, else why it is refused."""
        if dest is None:
            return "no original destination (the connection was not redirected)"
        snapshot = self.snapshots()
        cache = self._policy_cache
        if cache is None or cache[0] != snapshot.version:
            cache = (snapshot.version, AuthorizationIndex(snapshot, trust_domain=self.trust_domain),
                     PeerAuthenticationIndex(snapshot))
            self._policy_cache = cache
        _, authz, peerauthn = cache
        mode = peerauthn.mode(spec.namespace, spec.labels, dest[1])
        if not accepts(mode, is_mtls=False):
            return f"PeerAuthentication {mode} for {spec.namespace}/{spec.name} port {dest[1]}: plaintext refused"
        policies = authz.for_workload(spec.namespace, spec.labels)
        if needs_l7(policies):
            return (f"an AuthorizationPolicy for {spec.namespace}/{spec.name} needs HTTP attributes, which the "
                    "agent cannot check on a plaintext inbound connection yet: refused (fail closed)")
        verdict = evaluate(policies, Connection(source_ip=remote[0], destination_ip=dest[0], destination_port=dest[1]))
        return None if verdict.allowed else verdict.reason

    # -- views --------------------------------------------------------------

    def listeners_view(self) -> list[dict]:
        out = []
        for entry in sorted(self.attached.values(), key=lambda e: e.spec.key):
            out.append({"workload": f"{entry.spec.namespace}/{entry.spec.name}", "kind": entry.spec.kind,
                        "target": entry.spec.target,
                        "listeners": [_addr(s) for s in entry.sockets]})
        return out


class InboundGate(asyncio.Protocol):
    """Checks an inbound plaintext connection, then hands it to a byte relay."""

    def __init__(self, plane: DataPlane, entry: _Attached) -> None:
        self.plane = plane
        self.entry = entry
        self.next: asyncio.Protocol | None = None

    def connection_made(self, transport) -> None:
        runtime = self.plane.runtime
        ctx = self.entry.inbound
        peer = runtime.peer_info(ctx, transport)
        reason = self.plane.inbound_denial(self.entry.spec, peer.remote, peer.original_destination)
        if reason is not None:
            log.info("inbound %s:%s -> %s denied: %s", *peer.remote, peer.original_destination, reason)
            transport.abort()
            return
        self.next = TcpRelay(runtime, ctx, peer, None, passthrough=peer.original_destination)
        transport.set_protocol(self.next)
        self.next.connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self.next is not None:
            self.next.connection_lost(exc)


class DataPlaneCapture:
    """Capture = the workload's listeners first, then the kernel rules that feed them
    (so rules never point at nothing); removal in the reverse order."""

    def __init__(self, inner: Capture, plane: DataPlane) -> None:
        self.inner = inner
        self.plane = plane
        self.mode = inner.mode
        plane.host_port_of = getattr(inner, "host_port", lambda spec: None)

    def apply(self, spec: WorkloadSpec) -> None:
        if spec.kind == "cgroup":
            self.inner.apply(spec)  # assigns the cgroup's listener port
            self.plane.attach(spec)
            return
        try:
            self.plane.attach(spec)
        except (OSError, TimeoutError) as exc:
            raise CaptureError(f"{spec.ref}: cannot open the proxy's listeners: {exc}") from None
        self.inner.apply(spec)

    def remove(self, spec: WorkloadSpec) -> None:
        self.inner.remove(spec)
        self.plane.detach(spec)

    def sweep(self, keep):
        return self.inner.sweep(keep)


def _listen_in_netns(netns: str, port: int) -> list[socket.socket]:
    """IPv4 and (when the namespace has it) IPv6 listeners on ``port`` inside ``netns``."""

    def make() -> list[socket.socket]:
        made = []
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue  # no IPv6 in this namespace/kernel
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
                sock.bind((host, port))
                sock.listen(1024)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and exc.errno in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL
                    continue
                for s in made:
                    s.close()
                raise CaptureError(f"cannot listen on {host}:{port} in {netns}: {exc.strerror or exc}") from None
            made.append(sock)
        return made

    try:
        return run_in_netns(netns, make)
    except CaptureError:
        raise
    except (RedirectError, OSError, TimeoutError) as exc:
        raise CaptureError(str(exc)) from None


def _listen_host(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise CaptureError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    return sock


def _addr(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "closed"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
