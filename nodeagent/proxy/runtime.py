"""The proxy runtime: per-request plans from the policy modules, cluster state, timers.

``ProxyRuntime.plan`` turns one parsed request into a ``ForwardPlan`` by calling
``policy.routing.plan_request`` on the CURRENT snapshot (so config changes apply
to the next request). Per cluster (service host, subset, port, source namespace)
it keeps a ``ClusterState``: the effective ``policy.cluster.ClusterPolicy``, the
endpoints, an LB picker (``policy.lb``), an ``policy.outlier.OutlierDetector``
and the connection pool. The runtime only moves data between those pure
decisions and the sockets; it decides nothing itself.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Callable

from policy import cluster as cluster_mod
from policy import lb as lb_mod
from policy import outlier as outlier_mod
from policy import retry as retry_mod
from policy import routing
from policy.authz import InvalidPath, normalize_path

from nodeagent.proxy import origination
from nodeagent.proxy.context import ListenerContext, PeerInfo
from nodeagent.proxy.http import Exchange as H1Exchange, LocalReply
from nodeagent.proxy.response_hook import ResponseHook, preflight_reply
from nodeagent.proxy.upstream import ClusterPool, PoolLimits, UNLIMITED

log = logging.getLogger(__name__)

_NO_DESTINATION = ("unknown",) * 8 + ("http",)  # destination_labels(None, None, "http")
SWEEP_TICK = 0.25  # seconds between outlier sweeps checks, pool idle sweeps and client timers
_ERROR_FOR_RETRY = {"connect-failure": "connect-failure", "reset": "reset", "per-try-timeout": "timeout"}
_PATH_CACHE_LIMIT = 4096
_BAD_PATH = LocalReply(400, "-", b"Bad Request")


def needs_normalizing(path: bytes) -> bool:
    """Whether ``normalize_path`` could change an origin-form target: only a ``.``
    (dot segments), ``%`` (escapes), ``\\`` (backslash) or ``#`` (fragment) can; a
    target starting with ``/`` without them comes back unchanged (slashes are not merged).

    Not ``b"." in path``: bytes' ``in`` first tries the operand as an integer and
    formats (then discards) a TypeError for a bytes operand, ≈ 90 ns per test."""
    return _NORMALIZING_CHAR(path) is not None


_NORMALIZING_CHAR = re.compile(rb"[.%\\#]").search


@dataclass(frozen=True, slots=True)
class Limits:
    """Downstream protections (Envoy's defaults where Envoy has one)."""

    max_header_bytes: int = 60 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0  # a request head must arrive within this: else 408
    # Envoy's connection idle_timeout: a client connection with NO request active (between
    # keep-alive requests) is closed after this; a request in flight is not counted.
    idle_timeout: float = 300.0
    # Envoy's stream_idle_timeout (default 5 min), independent of idle_timeout: a request in
    # flight with no progress either way for this long gets 408 (no response byte sent yet)
    # or a reset. 0: off.
    stream_idle_timeout: float = 300.0
    # Envoy's TCP proxy idle_timeout (default 1 h) for Upgrade tunnels: no byte either way
    # for this long closes both sides. 0: off.
    tunnel_idle_timeout: float = 3600.0


def shadow_authority(authority: str) -> str:
    """Envoy's mirror host: ``-shadow`` appended to the host, before any port."""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return f"{host}-shadow:{port}"
    return authority + "-shadow"


def _parse_authority(raw: bytes, fixed) -> tuple[str, int]:
    """(authority, destination port) of a request; the port defaults to 80, or the
    listener's known destination port."""
    authority = raw.decode("latin-1")
    if fixed is not None and not authority:
        authority = "%s:%d" % fixed
    colon = authority.rfind(":")
    if colon > 0 and authority[colon + 1:].isdigit() and "]" not in authority[colon:]:
        return authority, int(authority[colon + 1:])
    return authority, fixed[1] if fixed is not None else 80


@functools.lru_cache(maxsize=256)
def _retry_floor(retry) -> int:
    """The lowest response status ``retry`` may retry (500 when only 5xx can be, as
    ``5xx``/``gateway-error`` and most lists go): the exchange checks ``status >= floor``
    before it asks policy.retry, so a 2xx/4xx answer costs one comparison."""
    if retry is None:
        return 500
    floor = 500
    if "retriable-4xx" in retry.retry_on:
        floor = 409
    if "retriable-status-codes" in retry.retry_on and retry.retriable_status_codes:
        floor = min(floor, max(200, min(retry.retriable_status_codes)))
    return floor


class ForwardPlan:
    """What one exchange needs from routing, in wire-ready form."""

    __slots__ = (
        "cluster", "path", "authority", "request_ops", "response_ops", "timeout",
        "per_try_timeout", "retry", "delay", "abort", "mirror", "route_name", "mirror_authority",
        "retry_floor", "abort_grpc", "response_hook", "state",
    )

    def __init__(self) -> None:
        self.retry_floor = 500  # plans built field by field (inbound) retry nothing below 5xx
        self.abort_grpc = None  # a fault abort's grpcStatus name (served by nodeagent.proxy.h2)
        # response_hook.ResponseHook when the route has a corsPolicy or the cluster generates
        # hash cookies, else None. ``abort`` is a fault's status, or the LocalReply answering a
        # CORS preflight after a fault delay.
        self.response_hook = None
        # ``cluster`` again when it is a ClusterState (routing's plans; an inbound plan's
        # application cluster is not): typed, so the exchange's picks and records are C calls.
        self.state = None

    def backoff_delay(self, attempt: int, rand) -> float:
        """Seconds to wait before retrying after attempt number ``attempt`` (Envoy's back-off)."""
        return retry_mod.backoff_delay(self.retry, attempt, rand)

    def retry_on_status(self, status: int, attempt: int) -> bool:
        return retry_mod.should_retry(self.retry, attempt, status)

    def retry_on_failure(self, reason: str, attempt: int) -> bool:
        return retry_mod.should_retry(self.retry, attempt, None, _ERROR_FOR_RETRY[reason])


class _Attrs:
    """What policy.routing reads of one request (RequestAttrs' attributes), cheap to
    build: the method and the headers are decoded only when a match reads them."""

    __slots__ = ("exchange", "authority", "path", "port", "source")
    scheme = "http"

    def __init__(self, exchange, authority: str, path: str, port: int, source) -> None:
        self.exchange = exchange
        self.authority = authority
        self.path = path
        self.port = port
        self.source = source

    @property
    def method(self) -> str:
        return self.exchange.method.decode("latin-1")

    @property
    def headers(self):
        return self.exchange.header_map()

    @property
    def source_ip(self) -> str:
        return self.exchange.down.peer.remote[0]


class _RouteEntry:
    """Routing facts of one (snapshot, listener scope, raw Host): the source workload,
    the parsed authority and port, the compiled route table (None: unknown host), and
    the shared ForwardPlans of static destinations (by id; False: not static)."""

    __slots__ = ("snapshot", "source", "src_ns", "authority", "port", "table", "fixed", "plan", "plans", "attrs")

    def __init__(self, snapshot, source, authority: str, port: int) -> None:
        self.snapshot = snapshot
        self.source = source
        self.src_ns = source.namespace if source is not None else None
        self.authority = authority
        self.port = port
        self.attrs = _Attrs(None, authority, "", port, source)  # reused by every request (plan)
        self.table = None
        self.fixed = None  # routing.fixed_destination(table)
        self.plan = None  # the shared plan every request gets, when there is one
        self.plans = {}


class UpstreamEndpoint:
    """One endpoint of a cluster as the engine uses it: address, metric labels."""

    __slots__ = ("id", "addr", "host", "labels", "cluster_endpoint")

    def __init__(self, cep, labels: tuple) -> None:
        self.id = cep.id
        self.addr = (cep.address, cep.port)
        self.host = cep.id
        self.labels = labels
        self.cluster_endpoint = cep


def destination_labels(service, endpoint, protocol: str) -> tuple:
    """Istio's destination_* labels (in telemetry.HTTP_LABELS order) for one endpoint."""
    host = service.host if service is not None else "unknown"
    if endpoint is not None and endpoint.workload is not None:
        wl = endpoint.workload
        name, ns, labels = wl.name, wl.namespace, wl.labels
    else:
        name, ns = "unknown", (service.namespace if service is not None else "unknown")
        labels = endpoint.labels if endpoint is not None else {}
    return (
        name, ns, "unknown",
        labels.get("app", "unknown"), labels.get("version", "unknown"),
        host, host.split(".", 1)[0] if service is not None and service.mesh_internal else host,
        service.namespace if service is not None else "unknown",
        protocol,
    )


class ClusterState:
    """Live state of one cluster: policy, endpoints, picker, outlier detector, pool."""

    __slots__ = (
        "key", "source_namespace", "version", "policy", "endpoints", "by_id", "picker",
        "outlier", "pool", "service", "rand", "no_endpoint_labels", "ejected",
        "connector", "succeeded", "only", "cookie_hook", "retries", "max_retries",
    )

    def __init__(self, key, source_namespace, connector, rand) -> None:
        self.key = key
        self.source_namespace = source_namespace
        self.version = -1
        self.policy = None
        self.endpoints = ()
        self.by_id = {}
        self.picker = None
        self.outlier = None
        self.pool = ClusterPool(key, PoolLimits(), connector)
        self.connector = connector  # the listener's; ``for_cluster`` may bind it to this cluster (seam)
        self.service = None
        self.rand = rand
        self.no_endpoint_labels = None
        self.ejected = frozenset()
        # Endpoint ids whose last recorded outcome was a success: the detector's
        # counters for them are zero, so another success changes nothing there.
        self.succeeded = set()
        self.only = None  # the UpstreamEndpoint of a one-endpoint cluster whose picker keeps no pick state
        self.cookie_hook = None  # response_hook.ResponseHook when the LB hashes on a cookie with a ttl
        # DestinationRule connectionPool.http.maxRetries (Envoy's retry circuit breaker): retries
        # outstanding to the cluster now (decided, their attempt not finished yet), and the limit.
        self.retries = 0
        self.max_retries = UNLIMITED

    def refresh(self, snapshot, now: float) -> None:
        """Re-read policy and endpoints from a new snapshot, keeping live state where it still applies."""
        key = self.key
        policy = cluster_mod.cluster_policy(snapshot, key, self.source_namespace)
        endpoints = cluster_mod.cluster_endpoints(snapshot, key, self.source_namespace)
        service = snapshot.services.get(key.host)
        self.service = service
        if self.policy is None or policy.lb != self.policy.lb:
            self.picker = lb_mod.make_picker(policy.lb)
        if policy.outlier is None:
            self.outlier = None
        elif self.policy is None or self.outlier is None or policy.outlier != self.policy.outlier:
            self.outlier = outlier_mod.OutlierDetector(policy.outlier, now)
        self.succeeded = set()
        if self.outlier is not None:
            self.outlier.set_endpoints([e.id for e in endpoints])
            self.ejected = self.outlier.ejected()
        else:
            self.ejected = frozenset()
        self.pool.limits = PoolLimits(
            max_connections=policy.max_connections or UNLIMITED,
            max_pending=policy.max_pending_requests or UNLIMITED,
            max_requests_per_connection=policy.max_requests_per_connection or 0,
            connect_timeout=policy.connect_timeout,
            idle_timeout=policy.idle_timeout,
        )
        # Seam for the mTLS tunnel (nodeagent.proxy.tunnel.TunnelConnector): a connector may bind
        # itself to the cluster's TLS mode, and name the destination principal it will verify;
        # tls.mode SIMPLE/MUTUAL wraps it in TLS origination (nodeagent.proxy.origination).
        pool = self.pool
        if policy.origination is not None or self.policy is None or policy.tls_mode != self.policy.tls_mode \
                or self.policy.origination is not None:
            pool.connector = origination.bind_connector(self.connector, pool.connector, self.policy, policy,
                                                        service, pool)
        principal_of = getattr(self.pool.connector, "destination_principal", None)
        old = self.by_id
        by_id = {}
        for cep in endpoints:
            prev = old.get(cep.id)
            if prev is not None and prev.cluster_endpoint == cep:
                by_id[cep.id] = prev
            else:
                labels = destination_labels(service, cep.endpoint, "http")
                principal = principal_of(cep) if principal_of is not None else None
                if principal:
                    labels = labels[:2] + (principal,) + labels[3:]
                by_id[cep.id] = UpstreamEndpoint(cep, labels)
        self.by_id = by_id
        self.endpoints = endpoints
        # With one endpoint every picker answers it unless it is excluded; only round
        # robin keeps state across picks (its position), so it is always asked.
        self.only = (by_id[endpoints[0].id] if len(endpoints) == 1
                     and type(self.picker) is not lb_mod.RoundRobinPicker else None)
        self.no_endpoint_labels = destination_labels(service, None, "http")
        hp = policy.lb.hash
        self.cookie_hook = ResponseHook(None, hp) if hp is not None and hp.cookie_ttl is not None else None
        # Istio's default 2^32-1 is "no limit" (UNLIMITED here: the shared check is skipped)
        limit = policy.max_retries
        self.max_retries = limit if 0 < limit < cluster_mod.UNLIMITED else UNLIMITED
        self.policy = policy
        self.version = snapshot.version

    def pick(self, exchange, tried) -> UpstreamEndpoint | None:
        only = self.only
        if only is not None:
            eid = only.id
            if eid in self.ejected:
                return None
            if tried:
                for e in tried:  # a loop, not any(generator): pick is cpdef (no closures)
                    if e.id == eid:
                        return None
            self.picker.request_started(eid)
            return only
        exclude = self.ejected
        if tried:
            exclude = exclude | {e.id for e in tried}
        policy = self.policy
        hk = None
        if policy.lb.hash is not None and exchange is not None:
            hk = lb_mod.hash_key(policy.lb, exchange.header_map(), exchange.path_str(), exchange.down.peer.remote[0])
            if not hk and policy.lb.hash.cookie_ttl is not None:
                # httpCookie with a ttl and no cookie: Envoy generates one (set on the response
                # by response_hook) and hashes on its value
                peer = exchange.down.peer
                hk = lb_mod.generated_cookie_value(peer.remote, peer.local)
        cep = self.picker.pick(self.endpoints, hk, self.rand, exclude)
        if cep is None:
            return None
        self.picker.request_started(cep.id)
        return self.by_id[cep.id]

    def done(self, endpoint: UpstreamEndpoint) -> None:
        self.picker.request_finished(endpoint.id)

    def retry_begin(self) -> bool:
        """A retry was decided: True when the cluster's retry circuit breaker (maxRetries) lets
        it go (it is then outstanding until ``retry_end``); False when maxRetries retries are
        already outstanding (Envoy's retry overflow: the request is not retried)."""
        if self.retries >= self.max_retries:
            return False
        self.retries += 1
        return True

    def retry_end(self) -> None:
        """The attempt of a retry ``retry_begin`` let go is over (its response head came, it
        failed, or the exchange ended)."""
        if self.retries > 0:
            self.retries -= 1

    def labels_for(self, endpoint) -> tuple:
        return self.no_endpoint_labels if endpoint is None else endpoint.labels

    def record(self, endpoint: UpstreamEndpoint, status: int, now: float) -> None:
        """Every upstream outcome feeds outlier detection; status 0 = connect failure/reset."""
        outlier = self.outlier
        if outlier is None or endpoint is None:
            return
        eid = endpoint.id
        if 0 < status < 500:
            # A success only resets the endpoint's consecutive-error counters.
            succeeded = self.succeeded
            if eid not in succeeded:
                outlier.record_result(eid, status, now)
                succeeded.add(eid)
            return
        self.succeeded.discard(eid)
        if status:
            event = outlier.record_result(eid, status, now)
        else:
            event = outlier.record_result(eid, None, now, connect_failure=True)
        if event is not None:
            log.info("outlier detection ejected %s from %s (%s) until %.1f",
                     event.endpoint_id, self.key.host, event.reason, event.until)
            self.ejected = outlier.ejected()

    def sweep(self, now: float) -> None:
        outlier = self.outlier
        if outlier is not None and now >= outlier.next_sweep:
            readmitted = outlier.sweep(now)
            if readmitted:
                log.info("outlier detection readmitted %s to %s", ", ".join(readmitted), self.key.host)
            self.ejected = outlier.ejected()
        self.pool.sweep(now)


class ProxyRuntime:
    """Shared by every listener of one worker process."""

    __slots__ = ("snapshots", "telemetry", "limits", "access_log", "rand", "loop", "downstreams", "clusters",
                 "_sources", "_scopes", "_fast_clusters", "_paths", "_sweeper", "cluster_class", "h2_pools")

    def __init__(
        self,
        snapshots: Callable[[], object],
        telemetry,
        limits: Limits = Limits(),
        access_log=None,
        rand: random.Random | None = None,
    ) -> None:
        self.snapshots = snapshots
        self.telemetry = telemetry
        self.limits = limits
        self.access_log = access_log
        self.rand = rand or random.Random()
        self.loop = asyncio.get_event_loop()
        self.downstreams: set = set()
        self.clusters: dict = {}
        self._sources: dict = {}
        self._scopes: dict = {}
        self._fast_clusters: dict = {}
        self._paths: dict = {}  # raw request target -> normalized target (False: InvalidPath)
        self._sweeper = None
        # Builds a cluster's ClusterState; nodeagent.proxy.shared's with several workers.
        self.cluster_class = ClusterState
        self.h2_pools: dict = {}  # id(ClusterState) -> its HTTP/2 upstream pool (nodeagent.proxy.h2.pool_for)

    # --- lifecycle ----------------------------------------------------
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._sweeper = self.loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        tick = SWEEP_TICK
        seen_version = None
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            snapshot = self.snapshots()
            if snapshot is not None and snapshot.version != seen_version:
                seen_version = snapshot.version
                self._forget_removed_clusters(snapshot)
            for state in list(self.clusters.values()):
                state.sweep(now)
            limits = self.limits
            for down in list(self.downstreams):
                down.check_timers(tick, limits)

    def _forget_removed_clusters(self, snapshot) -> None:
        """Drop the state (and idle connections) of services the new config no longer has."""
        for ck, state in list(self.clusters.items()):
            if state.key.host not in snapshot.services:
                state.pool.retired = True
                state.pool.close_all()
                del self.clusters[ck]
        self._fast_clusters.clear()
        for _, routes in self._scopes.values():
            routes.clear()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for down in list(self.downstreams):
            down.close()
        for state in self.clusters.values():
            state.pool.close_all()

    # --- per connection -----------------------------------------------
    def peer_info(self, ctx: ListenerContext, transport) -> PeerInfo:
        remote = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        dest = ctx.fixed_destination
        if dest is None and ctx.original_destination is not None:
            dest = ctx.original_destination(transport.get_extra_info("socket"))
        return PeerInfo(remote=tuple(remote[:2]), local=tuple(local[:2]), original_destination=dest)

    def authorize_connection(self, ctx: ListenerContext, peer: PeerInfo) -> bool:
        """The listener's L4 authorization hook (inbound listeners); True = accept."""
        authorizer = ctx.authorizer
        if authorizer is None:
            return True
        denied = authorizer.authorize_connection(peer)
        if denied:
            log.info("connection from %s:%s denied on %s: %s", peer.remote[0], peer.remote[1], ctx.name, denied)
            return False
        return True

    def source_ref(self, ctx: ListenerContext, snapshot):
        """The snapshot's WorkloadRef of the listener's source workload (None when unknown)."""
        src = ctx.source
        if src is None:
            return None
        key = (src.namespace, src.name, snapshot.version)
        try:
            return self._sources[key]
        except KeyError:
            pass
        ref = None
        for wl in snapshot.workloads:
            if wl.namespace == src.namespace and wl.name == src.name:
                ref = wl
                break
        if ref is None:
            from policy.snapshot import WorkloadRef
            ref = WorkloadRef(name=src.name, namespace=src.namespace,
                              service_account=src.service_account, labels=src.labels, address="")
        if len(self._sources) > 1024:
            self._sources.clear()
        self._sources[key] = ref
        return ref

    # --- per request --------------------------------------------------
    def plan(self, exchange):
        """The ForwardPlan (or LocalReply) of one request on the current snapshot.

        What depends only on (snapshot, listener, source, destination, Host) is
        resolved once into a ``_RouteEntry`` (service, port, compiled route
        table); a route and destination whose plan is the same for every request
        (``routing.is_static``) hand out one shared ForwardPlan."""
        raw = exchange.path
        # Routing reads the path as str: decoded once here, and tested as str (needs_normalizing,
        # inlined; str's ``in`` is cheap, bytes' is not).
        path = raw.decode("latin-1")
        if ("." in path or "%" in path or "\\" in path or "#" in path) and raw[:1] == b"/":
            # Envoy's HCM normalizes before routing (Istio's defaults), and forwards the result.
            normalized = self._normalized(raw)
            if normalized is False:
                exchange.dest = _NO_DESTINATION
                return _BAD_PATH
            exchange.path = normalized
            path = normalized.decode("latin-1")
        snapshot = self.snapshots()
        down = exchange.down
        routes = down.routes
        if routes is None:
            routes = down.routes = self._scope(down)
        entry = routes.get(exchange.authority)
        if entry is None or entry.snapshot is not snapshot:
            entry = self._route_entry(routes, exchange.authority, down, snapshot)
        plan = entry.plan
        if plan is not None:
            exchange.dest = plan.state.no_endpoint_labels  # state: the plan's cluster (_forward)
            return plan
        table = entry.table
        if table is None:
            exchange.dest = _NO_DESTINATION
            return LocalReply(404, "NR", b"", [])
        # The entry's request view, pointed at this request for the time of the call
        # (routing is synchronous and keeps no reference to it).
        attrs = entry.attrs
        attrs.exchange = exchange
        attrs.path = path
        path_only = routing.path_part(path) if "?" in path or "#" in path else path
        hit = routing.select_route(table, attrs, path_only, self.rand)
        if hit.__class__ is routing.Reject:
            attrs.exchange = None
            return self._reject(exchange, hit)
        route, match, dest = hit
        cached = entry.plans.get(id(dest))
        if cached:
            attrs.exchange = None
            exchange.dest = cached.cluster.no_endpoint_labels
            return cached
        result = routing.finish_plan(route, match, dest, attrs, path_only, self.rand)
        plan = self._forward(result, attrs, entry, snapshot, down.ctx)
        attrs.exchange = None
        if cached is None:
            if routing.is_static(route, dest):
                entry.plans[id(dest)] = plan
                if dest is entry.fixed:
                    entry.plan = plan
            else:
                entry.plans[id(dest)] = False
        exchange.dest = plan.state.no_endpoint_labels
        if route.cors is not None:  # never a static route (routing.is_static)
            return self._cors(exchange, route.cors, plan)
        return plan

    def _cors(self, exchange, cors, plan):
        """A route with a corsPolicy: its plan gets the response hook, and a CORS preflight
        Envoy's CORS filter answers itself (policy.cors.preflight) is answered. Istio puts
        the fault filter first: an abort wins, a delay comes first."""
        cookie = plan.response_hook
        plan.response_hook = ResponseHook(cors, cookie.cookie if cookie is not None else None)
        reply = preflight_reply(cors, exchange, LocalReply)
        if reply is None or plan.abort is not None:
            return plan
        if plan.delay:
            plan.abort = reply  # answered by the engine once the delay is over
            return plan
        return reply

    def _normalized(self, raw: bytes):
        """The request target as routed and forwarded (policy.authz.normalize_path, query
        kept); False when Envoy rejects it (InvalidPath: 400). Memoized per raw target."""
        paths = self._paths
        try:
            return paths[raw]
        except KeyError:
            pass
        try:
            normalized = normalize_path(raw.decode("latin-1"), keep_query=True).encode("latin-1")
        except InvalidPath:
            normalized = False
        if len(paths) >= _PATH_CACHE_LIMIT:
            paths.clear()
        paths[raw] = normalized
        return normalized

    def _scope(self, down) -> dict:
        """The route entries (by raw Host) shared by connections of one listener and destination."""
        ctx = down.ctx
        key = (id(ctx), down.target, down.peer.original_destination)
        hit = self._scopes.get(key)
        if hit is None or hit[0] is not ctx:
            if len(self._scopes) >= 4096:
                self._scopes.clear()  # connections keep their own dict; new ones start afresh
            hit = self._scopes[key] = (ctx, {})
        return hit[1]

    def _route_entry(self, routes: dict, raw_authority: bytes, down, snapshot) -> "_RouteEntry":
        ctx = down.ctx
        source = self.source_ref(ctx, snapshot)
        authority, port = _parse_authority(raw_authority, down.peer.original_destination)
        entry = _RouteEntry(snapshot, source, authority, port)
        ns = source.namespace if source is not None else "default"
        target = down.target
        if target is None:
            # Unknown host: 404 NR (routing.plan_request's rule).
            service = snapshot.resolve_host(authority, ns)
            service_port = port
            if service is not None and service.port(port) is None and raw_authority:
                colon = raw_authority.rfind(b":")
                if colon > 0 and raw_authority[colon + 1:].isdigit() and b"]" not in raw_authority[colon:]:
                    # An explicit Host port the service lacks: Istio has no virtual host
                    # for it (404 NR). Without a port the listener's/default port applies.
                    service = None
        else:
            # The listener knows the destination service (SO_ORIGINAL_DST, --forward):
            # route as that service whatever the Host header says.
            service = snapshot.services.get(target[0])
            service_port = target[1]
        if service is not None:
            entry.table = routing.route_table(snapshot, service, service_port, ns)
            entry.fixed = routing.fixed_destination(entry.table)
        if len(routes) > 4096:
            routes.clear()
        routes[raw_authority] = entry
        return entry

    def _reject(self, exchange, result) -> LocalReply:
        flags = result.response_flags or "-"
        if flags == "NR":
            exchange.dest = _NO_DESTINATION
        return LocalReply(
            result.status, flags, result.body,
            [(n.encode("latin-1"), v.encode("latin-1")) for n, v in result.headers],
        )

    def _forward(self, result, attrs, entry, snapshot, ctx) -> ForwardPlan:
        src_ns = entry.src_ns
        plan = ForwardPlan()
        plan.cluster = plan.state = self.cluster(result.cluster, src_ns, snapshot, ctx)
        plan.path = result.path.encode("latin-1") if result.path is not attrs.path and result.path != attrs.path else None
        plan.authority = result.authority.encode("latin-1") if result.authority != attrs.authority else None
        plan.request_ops = result.request_headers or None
        plan.response_ops = result.response_headers or None
        plan.timeout = result.timeout
        retry = plan.retry = result.retry
        plan.per_try_timeout = retry.per_try_timeout if retry is not None else None
        plan.retry_floor = _retry_floor(retry)
        plan.delay = result.fault_delay
        plan.abort = result.fault_abort
        plan.abort_grpc = result.fault_grpc_status
        plan.route_name = result.route_name or ""
        if result.mirrors:
            plan.mirror = [self.cluster(k, src_ns, snapshot, ctx) for k in result.mirrors]
            plan.mirror_authority = shadow_authority(result.authority).encode("latin-1")
        else:
            plan.mirror = None
        plan.response_hook = plan.cluster.cookie_hook  # a CORS route's hook is set by plan()
        return plan

    def cluster(self, key, source_namespace, snapshot, ctx: ListenerContext) -> ClusterState:
        # Fast path by identity: a snapshot's compiled routes hand out the same
        # ClusterKey objects, whose dataclass hash is comparatively slow.
        fast = self._fast_clusters.get((id(key), source_namespace, id(ctx.connector)))
        if fast is not None and fast[0] is key and fast[1].version == snapshot.version:
            return fast[1]
        ck = (key, source_namespace, id(ctx.connector))
        state = self.clusters.get(ck)
        if state is None:
            state = self.cluster_class(key, source_namespace, ctx.connector, self.rand)
            self.clusters[ck] = state
        if state.version != snapshot.version:
            state.refresh(snapshot, self.loop.time())
        if len(self._fast_clusters) > 4096:
            self._fast_clusters.clear()
        self._fast_clusters[(id(key), source_namespace, id(ctx.connector))] = (key, state)
        return state

    def mirror(self, exchange, plan: ForwardPlan) -> None:
        """Fire-and-forget copies of a fully received, replayable request."""
        body = b"".join(exchange.replay) if exchange.replay else b""
        for state in plan.mirror:
            MirrorExchange(self, state, exchange, plan, body).start()

    # --- telemetry ----------------------------------------------------
    def record_exchange(self, exchange) -> None:
        if type(exchange) is H1Exchange:
            exchange.record_in(self)  # the same, with the exchange's fields read as C fields
            return
        down = exchange.down
        self.record_fields(exchange, down, down.ctx, exchange.dest, exchange.status, exchange.flags,
                           exchange.t0, exchange.req_bytes, exchange.resp_bytes, exchange.endpoint,
                           exchange.cluster)

    def record_fields(self, exchange, down, ctx, dest, status, flags, t0, req_bytes, resp_bytes,
                      endpoint, cluster) -> None:
        """record_exchange, given the exchange's fields (metrics, LB bookkeeping, access log)."""
        duration_ms = (time.monotonic() - t0) * 1000.0
        self.telemetry.record_http(ctx, dest or _NO_DESTINATION, status, flags, duration_ms,
                                   req_bytes, resp_bytes)
        if endpoint is not None and cluster is not None:
            if isinstance(cluster, ClusterState):
                state = cluster  # typed in runtime.pxd: done() is a C call
                state.done(endpoint)
            else:
                cluster.done(endpoint)
        if self.access_log is not None:
            self.access_log.http(exchange, down, ctx.source, duration_ms)

    def telemetry_local_error(self, down, status: int) -> None:
        self.telemetry.record_http(down.ctx, _NO_DESTINATION, status, "-", 0.0, 0, 0)
        if self.access_log is not None:
            self.access_log.protocol_error(down, status)


class MirrorExchange:
    """A shadow copy of a request: sent once, its response read and dropped."""

    __slots__ = ("runtime", "state", "data", "abandoned", "endpoint", "upstream")
    out = ()  # a mirror's response is dropped, never written anywhere

    def __init__(self, runtime, state: ClusterState, exchange, plan: ForwardPlan, body: bytes) -> None:
        self.runtime = runtime
        self.state = state
        self.abandoned = False
        self.endpoint = None
        self.upstream = None
        parts = [exchange.method, b" ", plan.path or exchange.path, b" HTTP/1.1\r\nhost: ", plan.mirror_authority, b"\r\n"]
        for name, value in exchange.headers:
            if name.lower() != b"content-length":
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"content-length: %d\r\n\r\n" % len(body))
        parts.append(body)
        self.data = b"".join(parts)

    def start(self) -> None:
        endpoint = self.state.pick(None, None)
        if endpoint is None:
            return
        self.endpoint = endpoint
        if self.state.pool.acquire(self, endpoint.addr) is not None:
            self._done()

    def _done(self) -> None:
        if self.endpoint is not None:
            self.state.done(self.endpoint)
            self.endpoint = None

    def upstream_ready(self, conn) -> None:
        self.upstream = conn
        conn.send(self, self.data, False)

    def upstream_connect_failed(self, endpoint, reason=None) -> None:
        self.state.record(self.endpoint, 0, self.runtime.loop.time())
        self._done()

    def upstream_failed(self, conn, flag) -> None:
        self._done()

    def upstream_head(self, conn, status, parts, length, hop) -> None:
        self.state.record(self.endpoint, status, self.runtime.loop.time())

    def upstream_body(self, body) -> None:
        pass

    def upstream_complete(self, conn) -> None:
        conn.pool.release(conn, conn.keep_alive)
        self._done()

    def upstream_upgraded(self, tail) -> None:
        self.upstream.close()
        self._done()

    def upstream_raw(self, data) -> None:
        pass

    def upstream_raw_closed(self) -> None:
        pass

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass
