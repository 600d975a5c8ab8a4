"""The inbound side of a workload: PeerAuthentication, AuthorizationPolicy, then the application.

Both inbound listeners end here:

- the mTLS tunnel (15008, ``nodeagent.proxy.tunnel.TunnelServer``): the peer
  principal is the verified client certificate's, the stream is ``mutual_tls``;
- plaintext (15006, ``InboundPlane.plaintext_factory``): no principal,
  ``none``; STRICT refuses the connection with a reset.

``InboundPlane.admit`` decides at connect: the PeerAuthentication mode for the
target port (``policy.peerauthn``), the protocol of the target port (the
workload's service port: name ``http*``/``grpc*`` or protocol HTTP), and for
opaque TCP the L4 AuthorizationPolicy verdict (``policy.authz``).
``InboundPlane.attach`` then serves the stream:

- HTTP: the engine's ``HttpDownstream`` with this plane as its runtime, so
  every request is authorized here (``plan``) with the real peer principal
  (403 ``RBAC: access denied``, flag RBAC), its path normalized as
  authorized, and forwarded to the application at the original destination
  (no VirtualService at the destination; upstream connections pooled per
  workload and target, marked 0x539 in netns mode);
- TCP: the engine's ``TcpRelay`` to the application, with TCP metrics.

Metrics carry ``reporter="destination"``, the peer's principal and workload
(looked up in the snapshot by principal and address) and
``connection_security_policy`` (with ``MeshTelemetry``).

Live connections are registered; on a snapshot change (``recheck``, called by
the watcher every 0.25 s or by the daemon) every one is re-checked: a
plaintext connection that STRICT now refuses is reset, a TCP stream or an
idle HTTP connection that the L4 verdict now denies is closed; HTTP requests
are authorized one by one against the current snapshot anyway.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Callable, Mapping

from policy.authz import (AuthorizationIndex, Connection, InvalidPath, RBAC_DENIED_BODY, RBAC_DENIED_STATUS,
                          RBAC_RESPONSE_FLAG, Request, evaluate, needs_l7, normalize_path)
from policy.cluster import ClusterKey
from policy.peerauthn import PeerAuthenticationIndex, accepts

from nodeagent.identity.spiffe import SpiffeId
from nodeagent.proxy.context import ListenerContext, PeerInfo, PlainConnector, WorkloadIdentity
from nodeagent.proxy.http import Exchange, HttpDownstream, LocalReply, reset_transport
from nodeagent.proxy.runtime import ClusterState, ForwardPlan, UpstreamEndpoint
from nodeagent.proxy.tcp import TcpRelay, port_kind, sniff_http
from nodeagent.telemetry import AccessLog

log = logging.getLogger(__name__)

_CONTEXT_CACHE_LIMIT = 4096
_IDENTITY_HEADERS = frozenset((b"x-forwarded-client-cert",))  # never trusted from a client
_IDENTITY_HEADER_LEN = len(b"x-forwarded-client-cert")
_PATH_CACHE_LIMIT = 4096
_UNSEEN = object()
# L7 verdicts memoized per (connection attributes, method, target, authority) when no policy of
# the workload reads request headers: at most this many, for request targets and authorities
# of at most _VERDICT_KEY_LIMIT bytes together (a long target is evaluated every time).
_VERDICT_CACHE_LIMIT = 4096
_VERDICT_KEY_LIMIT = 512
_PLAN_FIELDS = ("cluster", "path", "authority", "request_ops", "response_ops", "timeout", "per_try_timeout",
                "retry", "delay", "abort", "mirror", "mirror_authority", "route_name")
# The proxy's own ports inside a pod (admin, outbound, inbound, tunnel, metrics, health): an inbound
# stream never targets them, or a peer could make the pod's outbound listener speak for the pod.
PROXY_PORTS = frozenset((15000, 15001, 15006, 15008, 15020, 15021))


@dataclass(frozen=True, eq=False)
class InboundWorkload:
    """A local workload as its inbound listeners see it.

    ``addresses``: the workload's own IPs (a CONNECT must target one of them).
    ``connector``: how the proxy reaches the application (the daemon's
    NetnsConnector, mark 0x539, in netns mode; PlainConnector on loopback).
    """

    namespace: str
    name: str
    service_account: str
    labels: Mapping[str, str]
    addresses: tuple[str, ...]
    trust_domain: str = "cluster.local"
    connector: object = field(default_factory=PlainConnector)

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId.workload(self.namespace, self.service_account, self.trust_domain)

    @property
    def principal(self) -> str:
        return self.identity.principal

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class InboundContext(ListenerContext):
    """A ListenerContext for inbound streams: the peer as ``source``, plus the
    security policy label and the local workload."""

    security_policy: str = "none"
    workload: InboundWorkload | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    reason: str = ""
    workload: InboundWorkload | None = None
    principal: str | None = None
    remote: tuple[str, int] = ("", 0)
    target: tuple[str, int] = ("", 0)
    mtls: bool = False
    kind: str = "tcp"  # "http" | "sniff" | "tcp"


def _app_endpoint(target: tuple[str, int], labels: tuple) -> UpstreamEndpoint:
    """The application's one endpoint: an UpstreamEndpoint (the engine reads its fields as C
    fields) with no cluster endpoint behind it."""
    endpoint = UpstreamEndpoint.__new__(UpstreamEndpoint)
    endpoint.addr = target
    endpoint.id = endpoint.host = "%s:%d" % target
    endpoint.labels = labels
    endpoint.cluster_endpoint = None
    return endpoint


class AppCluster(ClusterState):
    """The local application behind one (workload, target): what the engine's
    exchanges and relays need from a cluster (pick/done/record/pool/labels).

    A ClusterState (no LB policy, no outlier detection, no service) so that an inbound plan
    carries it as ``ForwardPlan.state``: the engine's picks, pool and outcome records of an
    HTTP/1.1 exchange are then C calls and fields, as for a routed cluster."""

    __slots__ = ("endpoint",)

    def __init__(self, workload: InboundWorkload, target: tuple[str, int]) -> None:
        key = ClusterKey(f"inbound.{workload.name}.{workload.namespace}", None, target[1])
        ClusterState.__init__(self, key, None, workload.connector, None)  # its pool: ClusterPool(key, ...)
        self.endpoint = _app_endpoint(target, ())
        self.no_endpoint_labels = ()
        self.version = None

    def refresh(self, labels: tuple, version) -> None:
        self.endpoint.labels = labels
        self.no_endpoint_labels = labels
        self.version = version

    def pick(self, exchange, tried):
        return self.endpoint

    def done(self, endpoint) -> None:
        pass

    def labels_for(self, endpoint) -> tuple:
        return self.no_endpoint_labels

    def record(self, endpoint, status: int, now: float) -> None:
        pass  # no outlier detection towards the local application

    def sweep(self, now: float) -> None:
        self.pool.sweep(now)


class _Policies:
    __slots__ = ("version", "snapshot", "authz", "peer", "header_reads")

    def __init__(self, snapshot, trust_domain: str, aliases: tuple[str, ...]) -> None:
        self.version = snapshot.version
        self.snapshot = snapshot
        self.authz = AuthorizationIndex(snapshot, trust_domain=trust_domain, trust_domain_aliases=aliases)
        self.peer = PeerAuthenticationIndex(snapshot)
        self.header_reads: dict[InboundWorkload, bool] = {}

    def reads_headers(self, wl: InboundWorkload) -> bool:
        """True when an AuthorizationPolicy of ``wl`` has a ``request.headers[...]`` condition;
        otherwise an HTTP verdict depends only on the connection, method, path and host."""
        found = self.header_reads.get(wl)
        if found is None:
            found = self.header_reads[wl] = any(
                cond.key.startswith("request.headers")
                for res in self.snapshot.authorization_policies_for(wl.namespace, wl.labels)
                for rule in getattr(res.spec, "rules", ()) for cond in rule.when)
        return found


class InboundConnection:
    """One live inbound stream, as the registry re-checks it. ``inner``: the protocol serving
    it now (``_InboundHttp``, the engine's ``TcpRelay``, or ``_Sniff`` until it knows)."""

    __slots__ = ("admission", "transport", "inner")

    def __init__(self, admission: Admission, transport) -> None:
        self.admission = admission
        self.transport = transport
        self.inner = None


class _HttpDecision:
    """What an inbound HTTP connection's requests share, decided once per snapshot version:
    the PeerAuthentication outcome, the policy set, the L4 verdict when no policy reads L7
    attributes (then every request on the connection gets the same one), the application
    cluster and a forward plan for requests whose path needs no rewriting. ``memo``: when the
    policies read L7 attributes but no request header, a token naming the connection's
    attributes, so verdicts are memoized per (token, method, target, authority); else None."""

    __slots__ = ("version", "refusal", "policies", "l7", "verdict", "conn", "cluster", "plan", "memo")


class InboundPlane:
    """Inbound policy and serving for the local workloads of one ProxyRuntime.

    For the engine's ``HttpDownstream`` and ``TcpRelay`` this object is the
    runtime (it delegates loop, limits, telemetry and bookkeeping to the
    shared ``ProxyRuntime`` and answers ``plan`` itself).
    """

    __slots__ = ("runtime", "snapshots", "h2_pools", "record_exchange", "_access_log", "local", "trust_domain",
                 "aliases", "connections", "clusters", "_policies", "_contexts", "_watch", "_checked_version",
                 "_paths", "_verdicts_version", "_verdict_tokens", "_verdicts")

    def __init__(self, runtime, *, trust_domain: str = "cluster.local",
                 trust_domain_aliases: tuple[str, ...] = ()) -> None:
        self.runtime = runtime
        self.snapshots = runtime.snapshots
        self.h2_pools: dict = {}  # HTTP/2 upstream pools of the inbound clusters (nodeagent.proxy.h2.pool_for)
        # per request: no delegating call, unless an access log is written (its inbound lines
        # are the plane's own: _InboundAccessLog)
        self.record_exchange = runtime.record_exchange if runtime.access_log is None else self._record_logged
        self._access_log: _InboundAccessLog | None = None
        self.local: set[InboundWorkload] = set()  # workloads served here (a peer may be one of them)
        self.trust_domain = trust_domain
        self.aliases = tuple(trust_domain_aliases)
        self.connections: set[InboundConnection] = set()
        self.clusters: dict[tuple, AppCluster] = {}
        self._policies: _Policies | None = None
        self._contexts: dict[tuple, InboundContext] = {}
        self._watch: asyncio.Task | None = None
        self._checked_version = None
        self._paths: dict[bytes, str | None] = {}  # raw request target -> normalized (None: unchanged)
        # L7 verdicts of the current snapshot version (see _HttpDecision.memo): tokens per
        # (workload, principal, peer address, target) and (token, method, target, authority) -> Verdict.
        self._verdicts_version = None
        self._verdict_tokens: dict[tuple, object] = {}
        self._verdicts: dict[tuple, object] = {}

    # --- what the engine reads from its runtime ------------------------
    @property
    def loop(self):
        return self.runtime.loop

    @property
    def limits(self):
        return self.runtime.limits

    @property
    def downstreams(self):
        return self.runtime.downstreams

    @property
    def telemetry(self):
        return self.runtime.telemetry

    @property
    def access_log(self):
        """The runtime's access log, writing inbound lines (``_InboundAccessLog``)."""
        outer = self.runtime.access_log
        if outer is None:
            return None
        mine = self._access_log
        if mine is None or mine.outer is not outer:
            mine = self._access_log = _InboundAccessLog(outer)
        return mine

    def _record_logged(self, exchange) -> None:
        """``record_exchange`` when an access log is on: the runtime's, with its access log
        writing this exchange's line as an inbound one (the swap is synchronous, on the loop)."""
        runtime = self.runtime
        outer = runtime.access_log
        runtime.access_log = self.access_log
        try:
            runtime.record_exchange(exchange)
        finally:
            runtime.access_log = outer

    def peer_info(self, ctx, transport) -> PeerInfo:
        return self.runtime.peer_info(ctx, transport)

    def authorize_connection(self, ctx, peer) -> bool:
        return True  # inbound streams are admitted by ``admit`` before the engine sees them

    def telemetry_local_error(self, down, status: int) -> None:
        self.runtime.telemetry_local_error(down, status)

    def mirror(self, exchange, plan) -> None:  # inbound plans never mirror
        pass

    # --- lifecycle -----------------------------------------------------
    def start(self) -> None:
        """Watch for snapshot changes (re-check live connections) and sweep idle app connections."""
        if self._watch is None:
            self._checked_version = self.snapshots().version
            self._watch = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                if self.snapshots().version != self._checked_version:
                    self.recheck()
                now = self.loop.time()
                for cluster in list(self.clusters.values()):
                    cluster.sweep(now)
            except Exception:  # a bug must not stop re-checks for every workload
                log.exception("inbound: re-check failed")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for entry in list(self.connections):
            entry.transport.abort()
        for cluster in self.clusters.values():
            cluster.pool.close_all()

    def serve_workload(self, workload: InboundWorkload) -> None:
        """A listener of ``workload`` (tunnel or plaintext) is served by this plane: when it
        calls another local workload, the callee's metrics and access log name it."""
        self.local.add(workload)

    def forget(self, workload: InboundWorkload) -> None:
        """A workload left (or changed): close its live inbound streams, drop its pools and contexts."""
        self.local.discard(workload)
        for entry in [e for e in self.connections if e.admission.workload is workload]:
            entry.transport.abort()
        for key in [k for k in self.clusters if k[0] is workload]:
            self.clusters.pop(key).pool.close_all()
        for key in [k for k in self._contexts if k[0] is workload]:
            del self._contexts[key]
        self._verdict_tokens.clear()  # tokens keep their workload alive; rare enough to drop all
        self._verdicts.clear()

    # --- policy --------------------------------------------------------
    def policies(self) -> tuple[object, _Policies]:
        snapshot = self.snapshots()
        cached = self._policies
        if cached is None or cached.version != snapshot.version:
            cached = _Policies(snapshot, self.trust_domain, self.aliases)
            self._policies = cached
        return snapshot, cached

    def _kind(self, snapshot, target: tuple[str, int]) -> tuple[str, object]:
        found = snapshot.service_by_address(target[0], target[1])
        if found is None:
            return "tcp", None
        service, sport = found
        return port_kind(sport), service

    def _mtls_refusal(self, pol: _Policies, wl: InboundWorkload, port: int, mtls: bool) -> str | None:
        mode = pol.peer.mode(wl.namespace, wl.labels, port)
        if accepts(mode, mtls):
            return None
        return f"PeerAuthentication {mode} for {wl.ref} port {port}: plaintext refused"

    def _connection(self, principal, remote, target) -> Connection:
        return Connection(source_principal=principal, source_ip=remote[0], destination_ip=target[0],
                          destination_port=target[1])

    def admit(self, workload: InboundWorkload, principal: str | None, remote: tuple[str, int],
              target: tuple[str, int], *, mtls: bool) -> Admission:
        """Decide a new inbound stream at connect."""
        if target[1] in PROXY_PORTS:
            return Admission(False, f"port {target[1]} of {workload.ref} is the proxy's own port")
        snapshot, pol = self.policies()
        refusal = self._mtls_refusal(pol, workload, target[1], mtls)
        if refusal is not None:
            return Admission(False, refusal)
        kind, _ = self._kind(snapshot, target)
        admission = Admission(True, "", workload, principal, tuple(remote[:2]), tuple(target), mtls, kind)
        if kind == "tcp":
            verdict = evaluate(pol.authz.for_workload(workload.namespace, workload.labels),
                               self._connection(principal, remote, target))
            if not verdict.allowed:
                self._count_tcp_denial(admission)
                return Admission(False, verdict.reason)
        return admission

    def _count_tcp_denial(self, admission: Admission) -> None:
        ctx = self.context(admission)
        entry = self.telemetry.tcp_entry(ctx, self.cluster(admission).no_endpoint_labels[:-1] + ("tcp",),
                                         RBAC_RESPONSE_FLAG)
        entry[0] += 1
        entry[1] += 1

    # --- contexts, clusters, labels ------------------------------------
    def context(self, admission: Admission) -> InboundContext:
        wl = admission.workload
        snapshot = self.snapshots()
        source = self._source_identity(snapshot, admission.principal, admission.remote[0])
        security = "mutual_tls" if admission.mtls else "none"
        key = (wl, admission.principal, source.name if source is not None else None, security)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) >= _CONTEXT_CACHE_LIMIT:
                self._contexts.clear()
            ctx = InboundContext(f"inbound {wl.ref}", source, "destination", wl.connector,
                                 security_policy=security, workload=wl)
            self._contexts[key] = ctx
        return ctx

    def _source_identity(self, snapshot, principal: str | None, ip: str) -> WorkloadIdentity | None:
        if not principal:
            return None
        parts = principal.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            return WorkloadIdentity(namespace="unknown", name="unknown", principal=principal)
        ns, sa = parts[2], parts[4]
        candidates = [w for w in snapshot.workloads if w.namespace == ns and w.service_account == sa]
        match = next((w for w in candidates if w.address == ip), None)
        if match is None:
            # a workload of this node (enrolled, so not in the configuration's workloads)
            local = next((w for w in self.local if w.namespace == ns and w.service_account == sa
                          and ip in w.addresses), None)
            if local is not None:
                return WorkloadIdentity(namespace=ns, name=local.name, service_account=sa,
                                        labels=dict(local.labels), principal=principal)
        if match is None and len(candidates) == 1:
            match = candidates[0]
        if match is None:
            return WorkloadIdentity(namespace=ns, name="unknown", service_account=sa, principal=principal)
        return WorkloadIdentity(namespace=ns, name=match.name, service_account=sa, labels=dict(match.labels),
                                principal=principal)

    def cluster(self, admission: Admission) -> AppCluster:
        wl, target = admission.workload, admission.target
        key = (wl, target)
        cluster = self.clusters.get(key)
        if cluster is None:
            cluster = AppCluster(wl, target)
            self.clusters[key] = cluster
        snapshot = self.snapshots()
        if cluster.version != snapshot.version:
            cluster.refresh(self._destination_labels(snapshot, wl, target), snapshot.version)
        return cluster

    def _destination_labels(self, snapshot, wl: InboundWorkload, target) -> tuple:
        kind, service = self._kind(snapshot, target)
        if service is not None:
            host, name = service.host, (service.host.split(".", 1)[0] if service.mesh_internal else service.host)
            sns = service.namespace
        else:
            host = name = sns = "unknown"
        return (wl.name, wl.namespace, wl.principal, wl.labels.get("app", "unknown"),
                wl.labels.get("version", "unknown"), host, name, sns, "tcp" if kind == "tcp" else "http")

    # --- serving -------------------------------------------------------
    def attach(self, admission: Admission, transport) -> asyncio.Protocol:
        """Serve an admitted stream on ``transport``; returns the protocol to feed its events to."""
        entry = InboundConnection(admission, transport)
        self.connections.add(entry)
        ctx = self.context(admission)
        peer = PeerInfo(remote=admission.remote, local=admission.target, original_destination=admission.target,
                        peer_principal=admission.principal or "")
        if admission.kind == "http":
            # Served directly (the caller makes it the transport's protocol): no forwarding layer
            # between the TLS transport and the HTTP parser on the per-request path.
            inner = _InboundHttp(self, ctx, peer)
            inner.entry = entry
            entry.inner = inner
            inner.connection_made(transport)
            return inner
        tracked = _Tracked(self, entry)
        if admission.kind == "sniff":
            entry.inner = _Sniff(self, entry, ctx, peer)
        else:
            entry.inner = TcpRelay(self, ctx, peer, self.cluster(admission))
        tracked.connection_made(transport)
        return tracked

    def _decide(self, down, snapshot, pol: _Policies) -> _HttpDecision:
        ctx = down.ctx
        peer = down.peer
        wl = ctx.workload
        target = peer.original_destination
        principal = peer.peer_principal or None
        mtls = ctx.security_policy == "mutual_tls"
        d = _HttpDecision()
        d.version = snapshot.version
        d.refusal = self._mtls_refusal(pol, wl, target[1], mtls)
        d.cluster = self.cluster(Admission(True, "", wl, principal, peer.remote, target, mtls, "http"))
        d.policies = pol.authz.for_workload(wl.namespace, wl.labels)
        d.l7 = needs_l7(d.policies)
        d.conn = self._connection(principal, peer.remote, target)
        d.verdict = None if d.l7 else evaluate(d.policies, d.conn)
        d.memo = None
        if d.l7 and not pol.reads_headers(wl):
            if self._verdicts_version != snapshot.version:
                self._verdicts_version = snapshot.version
                self._verdict_tokens.clear()
                self._verdicts.clear()
            # The Connection's attributes: equal keys give equal verdicts for equal requests.
            key = (wl, principal, peer.remote[0], target)
            token = self._verdict_tokens.get(key)
            if token is None:
                if len(self._verdict_tokens) >= _CONTEXT_CACHE_LIMIT:
                    self._verdict_tokens.clear()
                    self._verdicts.clear()
                token = self._verdict_tokens[key] = object()
            d.memo = token
        plan = ForwardPlan()
        plan.cluster = d.cluster
        plan.path = None
        plan.authority = None
        plan.request_ops = None
        plan.response_ops = None
        plan.timeout = None
        plan.per_try_timeout = None
        plan.retry = None
        plan.delay = None
        plan.abort = None
        plan.mirror = None
        plan.mirror_authority = None
        plan.route_name = ""
        plan.state = d.cluster  # a ClusterState (AppCluster): the engine's C calls and fields
        d.plan = plan
        return d

    def _normalized(self, raw: bytes) -> str | None:
        """The request target as authorized and forwarded (Istio BASE normalization, query kept);
        None when it is ``raw`` unchanged. Raises InvalidPath. Memoized: a service sees few
        distinct paths, and this runs for every request."""
        paths = self._paths
        try:
            return paths[raw]
        except KeyError:
            pass
        text = raw.decode("latin-1")
        normalized = normalize_path(text, keep_query=True) if text[:1] == "/" else None
        if normalized == text:
            normalized = None
        if len(paths) >= _PATH_CACHE_LIMIT:
            paths.clear()
        paths[raw] = normalized
        return normalized

    def plan(self, exchange):
        """Per request on an inbound HTTP stream: PeerAuthentication, AuthorizationPolicy, then the app."""
        if type(exchange) is Exchange:
            x = exchange  # an HTTP/1.1 exchange: C fields (typed in inbound.pxd)
            down = x.down
            path = x.path
            method = x.method
            authority = x.authority
            headers = x.headers
        else:  # an HTTP/2 stream
            x = None
            down = exchange.down
            path = exchange.path
            method = exchange.method
            authority = exchange.authority
            headers = exchange.headers
        snapshot = self.snapshots()
        d = down.decision
        if d is None or d.version != snapshot.version:
            d = down.decision = self._decide(down, snapshot, self.policies()[1])
        cluster = d.cluster
        if x is not None:
            x.dest = cluster.no_endpoint_labels
        else:
            exchange.dest = cluster.no_endpoint_labels
        if d.refusal is not None:  # the policy changed under a live plaintext connection
            log.info("inbound %s: %s", down.ctx.workload.ref, d.refusal)
            reset_transport(down.transport)
            down.close()
            return LocalReply(503, "-")
        try:
            target_path = self._paths.get(path, _UNSEEN)  # _normalized's memo, inline: every request
            if target_path is _UNSEEN:
                target_path = self._normalized(path)
            if not d.l7:
                verdict = d.verdict
            elif d.memo is not None:
                verdict = self._verdicts.get((d.memo, method, path, authority))
                if verdict is None:
                    verdict = self._memo_verdict(d, exchange)
            else:
                verdict = evaluate(d.policies, Request(d.conn, host=authority.decode("latin-1"),
                                                       method=method.decode("latin-1"),
                                                       path=path.decode("latin-1"),
                                                       headers=exchange.header_map()))
        except InvalidPath:
            return LocalReply(400, "-", b"Bad Request")
        if not verdict.allowed:
            log.info("inbound %s <- %s %s denied: %s", down.ctx.workload.ref,
                     down.peer.peer_principal or down.peer.remote[0], path.decode("latin-1"), verdict.reason)
            return LocalReply(RBAC_DENIED_STATUS, RBAC_RESPONSE_FLAG, RBAC_DENIED_BODY)
        strip = False
        for name, _ in headers:
            if len(name) == _IDENTITY_HEADER_LEN and name.lower() in _IDENTITY_HEADERS:
                strip = True
                break
        if target_path is None and not strip:
            return d.plan  # never mutated by the engine: shared by the connection's requests
        plan = ForwardPlan()
        shared = d.plan
        for name in _PLAN_FIELDS:
            setattr(plan, name, getattr(shared, name))
        plan.state = shared.state
        plan.path = target_path.encode("latin-1") if target_path is not None else None
        plan.request_ops = _STRIP_IDENTITY if strip else None
        return plan

    def _memo_verdict(self, d: _HttpDecision, exchange):
        """The L7 verdict of a request whose policies read no header: memoized (evaluate is a pure
        function of the connection, host, method and normalized path)."""
        path, authority = exchange.path, exchange.authority
        key = (d.memo, exchange.method, path, authority)
        verdicts = self._verdicts
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = evaluate(d.policies, Request(d.conn, host=authority.decode("latin-1"),
                                                   method=exchange.method.decode("latin-1"),
                                                   path=path.decode("latin-1")))
            if len(path) + len(authority) <= _VERDICT_KEY_LIMIT:
                if len(verdicts) >= _VERDICT_CACHE_LIMIT:
                    verdicts.clear()
                verdicts[key] = verdict
        return verdict

    # --- live connections ----------------------------------------------
    def recheck(self) -> int:
        """Re-decide every live inbound stream on the current snapshot; returns how many were closed."""
        snapshot, pol = self.policies()
        self._checked_version = snapshot.version
        closed = 0
        for entry in list(self.connections):
            a = entry.admission
            refusal = self._mtls_refusal(pol, a.workload, a.target[1], a.mtls)
            if refusal is not None:
                log.info("inbound %s <- %s closed after a policy change: %s", a.workload.ref,
                         a.principal or a.remote[0], refusal)
                reset_transport(entry.transport)
                closed += 1
                continue
            inner = entry.inner
            is_http = isinstance(inner, HttpDownstream)
            policies = pol.authz.for_workload(a.workload.namespace, a.workload.labels)
            if is_http and (needs_l7(policies) or inner.active is not None):
                continue  # decided per request
            verdict = evaluate(policies, self._connection(a.principal, a.remote, a.target))
            if not verdict.allowed:
                log.info("inbound %s <- %s closed after a policy change: %s", a.workload.ref,
                         a.principal or a.remote[0], verdict.reason)
                if is_http:
                    inner.close()
                else:
                    entry.transport.abort()
                closed += 1
        return closed

    # --- plaintext 15006 -------------------------------------------------
    def plaintext_factory(self, workload: InboundWorkload,
                          target_of: Callable[[socket.socket], tuple[str, int] | None] | None = None):
        """Protocol factory for a plaintext inbound listener (15006) of ``workload``.

        ``target_of(sock)``: the original destination (default SO_ORIGINAL_DST).
        """
        self.serve_workload(workload)
        if target_of is None:
            from redirect import original_dst

            def target_of(sock):
                try:
                    return original_dst(sock)
                except OSError:
                    return None
        return lambda: _PlaintextInbound(self, workload, target_of)


class _InboundAccessLog(AccessLog):
    """The runtime's access log as the inbound plane writes it (same stream, same fields),
    named as Envoy/Istio name an inbound line: ``upstream_cluster`` is the inbound cluster
    ``inbound|PORT||`` (the application's port), and an HTTP line says the verified peer's
    ``source_principal`` (``source_workload``/``source_namespace`` come from the peer
    identity too: the listener context's ``source``)."""

    def __init__(self, outer: AccessLog) -> None:
        super().__init__(outer.stream)
        self.outer = outer
        self._cluster = None
        self._principal = None

    def http(self, exchange, down, src, duration_ms: float) -> None:
        self._cluster = exchange.cluster
        self._principal = (src.principal or None) if src is not None else None
        super().http(exchange, down, src, duration_ms)

    def tcp(self, relay, duration_ms: float) -> None:
        self._cluster = relay.cluster
        self._principal = _UNSEEN
        super().tcp(relay, duration_ms)

    def _write(self, record: dict) -> None:
        if "upstream_cluster" in record:
            cluster = self._cluster
            record["upstream_cluster"] = None if cluster is None else "inbound|%d||" % cluster.key.port
            if self._principal is not _UNSEEN:
                record["source_principal"] = self._principal
            self._cluster = self._principal = None
        self.outer._write(record)


class _StripIdentityHeaders:
    """Request header op: drop client-supplied identity headers (x-forwarded-client-cert)."""

    def apply_pairs(self, pairs):
        return [(n, v) for n, v in pairs if n.lower().encode("latin-1") not in _IDENTITY_HEADERS]


_STRIP_IDENTITY = _StripIdentityHeaders()


class _InboundHttp(HttpDownstream):
    """The engine's HTTP downstream on an inbound stream: keeps the per-connection policy
    decision and unregisters the stream when it ends."""

    __slots__ = ("entry", "decision")

    def __init__(self, plane: "InboundPlane", ctx, peer) -> None:
        super().__init__(plane, ctx, peer)
        self.entry = None
        self.decision = None

    def connection_lost(self, exc) -> None:
        self.runtime.connections.discard(self.entry)
        super().connection_lost(exc)


class _Tracked(asyncio.Protocol):
    """Forwards a TCP (or not yet sniffed) stream's events to the protocol serving it
    (``entry.inner``, which the sniffer may replace); unregisters the stream when it ends."""

    __slots__ = ("plane", "entry")

    def __init__(self, plane: InboundPlane, entry: InboundConnection) -> None:
        self.plane = plane
        self.entry = entry

    def connection_made(self, transport) -> None:
        self.entry.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.entry.inner.data_received(data)

    def eof_received(self):
        handler = getattr(self.entry.inner, "eof_received", None)
        return handler() if handler is not None else False

    def connection_lost(self, exc) -> None:
        self.plane.connections.discard(self.entry)
        self.entry.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.entry.inner.pause_writing()

    def resume_writing(self) -> None:
        self.entry.inner.resume_writing()


class _Sniff(asyncio.Protocol):
    """HTTP2/GRPC-declared ports: the HTTP engine if the first line is an HTTP/1.x request line
    or the HTTP/2 preface (then ``nodeagent.proxy.h2``: each stream authorized at L7), else an
    opaque relay (L4 checked)."""

    def __init__(self, plane: InboundPlane, entry: InboundConnection, ctx, peer) -> None:
        self.plane = plane
        self.entry = entry
        self.ctx = ctx
        self.peer = peer
        self.transport = None
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        http = sniff_http(self.buffer)
        if http is None:
            return
        a = self.entry.admission
        if http:
            inner = _InboundHttp(self.plane, self.ctx, self.peer)
            inner.entry = self.entry
            self.entry.inner = inner
            inner.connection_made(self.transport)
            inner.data_received(self.buffer)
            return
        _, pol = self.plane.policies()
        verdict = evaluate(pol.authz.for_workload(a.workload.namespace, a.workload.labels),
                           self.plane._connection(a.principal, a.remote, a.target))
        if not verdict.allowed:
            self.plane._count_tcp_denial(a)
            self.transport.abort()
            return
        inner = TcpRelay(self.plane, self.ctx, self.peer, self.plane.cluster(a), initial=self.buffer)
        self.entry.inner = inner
        inner.connection_made(self.transport)

    def connection_lost(self, exc) -> None:
        pass


class _PlaintextInbound(asyncio.Protocol):
    """A plaintext inbound connection (15006): STRICT resets it; else admitted as ``none``."""

    def __init__(self, plane: InboundPlane, workload: InboundWorkload, target_of) -> None:
        self.plane = plane
        self.workload = workload
        self.target_of = target_of
        self.next = None

    def connection_made(self, transport) -> None:
        remote = tuple((transport.get_extra_info("peername") or ("", 0))[:2])
        target = self.target_of(transport.get_extra_info("socket"))
        if target is None:
            log.info("inbound %s <- %s refused: no original destination", self.workload.ref, remote[0])
            reset_transport(transport)
            return
        admission = self.plane.admit(self.workload, None, remote, target, mtls=False)
        if not admission.allowed:
            log.info("inbound %s <- %s:%s refused: %s", self.workload.ref, remote[0], remote[1], admission.reason)
            reset_transport(transport)
            return
        self.next = self.plane.attach(admission, transport)
        transport.set_protocol(self.next)

    def data_received(self, data: bytes) -> None:
        if self.next is not None:
            self.next.data_received(data)

    def connection_lost(self, exc) -> None:
        if self.next is not None:
            self.next.connection_lost(exc)


__all__ = ["InboundWorkload", "InboundContext", "InboundPlane", "Admission", "AppCluster"]
