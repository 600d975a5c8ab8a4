"""Effective per-cluster policy: a DestinationRule merged the way Istio merges it.

A cluster is (service host, subset, port). Everything here is pure and cached
per snapshot, so the proxy may call it per request.

Merge order (Istio ``MergeTrafficPolicy``): the host-level ``trafficPolicy``;
its ``portLevelSettings`` entry for the port REPLACES loadBalancer,
connectionPool, outlierDetection and tls (omitted ones fall back to defaults,
they are not inherited); then the subset's ``trafficPolicy`` replaces each of
those sections it sets; then the subset's ``portLevelSettings`` entry for the
port replaces all four again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from policy.outlier import OutlierPolicy, outlier_policy_from

if TYPE_CHECKING:
    from policy.snapshot import ConfigSnapshot, Endpoint

UNLIMITED = 2**32 - 1          # Istio's default for every circuit-breaker threshold
DEFAULT_CONNECT_TIMEOUT = 10.0  # Istio meshConfig.connectTimeout
DEFAULT_IDLE_TIMEOUT = 3600.0   # Envoy's upstream idle timeout
DEFAULT_MINIMUM_RING_SIZE = 1024

# ---------------------------------------------------------------------------
# per-snapshot memo shared by cluster.py and routing.py

_SNAPSHOT_MEMOS: list[tuple[object, dict]] = []
_MEMO_SNAPSHOTS = 4     # old snapshots may still serve in-flight requests
MEMO_LIMIT = 16384      # entries per snapshot before the memo is cleared


def snapshot_memo(snapshot) -> dict:
    """A dict private to ``snapshot`` for compiled data (kept for the last few
    snapshots; holding the snapshot object keeps its id from being reused)."""
    for snap, memo in _SNAPSHOT_MEMOS:
        if snap is snapshot:
            return memo
    memo: dict = {}
    _SNAPSHOT_MEMOS.insert(0, (snapshot, memo))
    del _SNAPSHOT_MEMOS[_MEMO_SNAPSHOTS:]
    return memo


def memo_put(memo: dict, key, value):
    if len(memo) >= MEMO_LIMIT:
        memo.clear()
    memo[key] = value
    return value


# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterKey:
    host: str            # service FQDN
    subset: str | None   # DestinationRule subset name, None = all endpoints
    port: int            # service port number

    def __str__(self) -> str:
        # Envoy's cluster name: outbound|port|subset|host
        return f"outbound|{self.port}|{self.subset or ''}|{self.host}"


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """What a consistent-hash load balancer hashes on."""
    kind: str                  # "header" | "cookie" | "source_ip" | "query"
    name: str | None           # header (lower-case) / cookie / query-parameter name
    cookie_path: str | None = None
    cookie_ttl: float | None = None


@dataclass(frozen=True, slots=True)
class LbPolicy:
    kind: str                  # "LEAST_REQUEST" | "ROUND_ROBIN" | "RANDOM" | "PASSTHROUGH" | "RING_HASH" | "MAGLEV"
    hash: HashPolicy | None = None
    minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE


DEFAULT_LB = LbPolicy("LEAST_REQUEST")


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    """Istio defaults apply to every field the DestinationRule leaves out."""
    key: ClusterKey
    lb: LbPolicy
    max_connections: int           # tcp.maxConnections (default 2^32-1)
    max_pending_requests: int      # http.http1MaxPendingRequests (default 2^32-1)
    max_requests: int              # http.http2MaxRequests (default 2^32-1)
    max_requests_per_connection: int  # 0 = unlimited
    max_retries: int               # concurrent retries (default 2^32-1)
    connect_timeout: float         # seconds, default 10
    idle_timeout: float            # seconds, default 3600 (http.idleTimeout, else tcp.idleTimeout)
    outlier: OutlierPolicy | None
    tls_mode: str                  # "ISTIO_MUTUAL" | "DISABLE" | "SIMPLE" | "MUTUAL"
    sni: str | None
    subject_alt_names: tuple[str, ...]
    destination_rule: str | None   # "namespace/name" of the DestinationRule used
    # TLS origination (tls.mode SIMPLE or MUTUAL): what the proxy needs to open TLS to the
    # endpoint; None for DISABLE and ISTIO_MUTUAL.
    origination: "TlsOrigination | None" = None


@dataclass(frozen=True, slots=True)
class TlsOrigination:
    """A DestinationRule's ``tls`` with mode SIMPLE or MUTUAL, as the proxy applies it
    (Istio's upstream TLS context). File paths are read by the proxy, as a sidecar reads
    them; ``credential_name`` (a Kubernetes Secret) cannot be read here."""
    mode: str                           # "SIMPLE" | "MUTUAL"
    ca_certificates: str | None         # None: the system trust store
    client_certificate: str | None
    private_key: str | None
    credential_name: str | None
    sni: str | None                     # tls.sni, else the destination host (Istio)
    subject_alt_names: tuple[str, ...]  # empty: the server certificate must match ``sni``
    insecure_skip_verify: bool
    ca_crl: str | None = None           # PEM CRL(s) checked for every CA of the server's chain
    # Where the settings came from, for messages: "DestinationRule ns/name", "file:line", the
    # field path of the tls section ("spec.subsets[0].trafficPolicy.tls").
    ref: str = ""
    source: str = ""
    field: str = ""

    def settings(self) -> tuple:
        """What the TLS context depends on (not where it was written)."""
        return (self.mode, self.ca_certificates, self.client_certificate, self.private_key,
                self.credential_name, self.sni, self.subject_alt_names, self.insecure_skip_verify, self.ca_crl)


class ClusterEndpoint:
    """One endpoint of one cluster, with the port already resolved."""

    __slots__ = ("id", "address", "port", "weight", "labels", "endpoint")

    def __init__(self, address: str, port: int, weight: int, labels: Mapping[str, str],
                 endpoint: Endpoint | None = None) -> None:
        self.id = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.address = address
        self.port = port
        self.weight = weight
        self.labels = labels
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"ClusterEndpoint({self.id}, weight={self.weight})"


# ---------------------------------------------------------------------------


def _port_settings(tp, port: int):
    for p in tp.port_level_settings:
        if p.port == port:
            return p
    return None


def _port_index(tp, port: int) -> int:
    for i, p in enumerate(tp.port_level_settings):
        if p.port == port:
            return i
    return -1


def effective_traffic_policy(dr_spec, subset_name: str | None, port: int):
    """(load_balancer, connection_pool, outlier_detection, tls) after Istio's merge."""
    return _merge(dr_spec, subset_name, port)[:4]


def _merge(dr_spec, subset_name: str | None, port: int):
    """``effective_traffic_policy`` and, last, the field path the tls section came from."""
    lb = cp = od = tls = None
    tls_path = ""
    tp = dr_spec.traffic_policy
    if tp is not None:
        lb, cp, od, tls = tp.load_balancer, tp.connection_pool, tp.outlier_detection, tp.tls
        tls_path = "spec.trafficPolicy.tls"
        i = _port_index(tp, port)
        if i >= 0:
            pl = tp.port_level_settings[i]
            lb, cp, od, tls = pl.load_balancer, pl.connection_pool, pl.outlier_detection, pl.tls
            tls_path = f"spec.trafficPolicy.portLevelSettings[{i}].tls"
    if subset_name is not None:
        for n, s in enumerate(dr_spec.subsets):
            if s.name == subset_name and s.traffic_policy is not None:
                stp = s.traffic_policy
                lb = stp.load_balancer or lb
                cp = stp.connection_pool or cp
                od = stp.outlier_detection or od
                if stp.tls is not None:
                    tls, tls_path = stp.tls, f"spec.subsets[{n}].trafficPolicy.tls"
                i = _port_index(stp, port)
                if i >= 0:
                    pl = stp.port_level_settings[i]
                    lb, cp, od, tls = pl.load_balancer, pl.connection_pool, pl.outlier_detection, pl.tls
                    tls_path = f"spec.subsets[{n}].trafficPolicy.portLevelSettings[{i}].tls"
                break
    return lb, cp, od, tls, tls_path


def lb_policy_from(settings) -> LbPolicy:
    """A ``LoadBalancerSettings`` (or None) as an ``LbPolicy``."""
    if settings is None:
        return DEFAULT_LB
    ch = settings.consistent_hash
    if ch is not None:
        if ch.http_header_name:
            hp = HashPolicy("header", ch.http_header_name.lower())
        elif ch.http_cookie is not None:
            hp = HashPolicy("cookie", ch.http_cookie.name, ch.http_cookie.path, ch.http_cookie.ttl)
        elif ch.use_source_ip:
            hp = HashPolicy("source_ip", None)
        elif ch.http_query_parameter_name:
            hp = HashPolicy("query", ch.http_query_parameter_name)
        else:
            hp = None
        ring = DEFAULT_MINIMUM_RING_SIZE
        if ch.ring_hash is not None and ch.ring_hash.minimum_ring_size:
            ring = ch.ring_hash.minimum_ring_size
        elif ch.minimum_ring_size:
            ring = ch.minimum_ring_size
        return LbPolicy("MAGLEV" if ch.maglev is not None else "RING_HASH", hp, ring)
    simple = settings.simple
    if simple in (None, "UNSPECIFIED", "LEAST_CONN", "LEAST_REQUEST"):
        return DEFAULT_LB
    return LbPolicy(simple)


def cluster_policy(snapshot: ConfigSnapshot, key: ClusterKey,
                   source_namespace: str | None) -> ClusterPolicy:
    """The DestinationRule for ``key.host`` seen from ``source_namespace``:
    host-level traffic policy, then the subset's (replacing whole sections), then
    portLevelSettings for ``key.port`` (see the module docstring)."""
    ns = source_namespace or "default"
    memo = snapshot_memo(snapshot)
    mkey = ("policy", key, ns)
    try:
        return memo[mkey]
    except KeyError:
        pass
    dr = snapshot.destination_rule_for(key.host, ns)
    lb = cp = od = tls = None
    tls_path = ""
    if dr is not None:
        lb, cp, od, tls, tls_path = _merge(dr.spec, key.subset, key.port)
    tcp = cp.tcp if cp is not None else None
    http = cp.http if cp is not None else None
    svc = snapshot.services.get(key.host)
    if tls is not None:
        tls_mode, sni, sans = tls.mode, tls.sni, tls.subject_alt_names
    else:
        # auto mTLS: in-mesh destinations get Istio mTLS, others plaintext
        tls_mode = "ISTIO_MUTUAL" if (svc is not None and svc.mesh_internal) else "DISABLE"
        sni, sans = None, ()
    if not sans and svc is not None:
        sans = svc.subject_alt_names
    origination = None
    if tls is not None and tls_mode in ("SIMPLE", "MUTUAL"):
        # Istio sends the destination host as SNI when tls.sni is unset (SIMPLE/MUTUAL);
        # a wildcard host names no server.
        host_sni = key.host if not key.host.startswith("*") else None
        origination = TlsOrigination(
            mode=tls_mode, ca_certificates=tls.ca_certificates or None,
            client_certificate=tls.client_certificate or None, private_key=tls.private_key or None,
            credential_name=tls.credential_name or None, sni=tls.sni or host_sni,
            subject_alt_names=tuple(tls.subject_alt_names), insecure_skip_verify=bool(tls.insecure_skip_verify),
            ca_crl=tls.ca_crl or None,
            ref=f"DestinationRule {dr.namespace}/{dr.name}",
            source=f"{dr.source.file}:{dr.source.line}" if dr.source is not None else "", field=tls_path)
    idle = (http.idle_timeout if http is not None and http.idle_timeout else None) \
        or (tcp.idle_timeout if tcp is not None and tcp.idle_timeout else None) or DEFAULT_IDLE_TIMEOUT
    policy = ClusterPolicy(
        key=key,
        lb=lb_policy_from(lb),
        max_connections=(tcp.max_connections if tcp is not None and tcp.max_connections else UNLIMITED),
        max_pending_requests=(http.http1_max_pending_requests
                              if http is not None and http.http1_max_pending_requests else UNLIMITED),
        max_requests=(http.http2_max_requests if http is not None and http.http2_max_requests else UNLIMITED),
        max_requests_per_connection=(http.max_requests_per_connection
                                     if http is not None and http.max_requests_per_connection else 0),
        max_retries=(http.max_retries if http is not None and http.max_retries else UNLIMITED),
        connect_timeout=(tcp.connect_timeout if tcp is not None and tcp.connect_timeout
                         else DEFAULT_CONNECT_TIMEOUT),
        idle_timeout=idle,
        outlier=outlier_policy_from(od),
        tls_mode=tls_mode,
        sni=sni,
        subject_alt_names=tuple(sans),
        destination_rule=f"{dr.namespace}/{dr.name}" if dr is not None else None,
        origination=origination,
    )
    return memo_put(memo, mkey, policy)


def cluster_endpoints(snapshot: ConfigSnapshot, key: ClusterKey,
                      source_namespace: str | None = None) -> tuple[ClusterEndpoint, ...]:
    """Endpoints of the service selected by the subset's labels (all when no
    subset), with the target port for ``key.port`` resolved. Unknown service,
    port or subset -> (). The same tuple object is returned for the same
    snapshot, so pickers can keep per-tuple state."""
    ns = source_namespace or "default"
    memo = snapshot_memo(snapshot)
    mkey = ("endpoints", key, ns)
    try:
        return memo[mkey]
    except KeyError:
        pass
    result: tuple[ClusterEndpoint, ...] = ()
    svc = snapshot.services.get(key.host)
    sp = svc.port(key.port) if svc is not None else None
    if sp is not None:
        if key.subset is None:
            eps = svc.endpoints
        else:
            labels = snapshot.subset_labels(key.host, key.subset, ns)
            eps = svc.endpoints_matching(labels) if labels is not None else ()
        result = tuple(ClusterEndpoint(e.address, svc.endpoint_port(e, sp),
                                       e.weight if e.weight else 1, e.labels, e)
                       for e in eps if e.address)
    return memo_put(memo, mkey, result)

