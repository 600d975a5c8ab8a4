"""The compiled, immutable per-node configuration snapshot.

``build_snapshot(resources)`` indexes validated ``Resource`` objects once per
config change; the proxy, authz and capture code only read the result. Pure:
no I/O, no clock. Lookups the proxy makes per request (``resolve_host``,
``virtual_service_for``, ``destination_rule_for``,
``authorization_policies_for``) are dict look-ups, memoized per snapshot.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from policy.model import (
    EMPTY_MAP, AuthorizationPolicy, DestinationRule, Resource,
    ServiceEntry, ServicePort, VirtualService, WorkloadEntry,
)

__all__ = [
    "ConfigSnapshot", "Service", "Endpoint", "WorkloadRef", "build_snapshot",
    "qualify_host", "host_matches", "split_authority",
]

_CACHE_LIMIT = 8192   # per-snapshot memo size bound (cleared when exceeded)


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """A workload known from a WorkloadEntry."""
    name: str
    namespace: str
    service_account: str
    labels: Mapping[str, str]
    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    network: str | None = None
    locality: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    weight: int | None = None
    workload: WorkloadRef | None = None
    locality: str | None = None
    network: str | None = None
    service_account: str | None = None


@dataclass(frozen=True, slots=True)
class Service:
    host: str
    namespace: str
    ports: tuple[ServicePort, ...]
    addresses: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]
    resolution: str
    location: str
    mesh_internal: bool
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    source: Resource | None = field(default=None, compare=False, repr=False)

    def endpoint_port(self, endpoint: Endpoint, service_port: ServicePort) -> int:
        """WorkloadEntry/endpoint ``ports`` by port name, then targetPort, then the port number."""
        if service_port.name and service_port.name in endpoint.ports:
            return endpoint.ports[service_port.name]
        if service_port.target_port:
            return service_port.target_port
        return service_port.number

    def port(self, number: int | None) -> ServicePort | None:
        """The ServicePort with this number (the only port when ``number`` is None and there is one)."""
        if number is None:
            return self.ports[0] if len(self.ports) == 1 else None
        for p in self.ports:
            if p.number == number:
                return p
        return None

    def port_by_name(self, name: str) -> ServicePort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None

    def endpoints_matching(self, labels: Mapping[str, str]) -> tuple[Endpoint, ...]:
        """Endpoints whose labels include all of ``labels`` (a DestinationRule subset)."""
        if not labels:
            return self.endpoints
        return tuple(e for e in self.endpoints
                     if all(e.labels.get(k) == v for k, v in labels.items()))


# --------------------------------------------------------------------------
# host helpers (pure)


def split_authority(authority: str) -> tuple[str, int | None]:
    """``"Name.NS:8080"`` -> ``("name.ns", 8080)``; handles ``[v6]:port`` and a trailing dot."""
    a = authority.strip()
    port: int | None = None
    if a.startswith("["):
        end = a.find("]")
        host = a[1:end] if end > 0 else a[1:]
        rest = a[end + 1:] if end > 0 else ""
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        return host.lower(), port
    if a.count(":") == 1:
        h, _, p = a.partition(":")
        if p.isdigit():
            port = int(p)
        a = h
    return a.lower().rstrip("."), port


def qualify_host(host: str, namespace: str, domain_suffix: str = "svc.cluster.local") -> str:
    """Istio's short-name rule for VirtualService/DestinationRule hosts: a name without
    dots is ``name.<namespace>.<domain_suffix>``; anything else is taken literally."""
    h = host.lower().rstrip(".")
    if h == "*" or "." in h:
        return h
    return f"{h}.{namespace}.{domain_suffix}"


def host_matches(pattern: str, host: str) -> bool:
    """``pattern`` equals ``host`` or is a wildcard (``*``, ``*.example.com``) covering it."""
    if pattern == host:
        return True
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return False


def _visible(export_to: tuple[str, ...], owner_ns: str, client_ns: str) -> bool:
    if not export_to:
        return True
    for e in export_to:
        if e == "*" or e == client_ns or (e == "." and owner_ns == client_ns):
            return True
    return False


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _host_namespace(host: str, domain_suffix: str) -> str | None:
    suffix = "." + domain_suffix
    if host.endswith(suffix):
        parts = host[: -len(suffix)].split(".")
        if len(parts) == 2:
            return parts[1]
    return None


# --------------------------------------------------------------------------


class ConfigSnapshot:
    """Immutable view of one configuration generation. Build with ``build_snapshot``."""

    __slots__ = (
        "version", "resources", "services", "workloads", "peer_authentications",
        "virtual_services", "destination_rules", "authorization_policies",
        "service_entries", "workload_entries", "domain_suffix", "root_namespace",
        "warnings", "_cluster_domain", "_wildcard_services", "_addr_index", "_cidr_index",
        "_endpoint_index", "_workload_by_addr", "_vs_exact", "_vs_wild", "_dr_exact",
        "_dr_wild", "_authz_by_ns", "_authz_targeted", "_memo_host", "_memo_vs",
        "_memo_dr", "_memo_authz", "_frozen",
    )

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError("ConfigSnapshot is immutable")
        object.__setattr__(self, name, value)

    # -- lookups ---------------------------------------------------------

    def resolve_host(self, authority: str, source_namespace: str) -> Service | None:
        """The Service a Host header / authority names, or None. Forms: ``name``,
        ``name.ns``, ``name.ns.svc``, the FQDN, a ServiceEntry address (VIP), each
        optionally with ``:port``; short names are relative to ``source_namespace``."""
        key = (authority, source_namespace)
        memo = self._memo_host
        try:
            return memo[key]
        except KeyError:
            pass
        result = self._resolve_host(authority, source_namespace)
        if len(memo) >= _CACHE_LIMIT:
            memo.clear()
        memo[key] = result
        return result

    def _resolve_host(self, authority: str, source_namespace: str) -> Service | None:
        host, _port = split_authority(authority)
        if not host:
            return None
        for cand in self.host_candidates(host, source_namespace):
            svc = self.services.get(cand)
            if svc is not None:
                return svc
        # an IP literal: a ServiceEntry address (VIP)
        svc = self._addr_index.get(host)
        if svc is not None:
            return svc
        # wildcard ServiceEntry hosts: the most specific (longest) pattern wins
        for pattern, svc in self._wildcard_services:
            if host_matches(pattern, host):
                return svc
        return None

    def host_candidates(self, host: str, source_namespace: str) -> tuple[str, ...]:
        """FQDN candidates for a (lower-case, port-less) host name, most specific first."""
        dots = host.count(".")
        ds = self.domain_suffix
        if dots == 0:
            return (f"{host}.{source_namespace}.{ds}", host)
        if dots == 1:
            return (f"{host}.{ds}", host)
        if dots == 2 and host.endswith(".svc"):
            return (f"{host}.{self._cluster_domain}", host) if self._cluster_domain else (host,)
        return (host,)

    def service_by_address(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        """ServiceEntry ``addresses`` (IP or CIDR) first, then endpoint addresses."""
        svc = self._addr_index.get(ip)
        if svc is not None:
            sp = svc.port(port)
            if sp is not None:
                return svc, sp
        if self._cidr_index:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                addr = None
            if addr is not None:
                for net, svc in self._cidr_index:
                    if addr.version == net.version and addr in net:
                        sp = svc.port(port)
                        if sp is not None:
                            return svc, sp
        for svc, ep in self._endpoint_index.get(ip, ()):
            for sp in svc.ports:
                if svc.endpoint_port(ep, sp) == port:
                    return svc, sp
        return None

    def workload_by_address(self, ip: str) -> WorkloadRef | None:
        return self._workload_by_addr.get(ip)

    def virtual_service_for(self, host_fqdn: str, source_namespace: str) -> Resource | None:
        """The VirtualService (bound to the mesh) for a host as seen from ``source_namespace``.
        An exact host wins over a wildcard (longest wildcard first); among equals the oldest."""
        key = (host_fqdn, source_namespace)
        memo = self._memo_vs
        if key in memo:
            return memo[key]
        result = self._lookup(self._vs_exact, self._vs_wild, host_fqdn, source_namespace)
        if len(memo) >= _CACHE_LIMIT:
            memo.clear()
        memo[key] = result
        return result

    def destination_rule_for(self, host_fqdn: str, source_namespace: str) -> Resource | None:
        """The DestinationRule for a host: rules in the client's namespace first, then the
        service's namespace, then the root namespace, then any other visible one; within a
        tier an exact host wins over a wildcard and the oldest wins among equals."""
        key = (host_fqdn, source_namespace)
        memo = self._memo_dr
        if key in memo:
            return memo[key]
        host = host_fqdn.lower().rstrip(".")
        svc = self.services.get(host)
        svc_ns = svc.namespace if svc is not None else _host_namespace(host, self.domain_suffix)
        best = None
        best_rank = None
        cands = [(0, r) for r in self._dr_exact.get(host, ())]
        cands += [(1 + (len(host) - len(p)), r) for p, rs in self._dr_wild
                  if host_matches(p, host) for r in rs]
        for specificity, (order, res) in cands:
            spec: DestinationRule = res.spec
            if not _visible(spec.export_to, res.namespace, source_namespace):
                continue
            if res.namespace == source_namespace:
                tier = 0
            elif svc_ns is not None and res.namespace == svc_ns:
                tier = 1
            elif res.namespace == self.root_namespace:
                tier = 2
            else:
                tier = 3
            rank = (tier, specificity, order)
            if best_rank is None or rank < best_rank:
                best, best_rank = res, rank
        if len(memo) >= _CACHE_LIMIT:
            memo.clear()
        memo[key] = best
        return best

    def authorization_policies_for(self, namespace: str, labels: Mapping[str, str]) -> tuple[Resource, ...]:
        """Policies for a workload: root-namespace ones (mesh-wide) plus the namespace's,
        each either without selector or with a selector matching ``labels``. Policies using
        ``targetRef(s)`` are not included (see ``authorization_policies_for_target``)."""
        key = (namespace, tuple(sorted(labels.items())))
        memo = self._memo_authz
        if key in memo:
            return memo[key]
        out = []
        namespaces = [self.root_namespace] if namespace == self.root_namespace else [self.root_namespace, namespace]
        for ns in namespaces:
            for res in self._authz_by_ns.get(ns, ()):
                sel = res.spec.selector
                if sel is None or _labels_match(sel.match_labels, labels):
                    out.append(res)
        result = tuple(out)
        if len(memo) >= _CACHE_LIMIT:
            memo.clear()
        memo[key] = result
        return result

    def authorization_policies_for_target(self, kind: str, namespace: str, name: str) -> tuple[Resource, ...]:
        """Policies whose ``targetRef``/``targetRefs`` name this object (e.g. a Service)."""
        return self._authz_targeted.get((kind, namespace, name), ())

    def subset_labels(self, host_fqdn: str, subset: str, source_namespace: str) -> Mapping[str, str] | None:
        """Labels of a DestinationRule subset, or None when the DR or subset is missing."""
        dr = self.destination_rule_for(host_fqdn, source_namespace)
        if dr is None:
            return None
        for s in dr.spec.subsets:
            if s.name == subset:
                return s.labels
        return None

    # -- internals -------------------------------------------------------

    def _lookup(self, exact, wild, host_fqdn: str, source_namespace: str) -> Resource | None:
        host = host_fqdn.lower().rstrip(".")
        best = None
        for order, res in exact.get(host, ()):
            if _visible(res.spec.export_to, res.namespace, source_namespace):
                return res
        for pattern, entries in wild:    # sorted: longest (most specific) pattern first
            if host_matches(pattern, host):
                for order, res in entries:
                    if _visible(res.spec.export_to, res.namespace, source_namespace):
                        return res
        return best

    def __repr__(self) -> str:
        return (f"ConfigSnapshot(version={self.version}, resources={len(self.resources)}, "
                f"services={len(self.services)}, workloads={len(self.workloads)})")


def _applies_to_mesh(vs: VirtualService) -> bool:
    return not vs.gateways or "mesh" in vs.gateways


def build_snapshot(resources: Iterable[Resource], domain_suffix: str = "svc.cluster.local",
                   root_namespace: str = "istio-system", version: int = 0) -> ConfigSnapshot:
    """Compile validated resources (in age order: oldest first) into a ConfigSnapshot."""
    res_t = tuple(resources)
    snap = object.__new__(ConfigSnapshot)
    s = snap.__setattr__
    warnings: list[str] = []
    s("version", version)
    s("resources", res_t)
    s("domain_suffix", domain_suffix)
    s("root_namespace", root_namespace)
    s("_cluster_domain", domain_suffix[4:] if domain_suffix.startswith("svc.") else "")

    by_kind: dict[str, list[tuple[int, Resource]]] = {}
    for i, r in enumerate(res_t):
        by_kind.setdefault(r.kind, []).append((i, r))

    # workloads
    workloads: list[WorkloadRef] = []
    wl_by_addr: dict[str, WorkloadRef] = {}
    we_by_ns: dict[str, list[WorkloadRef]] = {}
    for _, r in by_kind.get("WorkloadEntry", ()):
        we: WorkloadEntry = r.spec
        ref = WorkloadRef(name=r.name, namespace=r.namespace,
                          service_account=we.service_account or "default",
                          labels=we.labels, address=we.address or "", ports=we.ports,
                          network=we.network, locality=we.locality)
        workloads.append(ref)
        if ref.address:
            wl_by_addr.setdefault(ref.address, ref)
        we_by_ns.setdefault(r.namespace, []).append(ref)
        # keep the weight for endpoints
    we_weight = {(r.namespace, r.name): r.spec.weight for _, r in by_kind.get("WorkloadEntry", ())}

    # services
    services: dict[str, Service] = {}
    for _, r in by_kind.get("ServiceEntry", ()):
        se: ServiceEntry = r.spec
        eps: list[Endpoint] = []
        for e in se.endpoints:
            eps.append(Endpoint(address=e.address or "", labels=e.labels, ports=e.ports,
                                weight=e.weight, workload=wl_by_addr.get(e.address or ""),
                                locality=e.locality, network=e.network,
                                service_account=e.service_account))
        if se.workload_selector is not None:
            sel = se.workload_selector.match_labels
            for w in we_by_ns.get(r.namespace, ()):
                if _labels_match(sel, w.labels):
                    eps.append(Endpoint(address=w.address, labels=w.labels, ports=w.ports,
                                        weight=we_weight.get(w.key), workload=w,
                                        locality=w.locality, network=w.network,
                                        service_account=w.service_account))
        resolution = se.resolution or "NONE"
        location = se.location or "MESH_EXTERNAL"
        for h in se.hosts:
            # a short name ("reviews") means reviews.<namespace>.<domain_suffix>, as for
            # VirtualService and DestinationRule hosts; anything with a dot is literal
            host = qualify_host(h, r.namespace, domain_suffix)
            host_eps = eps
            if not eps and se.workload_selector is None and resolution in ("DNS", "DNS_ROUND_ROBIN") \
                    and not host.startswith("*"):
                host_eps = [Endpoint(address=host)]
            svc = Service(host=host, namespace=r.namespace, ports=se.ports, addresses=se.addresses,
                          endpoints=tuple(host_eps), resolution=resolution, location=location,
                          mesh_internal=(location == "MESH_INTERNAL"), export_to=se.export_to,
                          subject_alt_names=se.subject_alt_names, source=r)
            if host in services:
                prev = services[host]
                warnings.append(f"{r.ref}: host {host} is already defined by "
                                f"{prev.source.ref if prev.source else '?'}; the older one is used")
                continue
            services[host] = svc
    s("services", MappingProxyType(services))
    s("_wildcard_services", tuple(sorted(((h, v) for h, v in services.items() if h.startswith("*")),
                                         key=lambda hv: -len(hv[0]))))

    addr_index: dict[str, Service] = {}
    cidr_index: list[tuple[ipaddress._BaseNetwork, Service]] = []
    endpoint_index: dict[str, list[tuple[Service, Endpoint]]] = {}
    for svc in services.values():
        for a in svc.addresses:
            if "/" in a:
                try:
                    net = ipaddress.ip_network(a, strict=False)
                except ValueError:
                    continue
                if net.num_addresses == 1:
                    addr_index.setdefault(str(net.network_address), svc)
                else:
                    cidr_index.append((net, svc))
            else:
                addr_index.setdefault(a, svc)
        for ep in svc.endpoints:
            endpoint_index.setdefault(ep.address, []).append((svc, ep))
    cidr_index.sort(key=lambda ns: -ns[0].prefixlen)
    s("_addr_index", addr_index)
    s("_cidr_index", tuple(cidr_index))
    s("_endpoint_index", {k: tuple(v) for k, v in endpoint_index.items()})
    s("workloads", tuple(workloads))
    s("_workload_by_addr", wl_by_addr)

    # virtual services (mesh-bound only) and destination rules, by qualified host
    def index(kind: str, hosts_of, keep=lambda r: True):
        exact: dict[str, list] = {}
        wild: dict[str, list] = {}
        for order, r in by_kind.get(kind, ()):
            if not keep(r):
                continue
            for h in hosts_of(r):
                q = qualify_host(h, r.namespace, domain_suffix)
                (wild if q.startswith("*") else exact).setdefault(q, []).append((order, r))
        wild_sorted = tuple(sorted(((p, tuple(v)) for p, v in wild.items()), key=lambda pv: -len(pv[0])))
        return {k: tuple(v) for k, v in exact.items()}, wild_sorted

    vs_exact, vs_wild = index("VirtualService", lambda r: r.spec.hosts, lambda r: _applies_to_mesh(r.spec))
    dr_exact, dr_wild = index("DestinationRule", lambda r: (r.spec.host,))
    s("_vs_exact", vs_exact)
    s("_vs_wild", vs_wild)
    s("_dr_exact", dr_exact)
    s("_dr_wild", dr_wild)
    s("virtual_services", tuple(r for _, r in by_kind.get("VirtualService", ())))
    s("destination_rules", tuple(r for _, r in by_kind.get("DestinationRule", ())))
    s("service_entries", tuple(r for _, r in by_kind.get("ServiceEntry", ())))
    s("workload_entries", tuple(r for _, r in by_kind.get("WorkloadEntry", ())))

    authz_by_ns: dict[str, list[Resource]] = {}
    targeted: dict[tuple[str, str, str], list[Resource]] = {}
    for _, r in by_kind.get("AuthorizationPolicy", ()):
        ap: AuthorizationPolicy = r.spec
        refs = ((ap.target_ref,) if ap.target_ref else ()) + ap.target_refs
        if refs:
            for t in refs:
                targeted.setdefault((t.kind or "", t.namespace or r.namespace, t.name or ""), []).append(r)
        else:
            authz_by_ns.setdefault(r.namespace, []).append(r)
    s("_authz_by_ns", {k: tuple(v) for k, v in authz_by_ns.items()})
    s("_authz_targeted", {k: tuple(v) for k, v in targeted.items()})
    s("authorization_policies", tuple(r for _, r in by_kind.get("AuthorizationPolicy", ())))
    s("peer_authentications", tuple(r for _, r in by_kind.get("PeerAuthentication", ())))
    s("warnings", tuple(warnings))
    s("_memo_host", {})
    s("_memo_vs", {})
    s("_memo_dr", {})
    s("_memo_authz", {})
    s("_frozen", True)
    return snap
