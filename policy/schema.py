"""Structural schema of the Istio kinds nodeagent enforces (as Istio's CRDs define them).

Each message maps Istio's JSON field names to a type; ``policy.validate``
decodes YAML nodes against it into ``policy.model`` dataclasses. Field names
map to the dataclass field by camelCase -> snake_case unless given explicitly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields as dc_fields
from typing import Callable, Mapping

from policy import model as m

# -- type descriptors -------------------------------------------------------


class T:
    """Base type descriptor."""


@dataclass(frozen=True)
class Scalar(T):
    kind: str        # string | bool | uint32 | int32 | double | duration


@dataclass(frozen=True)
class Enum(T):
    values: tuple[str, ...]


@dataclass(frozen=True)
class ListOf(T):
    item: T


@dataclass(frozen=True)
class MapOf(T):
    value: T
    int_keys: bool = False      # PeerAuthentication.portLevelMtls: map<uint32, ...>


@dataclass(frozen=True)
class Msg(T):
    name: str


@dataclass(frozen=True)
class Special(T):
    name: str    # port_selector | percent | string_match | string_match_or_present


STR = Scalar("string")
BOOL = Scalar("bool")
U32 = Scalar("uint32")
I32 = Scalar("int32")
DOUBLE = Scalar("double")
DUR = Scalar("duration")
STRS = ListOf(STR)
STRMAP = MapOf(STR)
PORT = Special("port_selector")
PERCENT = Special("percent")
SM = Special("string_match")
SMP = Special("string_match_or_present")


@dataclass(frozen=True)
class F:
    type: T
    py: str | None = None          # dataclass field name (default: snake_case of the JSON name)
    deprecated: bool = False


@dataclass
class Message:
    cls: type
    fields: Mapping[str, F]
    required: tuple[str, ...] = ()
    oneofs: tuple[tuple[str, ...], ...] = ()
    build: Callable[[dict], object] | None = None   # kwargs -> object (defaults to cls(**kwargs))


def snake(name: str) -> str:
    if name == "from":
        return "from_"
    return re.sub(r"([A-Z])", r"_\1", name).lower()


def py_name(json_name: str, f: F) -> str:
    return f.py or snake(json_name)


# -- build hooks (legacy folding) -----------------------------------------------


def _build_delay(kw: dict) -> m.Delay:
    if kw.get("percentage") is None and kw.get("percent") is not None:
        kw["percentage"] = float(kw["percent"])
    return m.Delay(**kw)


def _build_http_route(kw: dict) -> m.HTTPRoute:
    if kw.get("mirror_percentage") is None and kw.get("mirror_percent") is not None:
        kw["mirror_percentage"] = float(kw["mirror_percent"])
    return m.HTTPRoute(**kw)


def _build_retry(kw: dict) -> m.HTTPRetry:
    ro = kw.get("retry_on")
    if isinstance(ro, str):
        kw["retry_on"] = tuple(p.strip() for p in ro.split(",") if p.strip())
    return m.HTTPRetry(**kw)


def _build_service_port(kw: dict) -> m.ServicePort:
    # Istio parses protocols case-insensitively; the model carries them upper-case
    if isinstance(kw.get("protocol"), str):
        kw["protocol"] = kw["protocol"].upper()
    return m.ServicePort(**kw)


def _build_selector_labels(kw: dict) -> m.WorkloadSelector:
    return m.WorkloadSelector(match_labels=kw.get("labels", m.EMPTY_MAP))


# -- messages ---------------------------------------------------------------------

LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")

MESSAGES: dict[str, Message] = {
    # ---- shared
    "Destination": Message(m.Destination, {
        "host": F(STR), "subset": F(STR), "port": F(PORT)}, required=("host",)),
    "HeaderOperations": Message(m.HeaderOperations, {
        "set": F(STRMAP), "add": F(STRMAP), "remove": F(STRS)}),
    "Headers": Message(m.Headers, {
        "request": F(Msg("HeaderOperations")), "response": F(Msg("HeaderOperations"))}),
    "WorkloadSelector": Message(m.WorkloadSelector, {"matchLabels": F(STRMAP)}),
    "SEWorkloadSelector": Message(m.WorkloadSelector, {"labels": F(STRMAP)},
                                  build=_build_selector_labels),
    "PolicyTargetReference": Message(m.PolicyTargetReference, {
        "group": F(STR), "kind": F(STR), "name": F(STR), "namespace": F(STR)},
        required=("kind", "name")),

    # ---- VirtualService
    "VirtualService": Message(m.VirtualService, {
        "hosts": F(STRS), "gateways": F(STRS), "http": F(ListOf(Msg("HTTPRoute"))),
        "tls": F(ListOf(Msg("TLSRoute"))), "tcp": F(ListOf(Msg("TCPRoute"))), "exportTo": F(STRS)}),
    "HTTPRoute": Message(m.HTTPRoute, {
        "name": F(STR), "match": F(ListOf(Msg("HTTPMatchRequest"))),
        "route": F(ListOf(Msg("HTTPRouteDestination"))), "redirect": F(Msg("HTTPRedirect")),
        "directResponse": F(Msg("HTTPDirectResponse")), "delegate": F(Msg("Delegate")),
        "rewrite": F(Msg("HTTPRewrite")), "timeout": F(DUR), "retries": F(Msg("HTTPRetry")),
        "fault": F(Msg("HTTPFaultInjection")), "mirror": F(Msg("Destination")),
        "mirrorPercent": F(U32, deprecated=True), "mirrorPercentage": F(PERCENT),
        "mirrors": F(ListOf(Msg("HTTPMirrorPolicy"))), "corsPolicy": F(Msg("CorsPolicy")),
        "headers": F(Msg("Headers"))}, build=_build_http_route),
    "HTTPMatchRequest": Message(m.HTTPMatchRequest, {
        "name": F(STR), "uri": F(SM), "scheme": F(SM), "method": F(SM), "authority": F(SM),
        "headers": F(MapOf(SMP)), "port": F(U32), "sourceLabels": F(STRMAP), "gateways": F(STRS),
        "queryParams": F(MapOf(SMP)), "ignoreUriCase": F(BOOL), "withoutHeaders": F(MapOf(SMP)),
        "sourceNamespace": F(STR), "statPrefix": F(STR)}),
    "HTTPRouteDestination": Message(m.HTTPRouteDestination, {
        "destination": F(Msg("Destination")), "weight": F(I32), "headers": F(Msg("Headers"))},
        required=("destination",)),
    "RouteDestination": Message(m.RouteDestination, {
        "destination": F(Msg("Destination")), "weight": F(I32)}, required=("destination",)),
    "HTTPRedirect": Message(m.HTTPRedirect, {
        "uri": F(STR), "authority": F(STR), "port": F(U32),
        "derivePort": F(Enum(("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))),
        "scheme": F(STR), "redirectCode": F(U32)}, oneofs=(("port", "derivePort"),)),
    "HTTPDirectResponse": Message(m.HTTPDirectResponse, {
        "status": F(U32), "body": F(Msg("HTTPBody"))}, required=("status",)),
    "HTTPBody": Message(m.HTTPBody, {"string": F(STR), "bytes": F(STR)}, oneofs=(("string", "bytes"),)),
    "Delegate": Message(m.Delegate, {"name": F(STR), "namespace": F(STR)}, required=("name",)),
    "HTTPRewrite": Message(m.HTTPRewrite, {
        "uri": F(STR), "authority": F(STR), "uriRegexRewrite": F(Msg("RegexRewrite"))}),
    "RegexRewrite": Message(m.RegexRewrite, {"match": F(STR), "rewrite": F(STR)},
                            required=("match", "rewrite")),
    "HTTPRetry": Message(m.HTTPRetry, {
        "attempts": F(I32), "perTryTimeout": F(DUR), "retryOn": F(STR),
        "retryRemoteLocalities": F(BOOL), "retryIgnorePreviousHosts": F(BOOL), "backoff": F(DUR)},
        build=_build_retry),
    "HTTPFaultInjection": Message(m.HTTPFaultInjection, {
        "delay": F(Msg("Delay")), "abort": F(Msg("Abort"))}),
    "Delay": Message(m.Delay, {
        "fixedDelay": F(DUR), "exponentialDelay": F(DUR), "percentage": F(PERCENT),
        "percent": F(I32, deprecated=True)}, oneofs=(("fixedDelay", "exponentialDelay"),),
        build=_build_delay),
    "Abort": Message(m.Abort, {
        "httpStatus": F(I32), "grpcStatus": F(STR), "http2Error": F(STR), "percentage": F(PERCENT)},
        oneofs=(("httpStatus", "grpcStatus", "http2Error"),)),
    "HTTPMirrorPolicy": Message(m.HTTPMirrorPolicy, {
        "destination": F(Msg("Destination")), "percentage": F(PERCENT)}, required=("destination",)),
    "CorsPolicy": Message(m.CorsPolicy, {
        "allowOrigins": F(ListOf(SM)), "allowOrigin": F(STRS, deprecated=True), "allowMethods": F(STRS),
        "allowHeaders": F(STRS), "exposeHeaders": F(STRS), "maxAge": F(DUR),
        "allowCredentials": F(BOOL),
        "unmatchedPreflights": F(Enum(("UNSPECIFIED", "FORWARD", "IGNORE")))}),
    "TCPRoute": Message(m.TCPRoute, {
        "match": F(ListOf(Msg("L4MatchAttributes"))), "route": F(ListOf(Msg("RouteDestination")))}),
    "TLSRoute": Message(m.TLSRoute, {
        "match": F(ListOf(Msg("TLSMatchAttributes"))), "route": F(ListOf(Msg("RouteDestination")))}),
    "L4MatchAttributes": Message(m.L4MatchAttributes, {
        "destinationSubnets": F(STRS), "port": F(U32), "sourceLabels": F(STRMAP), "gateways": F(STRS),
        "sourceNamespace": F(STR)}),
    "TLSMatchAttributes": Message(m.TLSMatchAttributes, {
        "sniHosts": F(STRS), "destinationSubnets": F(STRS), "port": F(U32), "sourceLabels": F(STRMAP),
        "gateways": F(STRS), "sourceNamespace": F(STR)}),

    # ---- DestinationRule
    "DestinationRule": Message(m.DestinationRule, {
        "host": F(STR), "trafficPolicy": F(Msg("TrafficPolicy")), "subsets": F(ListOf(Msg("Subset"))),
        "exportTo": F(STRS), "workloadSelector": F(Msg("WorkloadSelector"))}, required=("host",)),
    "TrafficPolicy": Message(m.TrafficPolicy, {
        "loadBalancer": F(Msg("LoadBalancerSettings")), "connectionPool": F(Msg("ConnectionPoolSettings")),
        "outlierDetection": F(Msg("OutlierDetection")), "tls": F(Msg("ClientTLSSettings")),
        "portLevelSettings": F(ListOf(Msg("PortTrafficPolicy"))), "tunnel": F(Msg("TunnelSettings")),
        "proxyProtocol": F(Msg("ProxyProtocol"))}),
    "PortTrafficPolicy": Message(m.PortTrafficPolicy, {
        "port": F(PORT), "loadBalancer": F(Msg("LoadBalancerSettings")),
        "connectionPool": F(Msg("ConnectionPoolSettings")), "outlierDetection": F(Msg("OutlierDetection")),
        "tls": F(Msg("ClientTLSSettings"))}),
    "TunnelSettings": Message(m.TunnelSettings, {
        "protocol": F(STR), "targetHost": F(STR), "targetPort": F(U32)}, required=("targetHost", "targetPort")),
    "ProxyProtocol": Message(m.ProxyProtocol, {"version": F(Enum(("V1", "V2")))}),
    "Subset": Message(m.Subset, {
        "name": F(STR), "labels": F(STRMAP), "trafficPolicy": F(Msg("TrafficPolicy"))}, required=("name",)),
    "LoadBalancerSettings": Message(m.LoadBalancerSettings, {
        "simple": F(Enum(LB_SIMPLE)), "consistentHash": F(Msg("ConsistentHashLB")),
        "localityLbSetting": F(Msg("LocalityLoadBalancerSetting")), "warmupDurationSecs": F(DUR)},
        oneofs=(("simple", "consistentHash"),)),
    "ConsistentHashLB": Message(m.ConsistentHashLB, {
        "httpHeaderName": F(STR), "httpCookie": F(Msg("HTTPCookie")), "useSourceIp": F(BOOL),
        "httpQueryParameterName": F(STR), "ringHash": F(Msg("RingHash")), "maglev": F(Msg("MagLev")),
        "minimumRingSize": F(U32, deprecated=True)},
        oneofs=(("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
                ("ringHash", "maglev"))),
    "HTTPCookie": Message(m.HTTPCookie, {"name": F(STR), "path": F(STR), "ttl": F(DUR)}, required=("name",)),
    "RingHash": Message(m.RingHash, {"minimumRingSize": F(U32)}),
    "MagLev": Message(m.MagLev, {"tableSize": F(U32)}),
    "LocalityLoadBalancerSetting": Message(m.LocalityLoadBalancerSetting, {
        "distribute": F(ListOf(Msg("LocalityDistribute"))), "failover": F(ListOf(Msg("LocalityFailover"))),
        "failoverPriority": F(STRS), "enabled": F(BOOL)}),
    "LocalityDistribute": Message(m.LocalityDistribute, {"from": F(STR), "to": F(MapOf(U32))}),
    "LocalityFailover": Message(m.LocalityFailover, {"from": F(STR), "to": F(STR)}),
    "ConnectionPoolSettings": Message(m.ConnectionPoolSettings, {
        "tcp": F(Msg("TCPSettings")), "http": F(Msg("HTTPSettings"))}),
    "TCPSettings": Message(m.TCPSettings, {
        "maxConnections": F(I32), "connectTimeout": F(DUR), "tcpKeepalive": F(Msg("TCPKeepalive")),
        "maxConnectionDuration": F(DUR), "idleTimeout": F(DUR)}),
    "TCPKeepalive": Message(m.TCPKeepalive, {"probes": F(U32), "time": F(DUR), "interval": F(DUR)}),
    "HTTPSettings": Message(m.HTTPSettings, {
        "http1MaxPendingRequests": F(I32), "http2MaxRequests": F(I32), "maxRequestsPerConnection": F(I32),
        "maxRetries": F(I32), "idleTimeout": F(DUR),
        "h2UpgradePolicy": F(Enum(("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"))),
        "useClientProtocol": F(BOOL), "maxConcurrentStreams": F(I32)}),
    "OutlierDetection": Message(m.OutlierDetection, {
        "splitExternalLocalOriginErrors": F(BOOL), "consecutiveLocalOriginFailures": F(U32),
        "consecutiveGatewayErrors": F(U32), "consecutive5xxErrors": F(U32, py="consecutive_5xx_errors"),
        "consecutiveErrors": F(I32, deprecated=True), "interval": F(DUR), "baseEjectionTime": F(DUR),
        "maxEjectionPercent": F(I32), "minHealthPercent": F(I32)}),
    "ClientTLSSettings": Message(m.ClientTLSSettings, {
        "mode": F(Enum(TLS_MODES)), "clientCertificate": F(STR), "privateKey": F(STR),
        "caCertificates": F(STR), "credentialName": F(STR), "subjectAltNames": F(STRS), "sni": F(STR),
        "insecureSkipVerify": F(BOOL), "caCrl": F(STR)}),

    # ---- ServiceEntry / WorkloadEntry
    "ServiceEntry": Message(m.ServiceEntry, {
        "hosts": F(STRS), "addresses": F(STRS), "ports": F(ListOf(Msg("ServicePort"))),
        "location": F(Enum(("MESH_EXTERNAL", "MESH_INTERNAL"))),
        "resolution": F(Enum(("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"))),
        "endpoints": F(ListOf(Msg("WorkloadEntry"))), "workloadSelector": F(Msg("SEWorkloadSelector")),
        "exportTo": F(STRS), "subjectAltNames": F(STRS)}),
    "ServicePort": Message(m.ServicePort, {
        "number": F(U32), "protocol": F(STR), "name": F(STR), "targetPort": F(U32)}, required=("number",),
        build=_build_service_port),
    "WorkloadEntry": Message(m.WorkloadEntry, {
        "address": F(STR), "ports": F(MapOf(U32)), "labels": F(STRMAP), "network": F(STR),
        "locality": F(STR), "weight": F(U32), "serviceAccount": F(STR)}),

    # ---- security
    "AuthorizationPolicy": Message(m.AuthorizationPolicy, {
        "selector": F(Msg("WorkloadSelector")), "targetRef": F(Msg("PolicyTargetReference")),
        "targetRefs": F(ListOf(Msg("PolicyTargetReference"))),
        "action": F(Enum(("ALLOW", "DENY", "AUDIT", "CUSTOM"))), "provider": F(Msg("ExtensionProvider")),
        "rules": F(ListOf(Msg("Rule")))}),
    "ExtensionProvider": Message(m.ExtensionProvider, {"name": F(STR)}, required=("name",)),
    "Rule": Message(m.Rule, {
        "from": F(ListOf(Msg("RuleFrom"))), "to": F(ListOf(Msg("RuleTo"))), "when": F(ListOf(Msg("Condition")))}),
    "RuleFrom": Message(m.RuleFrom, {"source": F(Msg("Source"))}),
    "RuleTo": Message(m.RuleTo, {"operation": F(Msg("Operation"))}),
    "Source": Message(m.Source, {k: F(STRS) for k in (
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
        "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
        "serviceAccounts", "notServiceAccounts")}),
    "Operation": Message(m.Operation, {k: F(STRS) for k in (
        "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")}),
    "Condition": Message(m.Condition, {"key": F(STR), "values": F(STRS), "notValues": F(STRS)},
                         required=("key",)),
    "PeerAuthentication": Message(m.PeerAuthentication, {
        "selector": F(Msg("WorkloadSelector")), "mtls": F(Msg("PeerAuthenticationMutualTLS")),
        "portLevelMtls": F(MapOf(Msg("PeerAuthenticationMutualTLS"), int_keys=True))}),
    "PeerAuthenticationMutualTLS": Message(m.PeerAuthenticationMutualTLS, {
        "mode": F(Enum(("UNSET", "DISABLE", "PERMISSIVE", "STRICT")))}),
}

# kinds nodeagent enforces: kind -> top-level message
SPEC_MESSAGE = {kind: kind for kind in m.SPEC_KINDS}

# Istio kinds that exist but that nodeagent does not enforce: group -> {kind: versions}
UNENFORCED: dict[str, dict[str, tuple[str, ...]]] = {
    "networking.istio.io": {
        "Gateway": ("v1", "v1beta1", "v1alpha3"),
        "Sidecar": ("v1", "v1beta1", "v1alpha3"),
        "EnvoyFilter": ("v1alpha3",),
        "WorkloadGroup": ("v1", "v1beta1", "v1alpha3"),
        "ProxyConfig": ("v1beta1",),
    },
    "security.istio.io": {
        "RequestAuthentication": ("v1", "v1beta1"),
    },
    "telemetry.istio.io": {
        "Telemetry": ("v1", "v1alpha1"),
    },
    "extensions.istio.io": {
        "WasmPlugin": ("v1alpha1",),
    },
}

ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io", "extensions.istio.io")


def kinds_in_group(group: str) -> dict[str, tuple[str, ...]]:
    out = {k: v[1] for k, v in m.SPEC_KINDS.items() if v[0] == group}
    out.update(UNENFORCED.get(group, {}))
    return out


# -- fields that load but that nodeagent does not enforce ------------------------------
#
# (message, JSON field) -> when the decoded value is not enforced (None: whenever it is set).
# The loader warns once per file, naming file:line, object and field path. Keep this in step
# with what nodeagent/proxy and policy/{routing,l4routing,cluster,lb,retry,outlier}.py apply
# (docs/traffic.md "Not implemented" lists the same fields). A field the proxy applies must
# not be here: the warning would tell users something false.

NOT_ENFORCED = "loaded but not enforced by nodeagent"

UNENFORCED_FIELDS: dict[tuple[str, str], Callable[[object], bool] | None] = {
    # VirtualService
    ("HTTPRoute", "delegate"): None,                     # a matched delegate rule answers 404 NR
    ("HTTPMatchRequest", "statPrefix"): None,
    ("HTTPRetry", "retryRemoteLocalities"): lambda v: v is True,
    ("HTTPRetry", "retryIgnorePreviousHosts"): lambda v: v is False,   # retries always avoid tried hosts
    ("Abort", "http2Error"): None,
    # DestinationRule
    ("LoadBalancerSettings", "localityLbSetting"): lambda v: getattr(v, "enabled", None) is not False,
    ("LoadBalancerSettings", "warmupDurationSecs"): None,
    ("TCPSettings", "tcpKeepalive"): None,
    ("TCPSettings", "maxConnectionDuration"): None,
    ("HTTPSettings", "h2UpgradePolicy"): lambda v: v == "UPGRADE",
    ("HTTPSettings", "useClientProtocol"): lambda v: v is True,
    ("HTTPSettings", "maxConcurrentStreams"): None,
    ("TrafficPolicy", "tunnel"): None,
    ("TrafficPolicy", "proxyProtocol"): None,
    # ClientTLSSettings: SIMPLE/MUTUAL are originated (nodeagent/proxy/origination.py);
    # policy/validate.py warns about credentialName, caCrl with insecureSkipVerify, and sni/subjectAltNames under
    # ISTIO_MUTUAL (the mesh tunnel checks the identity the workload directory gives).
    # ServiceEntry
    ("ServiceEntry", "subjectAltNames"): lambda v: bool(v),
}


def check_schema_consistency() -> list[str]:
    """Every schema field maps onto a dataclass field (used by the unit tests)."""
    problems = []
    for name, msg in MESSAGES.items():
        names = {f.name for f in dc_fields(msg.cls)}
        for jn, f in msg.fields.items():
            pn = "match_labels" if (name == "SEWorkloadSelector" and jn == "labels") else py_name(jn, f)
            if pn not in names:
                problems.append(f"{name}.{jn} -> {msg.cls.__name__}.{pn} missing")
        for t in msg.fields.values():
            ty = t.type
            while isinstance(ty, (ListOf, MapOf)):
                ty = ty.item if isinstance(ty, ListOf) else ty.value
            if isinstance(ty, Msg) and ty.name not in MESSAGES:
                problems.append(f"{name}: unknown message {ty.name}")
    for name, jn in UNENFORCED_FIELDS:
        if name not in MESSAGES or jn not in MESSAGES[name].fields:
            problems.append(f"UNENFORCED_FIELDS: {name}.{jn} is not a schema field")
    return problems
