"""Typed, frozen data model of the Istio resources nodeagent enforces.

Pure data, no I/O. Objects are produced by ``policy.loader`` (which validates
them); other modules only read them.

Conventions (see docs/internals.md):

- Class names are Istio's proto message names; field names are the snake_case
  of Istio's JSON names (``consecutive5xxErrors`` -> ``consecutive_5xx_errors``,
  ``from`` -> ``from_``).
- Every class is ``@dataclass(frozen=True, slots=True)``.
- Optional scalars and messages are ``None`` when absent; repeated fields are
  tuples (empty when absent); maps are read-only ``Mapping`` objects
  (``types.MappingProxyType``, empty when absent).
- Durations are ``float`` seconds. Percentages are ``float`` in 0..100.
- Enums are upper-case ``str`` as written (the legacy ``LEAST_CONN`` is kept
  as written; pickers treat it as ``LEAST_REQUEST``).
- ``PortSelector`` (``port: {number: N}``) is flattened to ``int | None``;
  ``Percent`` (``percentage: {value: X}``) is flattened to ``float | None``.
- Legacy integer percentages (``Delay.percent``, ``Abort`` has none,
  ``HTTPRoute.mirrorPercent``) are kept as written AND folded into the
  ``percentage`` / ``mirror_percentage`` float when the new field is absent,
  so consumers read only the float.
- ``StringMatch.kind`` is ``"exact"``, ``"prefix"`` or ``"regex"``. In
  ``headers``, ``withoutHeaders`` and ``queryParams`` an empty matcher ``{}``
  (Istio: "header present" / "header absent") is ``StringMatch("present", "")``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

__all__ = [
    "EMPTY_MAP", "frozen_map",
    "SourceRef", "Resource", "Spec", "SPEC_KINDS", "NETWORKING_GROUP", "SECURITY_GROUP",
    # networking: shared
    "StringMatch", "Destination", "Headers", "HeaderOperations", "WorkloadSelector",
    "PolicyTargetReference",
    # VirtualService
    "VirtualService", "HTTPRoute", "HTTPMatchRequest", "HTTPRouteDestination",
    "HTTPRedirect", "HTTPDirectResponse", "HTTPBody", "Delegate", "HTTPRewrite",
    "RegexRewrite", "HTTPRetry", "HTTPFaultInjection", "Delay", "Abort",
    "HTTPMirrorPolicy", "CorsPolicy", "TCPRoute", "TLSRoute", "L4MatchAttributes",
    "TLSMatchAttributes", "RouteDestination",
    # DestinationRule
    "DestinationRule", "TrafficPolicy", "PortTrafficPolicy", "TunnelSettings",
    "ProxyProtocol", "Subset", "LoadBalancerSettings", "ConsistentHashLB", "HTTPCookie",
    "RingHash", "MagLev", "LocalityLoadBalancerSetting", "LocalityDistribute",
    "LocalityFailover", "ConnectionPoolSettings", "TCPSettings", "TCPKeepalive",
    "HTTPSettings", "OutlierDetection", "ClientTLSSettings",
    # ServiceEntry / WorkloadEntry
    "ServiceEntry", "ServicePort", "WorkloadEntry",
    # security
    "AuthorizationPolicy", "Rule", "RuleFrom", "RuleTo", "Source", "Operation",
    "Condition", "ExtensionProvider", "PeerAuthentication", "PeerAuthenticationMutualTLS",
]

NETWORKING_GROUP = "networking.istio.io"
SECURITY_GROUP = "security.istio.io"

EMPTY_MAP: Mapping = MappingProxyType({})


def frozen_map(d: Mapping | None = None) -> Mapping:
    """A read-only mapping (empty when ``d`` is falsy)."""
    if not d:
        return EMPTY_MAP
    return MappingProxyType(dict(d))


def _map():
    return field(default_factory=lambda: EMPTY_MAP)


_frozen = dataclass(frozen=True, slots=True)


# --------------------------------------------------------------------------
# shared messages


@_frozen
class StringMatch:
    """``exact`` / ``prefix`` / ``regex`` (RE2 syntax); ``present`` for ``{}`` in header maps."""
    kind: str
    value: str


@_frozen
class Destination:
    host: str
    subset: str | None = None
    port: int | None = None          # flattened PortSelector {number}


@_frozen
class HeaderOperations:
    set: Mapping[str, str] = _map()
    add: Mapping[str, str] = _map()
    remove: tuple[str, ...] = ()


@_frozen
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@_frozen
class WorkloadSelector:
    """``selector.matchLabels`` (security, DestinationRule) or ``workloadSelector.labels`` (ServiceEntry)."""
    match_labels: Mapping[str, str] = _map()


@_frozen
class PolicyTargetReference:
    group: str | None = None
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None


# --------------------------------------------------------------------------
# VirtualService


@_frozen
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: Mapping[str, StringMatch] = _map()
    port: int | None = None
    source_labels: Mapping[str, str] = _map()
    gateways: tuple[str, ...] = ()
    query_params: Mapping[str, StringMatch] = _map()
    ignore_uri_case: bool = False
    without_headers: Mapping[str, StringMatch] = _map()
    source_namespace: str | None = None
    stat_prefix: str | None = None


@_frozen
class HTTPRouteDestination:
    destination: Destination
    weight: int | None = None
    headers: Headers | None = None


@_frozen
class RouteDestination:
    """TCP/TLS route destination."""
    destination: Destination
    weight: int | None = None


@_frozen
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = None     # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str | None = None
    redirect_code: int | None = None   # None -> 301


@_frozen
class HTTPBody:
    string: str | None = None
    bytes: str | None = None           # base64 as written


@_frozen
class HTTPDirectResponse:
    status: int
    body: HTTPBody | None = None


@_frozen
class Delegate:
    name: str
    namespace: str | None = None


@_frozen
class RegexRewrite:
    match: str
    rewrite: str


@_frozen
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@_frozen
class HTTPRetry:
    attempts: int = 0
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()          # "5xx,connect-failure" split on commas
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: float | None = None


@_frozen
class Delay:
    fixed_delay: float | None = None
    exponential_delay: float | None = None
    percentage: float | None = None     # Percent.value, or legacy `percent` when absent
    percent: int | None = None          # legacy int, as written


@_frozen
class Abort:
    http_status: int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: float | None = None


@_frozen
class HTTPFaultInjection:
    delay: Delay | None = None
    abort: Abort | None = None


@_frozen
class HTTPMirrorPolicy:
    destination: Destination
    percentage: float | None = None


@_frozen
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()      # deprecated
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str | None = None  # UNSPECIFIED | FORWARD | IGNORE


@_frozen
class HTTPRoute:
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: float | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percentage: float | None = None  # mirrorPercentage.value, or legacy mirrorPercent
    mirror_percent: int | None = None       # legacy, as written
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@_frozen
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] = _map()
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@_frozen
class TLSMatchAttributes:
    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] = _map()
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@_frozen
class TCPRoute:
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@_frozen
class TLSRoute:
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@_frozen
class VirtualService:
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# DestinationRule


@_frozen
class HTTPCookie:
    name: str
    path: str | None = None
    ttl: float | None = None


@_frozen
class RingHash:
    minimum_ring_size: int | None = None


@_frozen
class MagLev:
    table_size: int | None = None


@_frozen
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = None     # deprecated, as written


@_frozen
class LocalityDistribute:
    from_: str | None = None
    to: Mapping[str, int] = _map()


@_frozen
class LocalityFailover:
    from_: str | None = None
    to: str | None = None


@_frozen
class LocalityLoadBalancerSetting:
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: bool | None = None


@_frozen
class LoadBalancerSettings:
    simple: str | None = None   # UNSPECIFIED|LEAST_CONN|RANDOM|PASSTHROUGH|ROUND_ROBIN|LEAST_REQUEST
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: float | None = None


@_frozen
class TCPKeepalive:
    probes: int | None = None
    time: float | None = None
    interval: float | None = None


@_frozen
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: float | None = None
    tcp_keepalive: TCPKeepalive | None = None
    max_connection_duration: float | None = None
    idle_timeout: float | None = None


@_frozen
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None
    h2_upgrade_policy: str | None = None   # DEFAULT | DO_NOT_UPGRADE | UPGRADE
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


@_frozen
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@_frozen
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_errors: int | None = None          # legacy (treated as 5xx by Istio), as written
    interval: float | None = None                  # Istio default 10s
    base_ejection_time: float | None = None        # Istio default 30s
    max_ejection_percent: int | None = None        # Istio default 10
    min_health_percent: int | None = None          # Istio default 0
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None


@_frozen
class ClientTLSSettings:
    mode: str = "DISABLE"      # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


@_frozen
class TunnelSettings:
    protocol: str | None = None
    target_host: str = ""
    target_port: int = 0


@_frozen
class ProxyProtocol:
    version: str | None = None   # V1 | V2


@_frozen
class PortTrafficPolicy:
    port: int | None = None      # flattened PortSelector
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@_frozen
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None


@_frozen
class Subset:
    name: str
    labels: Mapping[str, str] = _map()
    traffic_policy: TrafficPolicy | None = None


@_frozen
class DestinationRule:
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None


# --------------------------------------------------------------------------
# ServiceEntry / WorkloadEntry


@_frozen
class ServicePort:
    number: int
    protocol: str | None = None     # HTTP|HTTPS|GRPC|HTTP2|MONGO|TCP|TLS|... (upper-cased; None = sniff)
    name: str = ""
    target_port: int | None = None


@_frozen
class WorkloadEntry:
    """Both the WorkloadEntry kind's spec and a ServiceEntry endpoint."""
    address: str | None = None
    ports: Mapping[str, int] = _map()
    labels: Mapping[str, str] = _map()
    network: str | None = None
    locality: str | None = None
    weight: int | None = None
    service_account: str | None = None


@_frozen
class ServiceEntry:
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: str | None = None       # MESH_EXTERNAL (default) | MESH_INTERNAL
    resolution: str | None = None     # NONE (default) | STATIC | DNS | DNS_ROUND_ROBIN
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: WorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# security


@_frozen
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()


@_frozen
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()        # strings, as in Istio
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@_frozen
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@_frozen
class RuleFrom:
    source: Source | None = None


@_frozen
class RuleTo:
    operation: Operation | None = None


@_frozen
class Rule:
    from_: tuple[RuleFrom, ...] = ()
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


@_frozen
class ExtensionProvider:
    name: str


@_frozen
class AuthorizationPolicy:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    action: str = "ALLOW"             # ALLOW | DENY | AUDIT | CUSTOM
    provider: ExtensionProvider | None = None
    rules: tuple[Rule, ...] = ()


@_frozen
class PeerAuthenticationMutualTLS:
    mode: str = "UNSET"               # UNSET | DISABLE | PERMISSIVE | STRICT


@_frozen
class PeerAuthentication:
    selector: WorkloadSelector | None = None
    mtls: PeerAuthenticationMutualTLS | None = None
    port_level_mtls: Mapping[int, PeerAuthenticationMutualTLS] = _map()


# --------------------------------------------------------------------------
# Resource


Spec = Union[VirtualService, DestinationRule, ServiceEntry, WorkloadEntry,
             AuthorizationPolicy, PeerAuthentication]

# kind -> (API group, versions served, spec class)
SPEC_KINDS: Mapping[str, tuple[str, tuple[str, ...], type]] = MappingProxyType({
    "VirtualService": (NETWORKING_GROUP, ("v1", "v1beta1", "v1alpha3"), VirtualService),
    "DestinationRule": (NETWORKING_GROUP, ("v1", "v1beta1", "v1alpha3"), DestinationRule),
    "ServiceEntry": (NETWORKING_GROUP, ("v1", "v1beta1", "v1alpha3"), ServiceEntry),
    "WorkloadEntry": (NETWORKING_GROUP, ("v1", "v1beta1", "v1alpha3"), WorkloadEntry),
    "AuthorizationPolicy": (SECURITY_GROUP, ("v1", "v1beta1"), AuthorizationPolicy),
    "PeerAuthentication": (SECURITY_GROUP, ("v1", "v1beta1"), PeerAuthentication),
})


@_frozen
class SourceRef:
    file: str
    line: int


@_frozen
class Resource:
    kind: str
    api_version: str
    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: Spec
    source: SourceRef
    # The object as written (plain dicts/lists), for `nodeagent get -o yaml`.
    # Excluded from equality and repr.
    raw: Mapping = field(default_factory=lambda: EMPTY_MAP, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"
