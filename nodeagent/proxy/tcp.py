"""Opaque TCP relay, and the per-connection protocol choice for service-bound listeners.

A listener that knows the destination (a ``--forward`` listener, or the agent's
15001 outbound capture with SO_ORIGINAL_DST) decides per connection:

- the service port is HTTP (port name ``http``/``http-*`` or protocol HTTP):
  HTTP/1.1 engine;
- the port is HTTP2/GRPC (name ``http2*``/``grpc*`` or those protocols):
  HTTP/1.1 only if the client's first bytes are an HTTP/1.x request line,
  otherwise (h2 prior knowledge, TLS...) an opaque relay, since this engine
  does not parse HTTP/2 framing;
- anything else: opaque relay. Its cluster comes from the VirtualService's
  ``tls`` routes (TLS ports: the ClientHello's SNI is read first, without
  terminating TLS), then ``tcp`` routes, else the service itself
  (``policy.l4routing``); then the cluster's LB picks an endpoint.

A connection to an address that is no service, on a port where some service is
reachable only by SNI (a TLS port of a service without ``addresses``), is routed
by its SNI (``l4routing.plan_by_sni``); anything else is passed through.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time

from policy import l4routing
from policy.cluster import ClusterKey
from policy.sni import MAX_CLIENT_HELLO, NEED_MORE, ClientHelloReader

from nodeagent.proxy.http import HttpDownstream
from nodeagent.proxy.upstream import transport_failure_reason

log = logging.getLogger(__name__)

_REQUEST_LINE = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/1\.[01]\r?\n")
_SNIFF_LIMIT = 4096
# The first line of the HTTP/2 connection preface (``PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n``): a
# client speaking HTTP/2 with prior knowledge (gRPC). ``HttpDownstream`` hands such a
# connection to ``nodeagent.proxy.h2`` (``take_over``), which checks the rest of the preface.
_H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"

# Reading the ClientHello for ``tls`` routes (Envoy's tls_inspector): at most this long
# and this many bytes (a hello of up to 64 KiB, with room for the headers of its records),
# then the connection is routed without SNI (tcp routes / the service / passthrough).
SNI_PEEK_TIMEOUT = 5.0
SNI_PEEK_MAX = MAX_CLIENT_HELLO + 16384


def sniff_http(buf: bytes):
    """What the first bytes of a connection to an HTTP2/GRPC port say, checked once per
    connection: True for an HTTP/1.x request line or the HTTP/2 preface (the HTTP engine
    serves it), False for anything else (relayed as bytes), None while the bytes so far are
    a prefix of either and may still become one (wait for more; a preface split over reads).
    After ``_SNIFF_LIMIT`` bytes without a line, False."""
    if _REQUEST_LINE.match(buf) or buf.startswith(_H2_PREFACE_LINE):
        return True
    if len(buf) < len(_H2_PREFACE_LINE) and _H2_PREFACE_LINE.startswith(buf):
        return None
    if b"\n" not in buf and len(buf) < _SNIFF_LIMIT:
        return None
    return False


def port_kind(port) -> str:
    """'http', 'sniff' (HTTP2/GRPC) or 'tcp' for a ServicePort (Istio's protocol selection)."""
    proto = (port.protocol or "").upper()
    name = (port.name or "").lower()
    if proto in ("HTTP2", "GRPC", "GRPC-WEB") or name.startswith(("http2", "grpc")):
        return "sniff"
    if proto == "HTTP" or name == "http" or name.startswith("http-"):
        return "http"
    return "tcp"


class _UpstreamSide(asyncio.Protocol):
    __slots__ = ("relay", "transport")

    def __init__(self, relay: "TcpRelay") -> None:
        self.relay = relay
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(262144)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        relay.idle_age = 0.0
        relay.sent += len(data)  # Istio: sent = response bytes, towards the client
        relay.transport.write(data)

    def eof_received(self):
        relay = self.relay
        relay.upstream_eof = True
        if relay.downstream_eof or not relay.transport.can_write_eof():
            relay.transport.close()
            return False
        relay.transport.write_eof()  # half-close: the client may still send
        return True

    def connection_lost(self, exc) -> None:
        self.relay.upstream_lost()

    def pause_writing(self) -> None:
        self.relay.transport.pause_reading()

    def resume_writing(self) -> None:
        self.relay.transport.resume_reading()


class TcpRelay(asyncio.Protocol):
    """Downstream side of an opaque relay; connects upstream first, then copies bytes.

    Envoy's TCP proxy idle_timeout (``Limits.tunnel_idle_timeout``, 1 h by default): no
    byte either way for that long closes both sides. The runtime's sweep advances
    ``idle_age`` (``check_timers``); a byte read from either side resets it."""

    def __init__(self, runtime, ctx, peer, state, passthrough=None, initial: bytes = b"",
                 no_cluster: ClusterKey | None = None) -> None:
        self.runtime = runtime
        self.ctx = ctx
        self.peer = peer
        self.cluster = state
        self.passthrough = passthrough
        self.no_cluster = no_cluster  # a route named a cluster that does not exist: close, flag NC
        self.transport = None
        self.upstream = None
        self.pending = [initial] if initial else []
        self.received = len(initial)  # Istio: received = request bytes, from the client
        self.sent = 0
        self.flags = "-"
        self.upstream_host = ""
        self.failure_reason = None  # the last upstream transport failure (TLS origination), for the access log
        self.endpoint = None
        self.entry = None
        self.t0 = time.monotonic()
        self.closed = False
        self.downstream_eof = False
        self.upstream_eof = False
        self.counted = False
        self.idle_age = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(262144)
        self.runtime.downstreams.add(self)  # swept by the runtime: check_timers
        self.runtime.loop.create_task(self._connect())

    async def _connect(self) -> None:
        runtime = self.runtime
        state = self.cluster
        if self.closed:
            return  # the client left before we got to connect
        if self.no_cluster is not None:
            self.flags = "NC"  # Envoy's tcp_proxy: no cluster found for the route's destination
            self._open_entry(unknown_cluster_labels(self.no_cluster))
            self.transport.close()
            return
        if state is not None:
            pool = state.pool
            if pool.tcp_open >= pool.limits.max_connections:
                self.flags = "UO"  # DestinationRule tcp.maxConnections reached
                self._open_entry(state.no_endpoint_labels[:-1] + ("tcp",))
                self.transport.close()
                return
            pool.tcp_open += 1
            self.counted = True
        tried = []
        while True:
            if state is not None:
                endpoint = state.pick(None, tried)
                if endpoint is None:
                    self.flags = "UH" if not tried else "UF"
                    self._open_entry(state.no_endpoint_labels[:-1] + ("tcp",))
                    self.transport.close()
                    return
                addr = endpoint.addr
                self.endpoint = endpoint
                dest = endpoint.labels[:-1] + ("tcp",)
                timeout = state.pool.limits.connect_timeout
            else:
                addr = self.passthrough
                dest = runtime_passthrough_labels(addr)
                timeout = 10.0
            self.upstream_host = "%s:%d" % addr
            try:
                # The cluster's connector (seam: the mTLS tunnel bound to the cluster's tls mode).
                connector = state.pool.connector if state is not None else self.ctx.connector
                _, self.upstream = await connector.connect(
                    lambda: _UpstreamSide(self), addr[0], addr[1], timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                self.failure_reason = transport_failure_reason(exc)
                if state is not None:
                    state.record(self.endpoint, 0, runtime.loop.time())
                    state.done(self.endpoint)
                    tried.append(self.endpoint)
                    self.endpoint = None
                    if len(tried) < 3:
                        continue
                self.flags = "UF"
                self._open_entry(dest)
                self.transport.close()
                return
            break
        if state is not None:
            # Envoy's tcp_proxy reports a connect success to outlier detection (as a 200 when
            # local-origin errors are not split): it ends a run of consecutive failures.
            state.record(self.endpoint, 200, runtime.loop.time())
        self._open_entry(dest)
        if self.closed:
            self.upstream.transport.close()
            return
        if self.pending:
            self.upstream.transport.write(b"".join(self.pending))
            self.pending = []
            self.transport.resume_reading()
        if self.downstream_eof:
            if self.upstream_eof:
                # both sides ended while the connect was returning: nothing more can flow
                self.upstream.transport.close()
                self.transport.close()
            elif self.upstream.transport.can_write_eof():
                self.upstream.transport.write_eof()
            else:
                # a TLS stream (tunnel, TLS origination) cannot half-close: close after the data
                self.upstream.transport.close()

    def _open_entry(self, dest) -> None:
        self.entry = self.runtime.telemetry.tcp_entry(self.ctx, dest, self.flags)
        self.entry[0] += 1

    def data_received(self, data: bytes) -> None:
        self.idle_age = 0.0
        self.received += len(data)
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
        else:
            self.pending.append(data)
            if sum(map(len, self.pending)) > 262144:
                self.transport.pause_reading()

    def eof_received(self):
        self.downstream_eof = True
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return True  # the connect is in flight; close once it is done
        if self.upstream_eof or not upstream.transport.can_write_eof():
            upstream.transport.close()
            return False
        upstream.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def upstream_lost(self) -> None:
        self.transport.close()

    def check_timers(self, tick: float, limits) -> None:
        """The runtime's sweep, every ``tick`` seconds: close a relay idle for the TCP idle timeout."""
        if self.closed:
            return
        age = self.idle_age = self.idle_age + tick
        limit = limits.tunnel_idle_timeout
        if limit and age > limit:
            self.close()

    def close(self) -> None:
        """Close the client side; ``connection_lost`` then closes the upstream side."""
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.closed:
            return
        self.closed = True
        self.runtime.downstreams.discard(self)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.endpoint is not None and self.cluster is not None:
            self.cluster.done(self.endpoint)
        if self.counted:
            self.cluster.pool.tcp_open -= 1
        entry = self.entry
        if entry is not None:
            entry[1] += 1
            entry[2] += self.sent
            entry[3] += self.received
        if self.runtime.access_log is not None:
            self.runtime.access_log.tcp(self, (time.monotonic() - self.t0) * 1000.0)


def runtime_passthrough_labels(addr) -> tuple:
    host = "%s:%d" % addr
    return ("unknown", "unknown", "unknown", "unknown", "unknown", host, host, "unknown", "tcp")


def unknown_cluster_labels(key: ClusterKey) -> tuple:
    """destination_* labels of a connection whose route names a missing cluster."""
    return ("unknown", "unknown", "unknown", "unknown", "unknown", key.host, key.host, "unknown", "tcp")


def _destination_ip(host: str, service) -> str | None:
    """The connection's original destination IP for ``destinationSubnets``: the address
    the client dialled (captured listeners), else, for a listener bound to a service by
    name (``--forward``), the service's first address that is a plain IP."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if service is not None:
        for addr in service.addresses:
            try:
                return str(ipaddress.ip_address(addr))
            except ValueError:
                continue
    return None


class DispatchProtocol(asyncio.Protocol):
    """First protocol of a connection to a known destination: picks HTTP, sniff or relay,
    and for a relay its cluster (VirtualService tls/tcp routes; the SNI when it matters)."""

    def __init__(self, runtime, ctx) -> None:
        self.runtime = runtime
        self.ctx = ctx
        self.transport = None
        self.peer = None
        self.buffer = b""
        self.next = None
        self.mode = "sniff"  # "sniff" (HTTP2/GRPC port), "sni" (reading a ClientHello)
        self.timer = None
        self.hello = None  # the ClientHelloReader in "sni" mode
        self.chunks = []  # what was read in "sni" mode, handed to the relay
        self.nbytes = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        runtime = self.runtime
        self.peer = peer = runtime.peer_info(self.ctx, transport)
        if not runtime.authorize_connection(self.ctx, peer):
            transport.abort()
            return
        dest = peer.original_destination
        if dest is None:
            self._become(HttpDownstream(runtime, self.ctx, peer))
            return
        snapshot = runtime.snapshots()
        service, sport, source, src_ns = self._resolve(snapshot)
        host, port = dest
        if service is None:
            if port in l4routing.sni_only_ports(snapshot):
                self._start_sni_peek()  # maybe an egress service known only by its SNI
                return
            # Not a mesh service: pass the bytes through to where they were going.
            self._become(TcpRelay(runtime, self.ctx, peer, None, passthrough=(host, port)))
            return
        self.kind = port_kind(sport)
        self.target = (service.host, sport.number)
        if self.kind == "http":
            self._become(HttpDownstream(runtime, self.ctx, peer, self.target))
        elif self.kind == "tcp":
            dest_ip = _destination_ip(host, service)
            table = l4routing.l4_table(snapshot, service, sport.number, src_ns)
            if table.needs_sni(source, dest_ip):
                self._start_sni_peek()
                return
            self._relay(snapshot, src_ns, table.decide(source, dest_ip, None, runtime.rand))
        else:  # "sniff": wait for the first bytes; an opaque stream goes to the service itself
            self.state = runtime.cluster(ClusterKey(service.host, None, sport.number), src_ns, snapshot, self.ctx)

    def _resolve(self, snapshot):
        """(service, service port, source WorkloadRef, source namespace) of this connection;
        service and port are None when the destination is no mesh service."""
        source = self.runtime.source_ref(self.ctx, snapshot)
        src_ns = source.namespace if source is not None else "default"
        host, port = self.peer.original_destination
        service = snapshot.resolve_host("%s:%d" % (host, port), src_ns)
        sport = None
        if service is None:
            found = snapshot.service_by_address(host, port)
            if found is not None:
                service, sport = found
        else:
            sport = service.port(port)
        if sport is None:
            service = None
        return service, sport, source, src_ns

    def _relay(self, snapshot, src_ns: str, decision, data: bytes = b"") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s:%d: %s", *self.peer.remote[:2], decision.describe())
        if not decision.known:
            self._become(TcpRelay(self.runtime, self.ctx, self.peer, None, initial=data,
                                  no_cluster=decision.cluster))
            return
        state = self.runtime.cluster(decision.cluster, src_ns, snapshot, self.ctx)
        self._become(TcpRelay(self.runtime, self.ctx, self.peer, state, initial=data))

    # --- reading the ClientHello (tls routes) ---------------------------
    def _start_sni_peek(self) -> None:
        self.mode = "sni"
        self.hello = ClientHelloReader()
        self.timer = self.runtime.loop.call_later(SNI_PEEK_TIMEOUT, self._sni_done, None)

    def _sni_done(self, sni) -> None:
        """Route with what the ClientHello said (None: no SNI, not TLS, or no hello in time)
        on the configuration current now, and hand over the bytes read so far."""
        if self.next is not None or self.transport.is_closing():
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        runtime = self.runtime
        snapshot = runtime.snapshots()
        service, sport, source, src_ns = self._resolve(snapshot)
        host, port = self.peer.original_destination
        data = b"".join(self.chunks)
        self.chunks = []
        self.hello = None
        if service is not None:
            dest_ip = _destination_ip(host, service)
            if port_kind(sport) == "tcp":
                decision = l4routing.plan_l4(snapshot, service, sport.number, source, dest_ip, sni, runtime.rand)
            else:  # the port became HTTP meanwhile: relay to the service, as a sniffed stream would be
                decision = l4routing.L4Decision(ClusterKey(service.host, None, sport.number), True, "default")
            self._relay(snapshot, src_ns, decision, data)
            return
        decision = l4routing.plan_by_sni(snapshot, port, source, _destination_ip(host, None), sni, runtime.rand)
        if decision is None:
            self._become(TcpRelay(runtime, self.ctx, self.peer, None, passthrough=(host, port), initial=data))
        else:
            self._relay(snapshot, src_ns, decision, data)

    def _become(self, protocol, data: bytes = b"") -> None:
        self.next = protocol
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if data:
            protocol.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.mode == "sni":
            self.chunks.append(data)
            self.nbytes += len(data)
            name = self.hello.feed(data)
            if name is NEED_MORE and self.nbytes < SNI_PEEK_MAX:
                return
            self._sni_done(name if isinstance(name, str) else None)
            return
        self.buffer += data
        buf = self.buffer
        http = sniff_http(buf)
        if http is None:
            return
        if http:
            self._become(HttpDownstream(self.runtime, self.ctx, self.peer, self.target), buf)
        else:
            self._become(TcpRelay(self.runtime, self.ctx, self.peer, self.state, initial=buf))

    def eof_received(self):
        if self.mode == "sni" and self.next is None:
            # the client stopped sending before a whole ClientHello: route without SNI,
            # keep the half-open connection for the answer
            self._sni_done(None)
            if self.next is not None:
                return self.next.eof_received()
        return None

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.next is not None:
            self.next.connection_lost(exc)
