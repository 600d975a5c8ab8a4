"""VirtualService ``tls`` and ``tcp`` routes: which cluster an opaque connection goes to.

Pure decision functions for the TCP relay (``nodeagent/proxy/tcp.py``); no I/O,
randomness is passed in. Istio's semantics for a sidecar's outbound TCP/TLS
listener (``buildSidecarOutboundTCPTLSFilterChainOpts``):

- The VirtualService bound to the mesh for the destination service, as seen
  from the source namespace (``snapshot.virtual_service_for``).
- ``tls`` routes apply only to TLS ports (protocol ``TLS``/``HTTPS``, or a port
  named ``tls``/``tls-*``/``https``/``https-*``) and are tried first, in order;
  then the ``tcp`` routes, in order; the first route with a matching ``match``
  entry wins. A route without ``match`` matches every connection (Istio's
  validation requires ``sniHosts`` in every TLS match, so that only happens
  for ``tcp`` routes).
- A match entry applies when every field it sets matches (lists inside a field
  are alternatives): ``port`` equals the service port; ``destinationSubnets``
  contain the connection's original destination IP; ``sourceLabels`` are all
  among the source workload's labels; ``sourceNamespace`` is the source's
  namespace; ``gateways`` lists ``mesh`` (or is empty); ``sniHosts`` (TLS)
  contains the client's SNI, exactly or by a wildcard: ``*.example.com``
  matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``,
  ``*`` matches any server name. A connection whose source is unknown fails
  ``sourceLabels`` and ``sourceNamespace``; one without SNI (not TLS, or no
  ``server_name``) fails every ``sniHosts``.
- The winning route's destinations are split by weight: one destination gets
  100; with several, a missing weight is 0 and weight-0 destinations are never
  picked. A destination's port is ``destination.port``, else the destination
  service's only port, else the connection's service port; a short host is
  qualified with the VirtualService's namespace.
- No route matches (or no VirtualService): the service itself on the
  connection's port (Istio's fallback filter chain).
- A destination that names an unknown service, port or subset comes back with
  ``known=False``: Envoy has no such cluster and closes the connection (``NC``).

Compiled tables are cached per (snapshot, service host, source namespace,
service port); per connection only the match walk and one weighted roll run.
"""
from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from policy.cluster import ClusterKey, memo_put, snapshot_memo
from policy.snapshot import qualify_host

if TYPE_CHECKING:
    import random

    from policy.snapshot import ConfigSnapshot, Service, WorkloadRef

__all__ = [
    "L4Decision", "L4Table", "is_tls_port", "l4_table", "plan_l4", "sni_matches", "pick_weighted",
    "sni_only_ports", "plan_by_sni",
]


@dataclass(frozen=True, slots=True)
class L4Decision:
    """Where one connection goes, and why."""
    cluster: ClusterKey
    known: bool                      # False: no such service/port/subset -> close, flag "NC"
    kind: str                        # "tls" | "tcp" | "default"
    route_index: int | None = None   # index in the VirtualService's ``tls`` / ``tcp`` list
    virtual_service: str | None = None   # "namespace/name"
    weight: int = 100                # the picked destination's weight

    def describe(self) -> str:
        """One line for logs and ``nodeagent explain``."""
        name = "outbound|%d|%s|%s" % (self.cluster.port, self.cluster.subset or "", self.cluster.host)
        if self.kind == "default":
            why = "no tcp/tls route applies: the service itself"
        else:
            why = "VirtualService %s %s[%d], weight %d" % (
                self.virtual_service, self.kind, self.route_index, self.weight)
        return "%s (%s)%s" % (name, why, "" if self.known else " - NO SUCH CLUSTER: connection closed (NC)")


def is_tls_port(port) -> bool:
    """True for a ServicePort Istio treats as TLS (``tls`` routes apply): protocol TLS or
    HTTPS, or, without a protocol, a name ``tls``/``https`` or ``tls-*``/``https-*``."""
    proto = (port.protocol or "").upper()
    if proto:
        return proto in ("TLS", "HTTPS")
    prefix = (port.name or "").lower().split("-", 1)[0]
    return prefix in ("tls", "https")


def sni_matches(pattern: str, sni: str) -> bool:
    """Envoy's server_names matching for one ``sniHosts`` entry (both compared lower-case):
    exact, ``*.suffix`` for any name ending in ``.suffix`` (one or more labels before it),
    ``*`` for any name."""
    pattern = pattern.lower()
    sni = sni.lower()
    if pattern == "*":
        return bool(sni)
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return len(sni) > len(suffix) and sni.endswith(suffix)
    return sni == pattern


def pick_weighted(cum: tuple[int, ...], u: float) -> int:
    """Index of the destination a uniform ``u`` in [0, 1) picks over cumulative weights
    ``cum`` (strictly increasing, every weight > 0): destination i owns
    ``[cum[i-1], cum[i]) / cum[-1]`` of the unit interval."""
    i = bisect.bisect_right(cum, u * cum[-1])
    return i if i < len(cum) else len(cum) - 1  # u*total can round up to total


class _Match:
    __slots__ = ("nets", "labels", "namespace", "snis")

    def test(self, source, destination_ip, sni) -> bool:
        snis = self.snis
        if snis is not None:
            if not sni or not any(sni_matches(p, sni) for p in snis):
                return False
        return self.test_l4(source, destination_ip)

    def test_l4(self, source, destination_ip) -> bool:
        nets = self.nets
        if nets:
            ip = _ip(destination_ip)
            if ip is None or not any(ip.version == n.version and ip in n for n in nets):
                return False
        if self.labels or self.namespace is not None:
            if source is None:
                return False
            if self.namespace is not None and source.namespace != self.namespace:
                return False
            have = source.labels
            if not all(have.get(k) == v for k, v in self.labels):
                return False
        return True


class _Route:
    __slots__ = ("kind", "index", "matches", "decisions", "cum")

    def pick(self, rand) -> L4Decision:
        decisions = self.decisions
        if len(decisions) == 1:
            return decisions[0]
        return decisions[pick_weighted(self.cum, rand.random())]


class L4Table:
    """The compiled ``tls`` + ``tcp`` routes of one service port as seen from one namespace."""

    __slots__ = ("tls", "tcp", "default", "service_port")

    def needs_sni(self, source, destination_ip) -> bool:
        """True when some ``tls`` route could apply to this connection once its SNI is known,
        i.e. the relay must read the ClientHello before it picks the cluster."""
        return any(m.test_l4(source, destination_ip) for route in self.tls for m in route.matches)

    def decide(self, source, destination_ip: str | None, sni: str | None, rand) -> L4Decision:
        """The first applying ``tls`` route (when ``sni`` is given), else ``tcp`` route, else
        the default; split by weight with ``rand.random()``."""
        route = self.route_for(source, destination_ip, sni)
        return self.default if route is None else route.pick(rand)

    def candidates(self, source, destination_ip: str | None, sni: str | None) -> tuple[L4Decision, ...]:
        """Every destination ``decide`` may answer for this connection, with its weight
        (for ``nodeagent explain``)."""
        route = self.route_for(source, destination_ip, sni)
        return (self.default,) if route is None else route.decisions

    def route_for(self, source, destination_ip, sni) -> _Route | None:
        if sni:
            for route in self.tls:
                for m in route.matches:
                    if m.test(source, destination_ip, sni):
                        return route
        for route in self.tcp:
            if not route.matches:
                return route
            for m in route.matches:
                if m.test_l4(source, destination_ip):
                    return route
        return None


def plan_l4(snapshot: ConfigSnapshot, service: Service, service_port: int, source: WorkloadRef | None,
            destination_ip: str | None, sni: str | None, rand: random.Random) -> L4Decision:
    """The destination of one opaque connection to ``service:service_port``.

    ``source``: the calling workload (None when unknown); ``destination_ip``: the
    connection's original destination address (for ``destinationSubnets``; None when
    unknown); ``sni``: the ClientHello's server name (None when not TLS or absent)."""
    ns = source.namespace if source is not None else "default"
    return l4_table(snapshot, service, service_port, ns).decide(source, destination_ip, sni, rand)


def l4_table(snapshot: ConfigSnapshot, service: Service, service_port: int, source_namespace: str) -> L4Table:
    """Compile (once per snapshot, host, source namespace and port) the routes of
    ``service:service_port``."""
    memo = snapshot_memo(snapshot)
    key = ("l4-routes", service.host, source_namespace, service_port)
    try:
        return memo[key]
    except KeyError:
        pass
    table = L4Table()
    table.service_port = service_port
    table.default = L4Decision(ClusterKey(service.host, None, service_port),
                               service.port(service_port) is not None, "default")
    tls_routes: list[_Route] = []
    tcp_routes: list[_Route] = []
    vs_res = snapshot.virtual_service_for(service.host, source_namespace)
    if vs_res is not None:
        vs = vs_res.spec
        sport = service.port(service_port)
        if sport is not None and is_tls_port(sport):
            for i, tr in enumerate(vs.tls):
                route = _compile_route(snapshot, "tls", i, tr, vs_res, source_namespace, service_port)
                if route is not None and route.matches:
                    tls_routes.append(route)
        for i, tr in enumerate(vs.tcp):
            route = _compile_route(snapshot, "tcp", i, tr, vs_res, source_namespace, service_port)
            if route is None:
                continue
            tcp_routes.append(route)
            if not route.matches:
                break  # a catch-all: later routes and the fallback are unreachable
    table.tls = tuple(tls_routes)
    table.tcp = tuple(tcp_routes)
    return memo_put(memo, key, table)


def _compile_route(snapshot, kind: str, index: int, tr, vs_res, source_ns: str, port: int) -> _Route | None:
    """A compiled route, or None when it can never apply (every match entry is for
    gateways or another port, or no destination has a weight)."""
    if tr.match:
        matches = tuple(m for m in (_compile_match(mt, port, kind == "tls") for mt in tr.match)
                        if m is not None)
        if not matches:
            return None
    else:
        matches = ()
    vs_name = "%s/%s" % (vs_res.namespace, vs_res.name)
    weighted = len(tr.route) > 1
    decisions = []
    cum = []
    total = 0
    for rd in tr.route:
        weight = (rd.weight or 0) if weighted else 100
        if weight <= 0:
            continue
        cluster, known = resolve_destination(snapshot, rd.destination, vs_res.namespace, source_ns, port)
        decisions.append(L4Decision(cluster, known, kind, index, vs_name, weight))
        total += weight
        cum.append(total)
    if not decisions:
        return None
    route = _Route()
    route.kind = kind
    route.index = index
    route.matches = matches
    route.decisions = tuple(decisions)
    route.cum = tuple(cum)
    return route


def _compile_match(m, port: int, tls: bool) -> _Match | None:
    if m.gateways and "mesh" not in m.gateways:
        return None
    if m.port is not None and m.port != port:
        return None
    nets = []
    for cidr in m.destination_subnets:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue  # validation refuses these; an unparsable entry matches nothing
    if m.destination_subnets and not nets:
        return None
    out = _Match()
    out.nets = tuple(nets)
    out.labels = tuple(m.source_labels.items())
    out.namespace = m.source_namespace
    out.snis = tuple(h.lower() for h in m.sni_hosts) if tls else None
    if tls and not out.snis:
        return None  # Istio refuses a TLS match without sniHosts; it could never select by SNI
    return out


def sni_only_ports(snapshot: ConfigSnapshot) -> frozenset[int]:
    """Port numbers on which some service is reachable only by its SNI: a TLS port of a
    service without ``addresses`` (e.g. an egress ServiceEntry with ``resolution: DNS``).
    A connection to an address that is no service, on such a port, is routed by
    ``plan_by_sni`` once its ClientHello is read (Istio's wildcard 0.0.0.0:PORT listener
    with one filter chain per SNI). A ``resolution: NONE`` service without endpoints
    counts only when some VirtualService has ``tls`` routes: otherwise its SNI chain
    would lead to the original destination anyway (``_original_dst``)."""
    memo = snapshot_memo(snapshot)
    try:
        return memo["l4-sni-ports"]
    except KeyError:
        pass
    any_tls_routes = any(r.kind == "VirtualService" and r.spec.tls for r in snapshot.resources)
    ports = frozenset(p.number for svc in snapshot.services.values()
                      if not svc.addresses and (any_tls_routes or not _original_dst(svc))
                      for p in svc.ports if is_tls_port(p))
    return memo_put(memo, "l4-sni-ports", ports)


def _original_dst(svc) -> bool:
    """True for a service Envoy serves with an ORIGINAL_DST cluster (``resolution: NONE``
    and no endpoints): its connections go to the address the client dialled."""
    return svc.resolution == "NONE" and not svc.endpoints


def plan_by_sni(snapshot: ConfigSnapshot, port: int, source: WorkloadRef | None, destination_ip: str | None,
                sni: str | None, rand: random.Random) -> L4Decision | None:
    """The destination of a TLS connection to an address that is no service, by its SNI:
    the service the SNI names (exact host, then wildcard host) when it has a TLS ``port``
    and no ``addresses``. With a VirtualService that has ``tls`` routes for that port, the
    first matching ``tls`` route; none matching -> None. Without such routes, the service
    itself (Istio uses the service's host as the filter chain's SNI). None also when no
    service fits, or when the destination is a ``resolution: NONE`` service without
    endpoints (an ORIGINAL_DST cluster): the caller passes the connection through to its
    original destination."""
    if not sni:
        return None
    ns = source.namespace if source is not None else "default"
    svc = snapshot.resolve_host(sni.lower(), ns)
    if svc is None or svc.addresses:
        return None
    sport = svc.port(port)
    if sport is None or not is_tls_port(sport):
        return None
    table = l4_table(snapshot, svc, port, ns)
    decision = None
    if not table.tls:
        decision = table.default
    else:
        for route in table.tls:
            if any(m.test(source, destination_ip, sni) for m in route.matches):
                decision = route.pick(rand)
                break
    if decision is None:
        return None
    target = snapshot.services.get(decision.cluster.host)
    if target is not None and _original_dst(target):
        return None
    return decision


def resolve_destination(snapshot, dest, vs_namespace: str, source_ns: str, port: int) -> tuple[ClusterKey, bool]:
    """The cluster of a route destination and whether it exists (Istio's
    ``GetDestinationCluster``: ``destination.port``, else the service's only port,
    else the connection's port)."""
    host = qualify_host(dest.host, vs_namespace, snapshot.domain_suffix)
    svc = snapshot.services.get(host)
    if svc is None:
        svc = snapshot.resolve_host(dest.host, vs_namespace)
        if svc is not None:
            host = svc.host
    if dest.port is not None:
        dport = dest.port
    elif svc is not None and len(svc.ports) == 1:
        dport = svc.ports[0].number
    else:
        dport = port
    known = svc is not None and svc.port(dport) is not None
    if known and dest.subset is not None:
        known = snapshot.subset_labels(host, dest.subset, source_ns) is not None
    return ClusterKey(host, dest.subset, dport), known


def _ip(text):
    if text is None:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
