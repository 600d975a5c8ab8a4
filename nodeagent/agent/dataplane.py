"""The proxy runtime in the agent's event loop, and each enrolled workload's
listeners, wired from the proxy's pieces (``nodeagent.proxy``):

A netns workload (a pod) gets, opened INSIDE its namespace from this process
(a socket belongs to the namespace it was created in):

- 15001 outbound: the listener names the source workload; the destination
  comes from SO_ORIGINAL_DST; the engine routes it (VirtualService,
  DestinationRule, outlier detection); upstream goes through the mTLS tunnel
  (``TunnelConnector``: TCP to the endpoint's 15008 from inside the pod's
  namespace, mark 0x539, the SOURCE workload's certificate) when the endpoint
  is in the mesh (``MeshDirectory``: an enrolled workload here, or a
  WorkloadEntry/ServiceEntry endpoint with a service account), plaintext
  otherwise or under DestinationRule ``tls.mode: DISABLE``, TLS originated to
  the application under ``SIMPLE``/``MUTUAL`` (nodeagent.proxy.origination);
- 15006 inbound plaintext and 15008 inbound mTLS tunnel: ``InboundPlane``
  decides PeerAuthentication (STRICT refuses plaintext) and
  AuthorizationPolicy (L4 at connect, L7 per request), then serves the
  application at the original destination from inside the pod's namespace.

A cgroup workload (host mode) gets one outbound listener on 127.0.0.1 at the
port its capture backend assigned (the accepting listener names the source).
Host-mode workloads share the host's addresses, so inbound is identified by
the original destination PORT: a cgroup workload enrolled with ``ports``
is served by ONE shared host inbound listener (the capture config's inbound
port, 15006 by default, on 0.0.0.0 and [::]) that is open while any such
workload is attached; the port names the workload, then ``InboundPlane``
decides as for a pod and connects to the app with mark 0x539.

Nothing here decides policy or routing.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.agent.capture import Capture, CaptureError
from nodeagent.agent.workload import WorkloadSpec, netns_path
from nodeagent.identity import SpiffeId
from nodeagent.identity.tls import TunnelTls
from nodeagent.proxy.context import ListenerContext, PlainConnector, WorkloadIdentity
from nodeagent.proxy.inbound import InboundPlane, InboundWorkload
from nodeagent.proxy.runtime import Limits, ProxyRuntime
from nodeagent.proxy.tcp import DispatchProtocol
from nodeagent.proxy.tunnel import TUNNEL_PORT, MeshDirectory, TunnelConnector, TunnelServer
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
    """Plain upstream TCP from inside a workload's namespace, marked so capture skips it."""

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


@dataclass(slots=True)
class _Attached:
    """One attached workload's listeners. What the admin API shows of them (listeners_view)
    is read from the sockets when asked, not kept as text per pod."""
    spec: WorkloadSpec
    outbound: ListenerContext
    inbound: InboundWorkload | None
    servers: list = field(default_factory=list)  # asyncio servers: outbound, then (a pod) plaintext inbound
    tunnels: list[TunnelServer] = field(default_factory=list)

    def addresses(self, host_inbound: list) -> list[str]:
        out = []
        for server in self.servers:
            sock = server.sockets[0] if server.sockets else None
            port = _port(sock)
            kind = "plaintext" if self.spec.kind == "netns" and port == INBOUND_PORT else "outbound"
            out.append(f"{_addr(sock)} ({kind})")
        out += [f"{_addr(tunnel.server.sockets[0] if tunnel.server and tunnel.server.sockets else None)} (tunnel)"
                for tunnel in self.tunnels]
        if self.spec.kind == "cgroup" and self.inbound is not None:
            out += [f"{_addr(server.sockets[0])} (host inbound for port {p})"
                    for p in self.spec.ports for server in host_inbound]
        return out


class DataPlane:
    def __init__(self, snapshots: Callable[[], object], telemetry, tls: TunnelTls, trust_domain: str,
                 local_identity: Callable[[str], SpiffeId | None], limits: Limits | None = None,
                 access_log=None) -> None:
        self.snapshots = snapshots
        self.telemetry = telemetry
        self.access_log = access_log  # nodeagent.telemetry.AccessLog, or None (off)
        self.tls = tls
        self.trust_domain = trust_domain
        self.limits = limits or Limits()
        self.directory = MeshDirectory(snapshots, trust_domain, local=local_identity)
        self.runtime: ProxyRuntime | None = None
        self.inbound: InboundPlane | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.attached: dict[tuple[str, str], _Attached] = {}
        self.host_port_of: Callable[[WorkloadSpec], int | None] = lambda spec: None
        self.host_inbound_port: Callable[[], int | None] = lambda: None
        self.host_ports: dict[int, InboundWorkload] = {}  # declared host port -> its cgroup workload
        self._host_inbound: list = []  # the shared host inbound servers

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # ONE runtime for every workload's listeners, outbound and inbound (the inbound
        # plane and the tunnel servers use it too): its access log covers all of them.
        self.runtime = ProxyRuntime(self.snapshots, self.telemetry, self.limits, self.access_log)
        self.runtime.start()
        self.inbound = InboundPlane(self.runtime, trust_domain=self.trust_domain)
        self.inbound.start()

    async def close(self) -> None:
        for key in list(self.attached):
            self._close(self.attached.pop(key))
        if self.inbound is not None:
            await self.inbound.close()
        if self.runtime is not None:
            await self.runtime.close()

    # -- listeners (called from the reconciler's worker thread) ----------------

    def attach(self, spec: WorkloadSpec, also: Callable[[], None] | None = None) -> None:
        """Open the workload's listeners; idempotent. A changed spec (labels, service
        account, IPs) reopens them: identity and policy are bound to the listener.
        ``also`` (a pod only; it must not raise) is called inside the pod's namespace
        in the same visit, after the listeners are open; not when they were open already."""
        current = self.attached.get(spec.key)
        if current is not None:
            if current.spec == spec:
                return
            self.detach(spec, wait=True)
        entry = self._entry(spec)
        if spec.kind == "netns":
            netns = netns_path(spec.target)
            sockets = _listen_in_netns(netns, [(OUTBOUND_PORT, "outbound"), (INBOUND_PORT, "plaintext"),
                                               (TUNNEL_PORT, "tunnel")], also)
        else:
            port = self.host_port_of(spec)
            if port is None:
                raise CaptureError(f"{spec.ref}: no outbound listener port assigned by the capture backend")
            if spec.ports and self.host_inbound_port() is None:
                raise CaptureError(f"{spec.ref}: declares ports {list(spec.ports)} but this capture mode has no "
                                   f"host inbound capture; use --capture nftables or iptables")
            sockets = [("outbound", _listen_host(port))]
        try:
            future = asyncio.run_coroutine_threadsafe(self._serve(entry, sockets), self.loop)
            future.result(timeout=10)
        except BaseException:
            self.loop.call_soon_threadsafe(self._close, entry)
            for _, sock in sockets:
                sock.close()
            raise
        self.attached[spec.key] = entry

    def detach(self, spec: WorkloadSpec, wait: bool = False) -> None:
        entry = self.attached.pop(spec.key, None)
        if entry is None:
            return
        if wait:
            asyncio.run_coroutine_threadsafe(self._close_async(entry), self.loop).result(timeout=10)
        else:
            self.loop.call_soon_threadsafe(self._close, entry)

    def _entry(self, spec: WorkloadSpec) -> _Attached:
        identity = SpiffeId.workload(spec.namespace, spec.service_account, self.trust_domain)
        source = WorkloadIdentity(namespace=spec.namespace, name=spec.name, service_account=spec.service_account,
                                  labels=dict(spec.labels), principal=identity.principal)
        if spec.kind == "netns":
            netns = netns_path(spec.target)
            plain = NetnsConnector(netns)
            connector = TunnelConnector(self.tls, identity, self.directory, plain, mark=PROXY_MARK, netns=netns)
            inbound = InboundWorkload(spec.namespace, spec.name, spec.service_account, dict(spec.labels), spec.ips,
                                      trust_domain=self.trust_domain, connector=plain)
        else:
            plain = PlainConnector(mark=PROXY_MARK)
            connector = TunnelConnector(self.tls, identity, self.directory, plain, mark=PROXY_MARK)
            inbound = None
            if spec.ports:
                inbound = InboundWorkload(spec.namespace, spec.name, spec.service_account, dict(spec.labels),
                                          spec.ips, trust_domain=self.trust_domain, connector=plain)
        outbound = ListenerContext(f"outbound {spec.namespace}/{spec.name}", source, connector=connector,
                                   original_destination=_original_dst_or_none)
        return _Attached(spec, outbound, inbound)

    async def _serve(self, entry: _Attached, sockets: list[tuple[str, socket.socket]]) -> None:
        # One protocol factory per kind, shared by the IPv4 and IPv6 listeners.
        outbound = functools.partial(DispatchProtocol, self.runtime, entry.outbound)
        plaintext = None
        for kind, sock in sockets:
            if kind == "tunnel":
                tunnel = await TunnelServer(self.inbound, entry.inbound, self.tls).start(sock=sock)
                entry.tunnels.append(tunnel)
                continue
            if kind == "plaintext":
                if plaintext is None:
                    plaintext = self.inbound.plaintext_factory(entry.inbound, _original_dst_or_none)
                factory = plaintext
            else:
                factory = outbound
            entry.servers.append(await self.loop.create_server(factory, sock=sock, backlog=1024))
        if entry.spec.kind == "cgroup" and entry.inbound is not None:
            # The shared host inbound listener is opened and closed on the loop thread
            # only, so a detach queued before this attach cannot close it under us.
            if not self._host_inbound:
                for sock in _listen_any(self.host_inbound_port()):
                    self._host_inbound.append(await self.loop.create_server(
                        lambda: _HostInbound(self), sock=sock, backlog=1024))
            for port in entry.spec.ports:
                self.host_ports[port] = entry.inbound

    def _close(self, entry: _Attached) -> None:
        for server in entry.servers:
            server.close()
        for tunnel in entry.tunnels:
            tunnel.close()
        if entry.spec.kind == "cgroup":
            for port in entry.spec.ports:
                if self.host_ports.get(port) is entry.inbound:
                    del self.host_ports[port]
            if not self.host_ports:
                for server in self._host_inbound:
                    server.close()
                self._host_inbound.clear()
        if entry.inbound is not None and self.inbound is not None:
            self.inbound.forget(entry.inbound)

    async def _close_async(self, entry: _Attached) -> None:
        self._close(entry)
        for server in entry.servers:
            await server.wait_closed()

    # -- views --------------------------------------------------------------

    def listeners_view(self) -> list[dict]:
        out = []
        for entry in sorted(self.attached.values(), key=lambda e: e.spec.key):
            item = {"workload": f"{entry.spec.namespace}/{entry.spec.name}", "kind": entry.spec.kind,
                    "target": entry.spec.target, "listeners": entry.addresses(self._host_inbound)}
            if entry.tunnels:
                item["tunnel"] = {
                    "accepted": sum(t.stats["accepted"] for t in entry.tunnels),
                    "refused": sum(t.stats["refused"] for t in entry.tunnels),
                    "last_refusal": next((t.last_refusal for t in entry.tunnels if t.last_refusal), ""),
                }
            out.append(item)
        return out


class DataPlaneCapture:
    """Capture = the workload's listeners first, then the kernel rules that feed them
    (so rules never point at nothing); removal in the reverse order."""

    def __init__(self, inner: Capture, plane: DataPlane) -> None:
        self.inner = inner
        self.plane = plane
        self.mode = inner.mode
        plane.host_port_of = getattr(inner, "host_port", lambda spec: None)
        plane.host_inbound_port = getattr(inner, "host_inbound_port", lambda: None)

    def apply(self, spec: WorkloadSpec) -> None:
        if spec.kind == "cgroup":
            if spec.ports and self.plane.host_inbound_port() is None:
                raise CaptureError(f"{spec.ref}: declares ports {list(spec.ports)} but capture mode {self.mode} has "
                                   f"no host inbound capture; use --capture nftables or iptables, or drop --ports")
            self.inner.apply(spec)  # assigns the cgroup's listener port
            self._attach(spec)
            return
        path = netns_path(spec.target)
        if not os.path.exists(path):
            # The pod is gone without an unenroll: close its listeners (an open socket
            # would keep the dead namespace alive) and keep it in the retry set.
            self.plane.detach(spec)
            raise CaptureError(f"{spec.ref}: network namespace {path} does not exist (pod gone?); "
                               f"unenroll it, or it is captured again when it reappears")
        # What the backend reads inside the pod (the node probes' pod_view) is read in the
        # listeners' visit: one setns worker thread per enroll instead of two.
        visit = getattr(self.inner, "pod_visit", None)
        look = visit(spec) if visit is not None else None
        try:
            self._attach(spec, look)
            self.inner.apply(spec)
        finally:
            if look is not None:
                look.close()

    def _attach(self, spec: WorkloadSpec, also: Callable[[], None] | None = None) -> None:
        try:
            self.plane.attach(spec, also)
        except CaptureError:
            raise
        except Exception as exc:  # OSError, TimeoutError, an identity this node does not serve
            raise CaptureError(f"{spec.ref}: cannot open the proxy's listeners: {exc}") from None

    def remove(self, spec: WorkloadSpec) -> None:
        self.inner.remove(spec)
        self.plane.detach(spec)

    def sweep(self, keep):
        return self.inner.sweep(keep)


def _listen_in_netns(netns: str, ports: list[tuple[int, str]],
                     also: Callable[[], None] | None = None) -> list[tuple[str, socket.socket]]:
    """(kind, socket) for IPv4 and (when the namespace has it) IPv6 listeners on each
    port inside ``netns``, all opened in one visit to the namespace; then ``also()``
    there too (it must not raise)."""

    def make() -> list[tuple[str, socket.socket]]:
        made: list[tuple[str, socket.socket]] = []
        try:
            for port, kind in ports:
                for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    sock = _listener(family, host, port, netns)
                    if sock is not None:
                        made.append((kind, sock))
        except BaseException:
            for _, sock in made:
                sock.close()
            raise
        if also is not None:
            also()
        return made

    try:
        return run_in_netns(netns, make)
    except CaptureError:
        raise
    except (RedirectError, OSError, TimeoutError) as exc:
        raise CaptureError(str(exc)) from None


def _listener(family: socket.AddressFamily, host: str, port: int, where: str) -> socket.socket | None:
    """A listening socket marked 0x539 (IPv6: v6-only; None when the namespace has no IPv6)."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None
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
            return None
        raise CaptureError(f"cannot listen on {host}:{port} in {where}: {exc.strerror or exc}") from None
    return sock


class _HostInbound(asyncio.Protocol):
    """A connection on the shared host inbound listener: the original destination
    port names the cgroup workload, then the plane's plaintext path decides it."""

    __slots__ = ("plane", "inner")

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.inner = None

    def connection_made(self, transport) -> None:
        target = _original_dst_or_none(transport.get_extra_info("socket"))
        workload = self.plane.host_ports.get(target[1]) if target is not None else None
        if workload is None:
            log.info("host inbound: %s has no enrolled workload; refused", target)
            transport.abort()
            return
        self.inner = self.plane.inbound.plaintext_factory(workload, lambda sock: target)()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def connection_lost(self, exc) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)


def _listen_any(port: int) -> list[socket.socket]:
    """The shared host inbound listener: 0.0.0.0 and (when the host has IPv6) [::]."""
    made = []
    try:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = _listener(family, host, port, "the host namespace")
            if sock is not None:
                made.append(sock)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


def _listen_host(port: int) -> socket.socket:
    return _listener(socket.AF_INET, "127.0.0.1", port, "the host namespace")


def _addr(sock: socket.socket | None) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except (OSError, AttributeError):  # closed, or no socket left
        return "closed"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(sock: socket.socket | None) -> int | None:
    try:
        return sock.getsockname()[1]
    except (OSError, AttributeError):
        return None
