"""HTTP route selection: a VirtualService applied to one request, as Envoy does.

``plan_request`` / ``plan_for_service`` are called by the proxy per request.
Everything static is compiled once per (snapshot, service host, source
namespace, service port) and cached; per request only the match walk, the
weighted pick and the fault/mirror rolls happen.

Semantics (Istio's translation to Envoy routes):

- The VirtualService bound to the mesh for the service host (as seen from the
  source namespace); its ``http`` rules in order, the first matching wins. A
  rule without ``match`` matches everything. Within ``match`` any entry may
  match (OR); inside one entry every field must match (AND).
- No VirtualService -> the default route to the service itself on the request
  port. A VirtualService where no rule matches -> 404, response flag ``NR``.
- ``uri`` matches the path without query and fragment; ``ignoreUriCase``
  applies to exact and prefix only. Regexes are RE2, full match.
- ``headers`` / ``withoutHeaders`` / ``queryParams``: ``{}`` means present /
  absent; a missing header fails a positive match and passes a negated one.
  ``queryParams`` with ``prefix`` is a presence check (Istio emits no value
  matcher for it and Envoy treats that as "present").
- Matches naming ``gateways`` without ``mesh``, and ``port`` other than the
  request port, never match.
"""
from __future__ import annotations

import base64
import bisect
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from policy.cluster import ClusterKey, memo_put, snapshot_memo
from policy.cors import CorsConfig, compile_cors
from policy.l4routing import resolve_destination as _resolve_destination
from policy.lb import query_param
from policy.retry import RetryPolicy, retry_policy_from

if TYPE_CHECKING:
    from policy.snapshot import ConfigSnapshot, Service, WorkloadRef

DEFAULT_ROUTE_NAME = "default"
_bisect_right = bisect.bisect_right


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What routing needs of one HTTP request."""
    method: str
    scheme: str                    # "http" | "https"
    authority: str                 # Host header / :authority, as received
    path: str                      # path incl. ?query, normalized as Envoy's HCM does before
                                   # routing (policy.authz.normalize_path(p, keep_query=True))
    headers: Mapping[str, str]     # lower-case name -> value
    port: int                      # destination service port
    source: WorkloadRef | None     # the calling workload (sourceLabels, sourceNamespace)
    source_ip: str | None = None   # for consistentHash useSourceIp


# ---------------------------------------------------------------------------
# header operations

_REMOVE, _SET, _ADD = 0, 1, 2


class HeaderOps:
    """Envoy header manipulation as an ordered list of (remove | set | add)
    steps. ``set`` replaces (OVERWRITE_IF_EXISTS_OR_ADD), ``add`` appends
    (APPEND_IF_EXISTS_OR_ADD). See ``_merge_levels`` for how route-level and
    destination-level operations are ordered."""

    __slots__ = ("ops",)

    def __init__(self, ops: tuple[tuple[int, str, str], ...] = ()) -> None:
        self.ops = ops

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __eq__(self, other) -> bool:
        return isinstance(other, HeaderOps) and self.ops == other.ops

    def __hash__(self) -> int:
        return hash(self.ops)

    def __repr__(self) -> str:
        names = {_REMOVE: "remove", _SET: "set", _ADD: "add"}
        return "HeaderOps(" + ", ".join(f"{names[k]} {n}" + (f"={v}" if k else "")
                                        for k, n, v in self.ops) + ")"

    @property
    def set(self) -> dict[str, str]:
        return {n: v for k, n, v in self.ops if k == _SET}

    @property
    def add(self) -> dict[str, str]:
        return {n: v for k, n, v in self.ops if k == _ADD}

    @property
    def remove(self) -> tuple[str, ...]:
        return tuple(n for k, n, _ in self.ops if k == _REMOVE)

    def apply(self, headers: dict[str, str]) -> None:
        """Apply to a lower-case-keyed dict in place (``add`` joins with ", ")."""
        for kind, name, value in self.ops:
            if kind == _REMOVE:
                headers.pop(name, None)
            elif kind == _SET:
                headers[name] = value
            else:
                old = headers.get(name)
                headers[name] = value if old is None else f"{old}, {value}"

    def apply_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Apply to a multi-valued header list (names compared case-insensitively);
        returns a new list, ``add`` appends another field."""
        out = list(pairs)
        for kind, name, value in self.ops:
            if kind == _ADD:
                out.append((name, value))
                continue
            out = [(n, v) for n, v in out if n.lower() != name]
            if kind == _SET:
                out.append((name, value))
        return out


class _Level:
    """One level's operations as Istio translates them: removes, the
    set-then-add list, and a ``host``/``:authority`` set (a host rewrite)."""

    __slots__ = ("removes", "adds", "authority")

    def __init__(self, ops) -> None:
        self.removes: tuple = ()
        self.adds: tuple = ()
        self.authority: str | None = None
        if ops is None:
            return
        # pseudo-headers and host are never removed (Istio's dropInternal)
        self.removes = tuple((_REMOVE, n.lower(), "") for n in ops.remove
                             if not _internal_header(n.lower()))
        adds = []
        for kind, mapping in ((_SET, ops.set), (_ADD, ops.add)):
            for name, value in mapping.items():
                n = name.lower()
                if n in ("host", ":authority"):
                    self.authority = value
                if _internal_header(n):
                    continue
                adds.append((kind, n, value))
        self.adds = tuple(adds)


def _internal_header(name: str) -> bool:
    return name.startswith(":") or name == "host"


def _merge_levels(route: _Level, dest: _Level | None, weighted: bool) -> HeaderOps:
    """Istio puts a single destination's operations into the route's own lists
    (after the route's), and a weighted destination's into its weighted-cluster
    level. Envoy evaluates a level's removes before its sets/adds, and the most
    specific level (weighted cluster) first, so the route level wins there."""
    if dest is None:
        ops = route.removes + route.adds
    elif weighted:
        ops = dest.removes + dest.adds + route.removes + route.adds
    else:
        ops = route.removes + dest.removes + route.adds + dest.adds
    return HeaderOps(ops) if ops else EMPTY_HEADER_OPS


EMPTY_HEADER_OPS = HeaderOps()


# ---------------------------------------------------------------------------
# results


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """One route destination, its weight and its merged header ops."""
    cluster: ClusterKey
    weight: int
    request_headers: HeaderOps
    response_headers: HeaderOps
    known: bool = True     # False: no such service/subset (the request gets 503 "NC")
    authority: str | None = None   # host rewrite from this destination's headers (host / :authority)


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the request locally."""
    status: int
    response_flags: str            # "NR" no route, "NC" no cluster, "" for redirect / direct response
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


class _Route:
    """One compiled HTTPRoute (static per table)."""

    __slots__ = ("name", "matches", "destinations", "cum", "total", "timeout", "retry",
                 "rewrite_uri", "regex_rewrite", "rewrite_authority", "delay", "delay_pct", "abort", "abort_grpc", "abort_pct",
                 "mirrors", "reject", "redirect", "service", "service_port", "virtual_service",
                 "cors")


class RoutePlan:
    """The result of routing one request. Per-request fields are slots; the
    static ones are read through to the compiled route."""

    __slots__ = ("_route", "_dest", "path", "authority", "fault_delay", "fault_abort",
                 "fault_grpc_status", "mirrors")

    path: str                      # after rewrite
    authority: str                 # after rewrite
    fault_delay: float | None      # seconds, already rolled against its percentage
    fault_abort: int | None        # HTTP status, already rolled
    fault_grpc_status: str | None  # gRPC abort status name, already rolled
    mirrors: tuple[ClusterKey, ...]  # already rolled against their percentages

    def __init__(self, route: _Route, dest: WeightedCluster, path: str, authority: str,
                 fault_delay, fault_abort, fault_grpc_status, mirrors) -> None:
        self._route = route
        self._dest = dest
        self.path = path
        self.authority = authority
        self.fault_delay = fault_delay
        self.fault_abort = fault_abort
        self.fault_grpc_status = fault_grpc_status
        self.mirrors = mirrors

    @property
    def service(self) -> Service:
        return self._route.service

    @property
    def service_port(self) -> int:
        return self._route.service_port

    @property
    def route_name(self) -> str | None:
        return self._route.name

    @property
    def virtual_service(self) -> str | None:
        """"namespace/name" of the VirtualService used, None for the default route."""
        return self._route.virtual_service

    @property
    def destinations(self) -> tuple[WeightedCluster, ...]:
        return self._route.destinations

    @property
    def destination(self) -> WeightedCluster:
        return self._dest

    @property
    def cluster(self) -> ClusterKey:
        """The picked destination's cluster."""
        return self._dest.cluster

    @property
    def request_headers(self) -> HeaderOps:
        """Destination-level then route-level request header ops."""
        return self._dest.request_headers

    @property
    def response_headers(self) -> HeaderOps:
        return self._dest.response_headers

    @property
    def timeout(self) -> float | None:
        """None = no timeout (Istio's default for HTTP routes)."""
        return self._route.timeout

    @property
    def retry(self) -> RetryPolicy | None:
        """None = retries disabled."""
        return self._route.retry

    @property
    def cors(self) -> CorsConfig | None:
        """The route's compiled ``corsPolicy`` (policy.cors), None without one."""
        return self._route.cors

    def __repr__(self) -> str:
        return (f"RoutePlan(route={self.route_name!r}, cluster={self.cluster}, path={self.path!r}, "
                f"authority={self.authority!r}, timeout={self.timeout}, fault_delay={self.fault_delay}, "
                f"fault_abort={self.fault_abort}, mirrors={self.mirrors})")


# ---------------------------------------------------------------------------
# compiling matches


def re2_fullmatch(pattern: str):
    """A predicate str -> bool: RE2 full match (Envoy's safe_regex). Uses the
    pybind layer of google-re2 directly: ~5x faster than ``re2.fullmatch``,
    which builds a match object per call. re2 (the module and libstdc++, ~2.3 MiB) is
    loaded by the first regex configured, not by every agent."""
    from re2 import _re2
    anchor = _re2.RE2.Anchor.ANCHOR_BOTH
    opts = _re2.RE2.Options()
    opts.never_capture = True
    opts.log_errors = False
    rx = _re2.RE2(pattern.encode(), opts)
    if not rx.ok():
        raise ValueError(f"invalid RE2 regex {pattern!r}: {rx.error().decode(errors='replace')}")
    match = rx.Match

    def fullmatch(s: str) -> bool:
        b = s.encode()
        return match(anchor, b, 0, len(b))[0][0] >= 0
    return fullmatch


def _string_matcher(sm, ignore_case: bool = False):
    """A predicate str -> bool for a model StringMatch."""
    kind, value = sm.kind, sm.value
    if kind == "regex":
        return re2_fullmatch(value)
    if ignore_case:
        value = value.lower()
        if kind == "exact":
            return lambda s: s.lower() == value
        return lambda s: s.lower().startswith(value)
    if kind == "exact":
        return value.__eq__
    if kind == "prefix":
        return lambda s: s.startswith(value)
    if kind == "present":
        return lambda s: True
    raise ValueError(f"unknown string match kind {kind!r}")


def _header_check(name: str, sm):
    name = name.lower()
    if sm.kind == "present":
        return lambda req, path: name in req.headers
    m = _string_matcher(sm)

    def check(req, path):
        v = req.headers.get(name)
        return v is not None and bool(m(v))
    return check


def _without_header_check(name: str, sm):
    name = name.lower()
    if sm.kind == "present":
        return lambda req, path: name not in req.headers
    m = _string_matcher(sm)

    def check(req, path):
        v = req.headers.get(name)
        return v is None or not m(v)
    return check


def _query_check(name: str, sm):
    if sm.kind in ("present", "prefix"):
        return lambda req, path: query_param(req.path, name) is not None
    m = _string_matcher(sm)

    def check(req, path):
        v = query_param(req.path, name)
        return v is not None and bool(m(v))
    return check


class _Match:
    __slots__ = ("checks", "test", "uri_kind", "uri_value", "name", "uri_only")


def _uri_check(sm, ignore_case: bool):
    """A check (req, path) -> bool for a ``uri`` StringMatch: one call per request
    for exact and prefix (the common cases)."""
    kind, value = sm.kind, sm.value
    if not ignore_case:
        if kind == "exact":
            return lambda req, path: path == value
        if kind == "prefix":
            return lambda req, path: path.startswith(value)
    m = _string_matcher(sm, ignore_case)
    return lambda req, path: bool(m(path))


def _all_of(checks: tuple):
    """One predicate (req, path) -> bool: every check passes (the check itself when alone)."""
    if len(checks) == 1:
        return checks[0]
    if not checks:
        return lambda req, path: True

    def test(req, path):
        for check in checks:
            if not check(req, path):
                return False
        return True
    return test


def _compile_match(mr, port: int) -> _Match | None:
    """None when the match can never apply to mesh traffic on ``port``."""
    if mr.gateways and "mesh" not in mr.gateways:
        return None
    if mr.port is not None and mr.port != port:
        return None
    checks = []
    if mr.uri is not None:
        checks.append(_uri_check(mr.uri, mr.ignore_uri_case and mr.uri.kind != "regex"))
    if mr.scheme is not None:
        m_scheme = _string_matcher(mr.scheme)
        checks.append(lambda req, path: bool(m_scheme(req.scheme)))
    if mr.method is not None:
        m_method = _string_matcher(mr.method)
        checks.append(lambda req, path: bool(m_method(req.method)))
    if mr.authority is not None:
        m_auth = _string_matcher(mr.authority)
        checks.append(lambda req, path: bool(m_auth(req.authority)))
    for name, sm in mr.headers.items():
        checks.append(_header_check(name, sm))
    for name, sm in mr.without_headers.items():
        checks.append(_without_header_check(name, sm))
    for name, sm in mr.query_params.items():
        checks.append(_query_check(name, sm))
    if mr.source_labels:
        want = tuple(mr.source_labels.items())

        def source_labels(req, path):
            src = req.source
            if src is None:
                return False
            labels = src.labels
            return all(labels.get(k) == v for k, v in want)
        checks.append(source_labels)
    if mr.source_namespace is not None:
        sns = mr.source_namespace
        checks.append(lambda req, path: req.source is not None and req.source.namespace == sns)
    cm = _Match()
    cm.checks = tuple(checks)
    cm.test = _all_of(cm.checks)
    cm.uri_kind = mr.uri.kind if mr.uri is not None else None
    cm.uri_value = mr.uri.value if mr.uri is not None else None
    cm.name = mr.name
    # 1 exact, 2 prefix: the uri test is the only check and is case-sensitive (select_route
    # runs it inline); 0 otherwise
    cm.uri_only = 0
    if len(checks) == 1 and mr.uri is not None and not mr.ignore_uri_case:
        cm.uri_only = {"exact": 1, "prefix": 2}.get(mr.uri.kind, 0)
    return cm


# ---------------------------------------------------------------------------
# compiling routes


def _percent(p: float | None, absent: float) -> float:
    return absent if p is None else float(p)


def _compile_route(snapshot, hr, vs_res, service, port: int, source_ns: str) -> _Route | None:
    r = _Route()
    r.name = hr.name
    r.service = service
    r.service_port = port
    r.virtual_service = f"{vs_res.namespace}/{vs_res.name}"
    if hr.match:
        matches = tuple(m for m in (_compile_match(mr, port) for mr in hr.match) if m is not None)
        if not matches:
            return None    # every match is for gateways / another port
        r.matches = matches
    else:
        r.matches = ()
    headers = hr.headers
    route_req = _Level(headers.request if headers is not None else None)
    route_resp = _Level(headers.response if headers is not None else None)
    r.timeout = hr.timeout if hr.timeout else None
    r.retry = retry_policy_from(hr.retries)
    r.cors = compile_cors(hr.cors_policy)
    r.reject = None
    r.redirect = None
    dests = []
    if hr.redirect is not None:
        r.redirect = hr.redirect
    elif hr.direct_response is not None:
        dr = hr.direct_response
        body = b""
        if dr.body is not None:
            if dr.body.string is not None:
                body = dr.body.string.encode()
            elif dr.body.bytes is not None:
                body = base64.b64decode(dr.body.bytes)
        r.reject = Reject(dr.status, "", (("content-type", "text/plain"),) if body else (), body)
    elif not hr.route:
        # delegate (gateway-only in Istio) or nothing to route to
        r.reject = Reject(404, "NR")
    else:
        weighted = len(hr.route) > 1
        for rd in hr.route:
            weight = (rd.weight or 0) if weighted else 100
            if weight <= 0:
                continue      # Istio drops weight-0 destinations
            key, known = _resolve_destination(snapshot, rd.destination, vs_res.namespace,
                                              source_ns, port)
            d_headers = rd.headers
            d_req = _Level(d_headers.request if d_headers is not None else None)
            d_resp = _Level(d_headers.response if d_headers is not None else None)
            dests.append(WeightedCluster(key, weight, _merge_levels(route_req, d_req, weighted),
                                         _merge_levels(route_resp, d_resp, weighted), known,
                                         d_req.authority))
        if not dests:
            r.reject = Reject(503, "NC")
    r.destinations = tuple(dests)
    r.cum = tuple(_cumulative(dests))
    r.total = r.cum[-1] if dests else 0
    rw = hr.rewrite
    r.rewrite_uri = rw.uri if rw is not None and rw.uri is not None else None
    r.regex_rewrite = None
    if rw is not None and rw.uri_regex_rewrite is not None:
        import re2  # loaded by the first regex configured (re2_fullmatch)
        pat = re2.compile(rw.uri_regex_rewrite.match)
        repl = rw.uri_regex_rewrite.rewrite
        r.regex_rewrite = (pat, repl)
    # rewrite.authority, else a route-level host/:authority header set (Istio's host rewrite)
    r.rewrite_authority = (rw.authority if rw is not None and rw.authority else None) or route_req.authority
    r.delay = r.delay_pct = r.abort = r.abort_grpc = r.abort_pct = None
    fault = hr.fault
    if fault is not None:
        if fault.delay is not None and fault.delay.fixed_delay is not None:
            r.delay = fault.delay.fixed_delay
            # Istio: a fault without a percentage (nor legacy percent) injects nothing
            r.delay_pct = _percent(fault.delay.percentage, 0.0)
        if fault.abort is not None and (fault.abort.http_status is not None or fault.abort.grpc_status):
            r.abort = fault.abort.http_status
            r.abort_grpc = fault.abort.grpc_status
            r.abort_pct = _percent(fault.abort.percentage, 0.0)
    mirrors = []
    if hr.mirror is not None:
        key, _ = _resolve_destination(snapshot, hr.mirror, vs_res.namespace, source_ns, port)
        mirrors.append((key, _percent(hr.mirror_percentage, 100.0)))   # absent: mirror all
    for mp in hr.mirrors:
        key, _ = _resolve_destination(snapshot, mp.destination, vs_res.namespace, source_ns, port)
        mirrors.append((key, _percent(mp.percentage, 100.0)))
    r.mirrors = tuple(mirrors)
    return r


def _default_route(service, port: int) -> _Route:
    r = _Route()
    r.name = DEFAULT_ROUTE_NAME
    r.service = service
    r.service_port = port
    r.virtual_service = None
    r.matches = ()
    r.timeout = None
    r.retry = retry_policy_from(None)
    r.cors = None
    r.reject = None
    r.redirect = None
    known = service.port(port) is not None
    r.destinations = (WeightedCluster(ClusterKey(service.host, None, port), 100,
                                      EMPTY_HEADER_OPS, EMPTY_HEADER_OPS, known),)
    r.cum = (100,)
    r.total = 100
    r.rewrite_uri = r.regex_rewrite = r.rewrite_authority = None
    r.delay = r.delay_pct = r.abort = r.abort_grpc = r.abort_pct = None
    r.mirrors = ()
    return r


_NO_ROUTE = Reject(404, "NR")
_NO_CLUSTER = Reject(503, "NC")


def route_table(snapshot: ConfigSnapshot, service: Service, service_port: int,
                source_namespace: str) -> tuple[_Route, ...] | _Route:
    """The compiled routes for a service port as seen from a namespace: a
    tuple of routes (from a VirtualService) or the single default route."""
    memo = snapshot_memo(snapshot)
    key = ("routes", service.host, source_namespace, service_port)
    try:
        return memo[key]
    except KeyError:
        pass
    vs_res = snapshot.virtual_service_for(service.host, source_namespace)
    if vs_res is None:
        table = _default_route(service, service_port)
    else:
        table = tuple(r for r in (_compile_route(snapshot, hr, vs_res, service, service_port,
                                                 source_namespace)
                                  for hr in vs_res.spec.http) if r is not None)
    return memo_put(memo, key, table)


# ---------------------------------------------------------------------------
# per request


def _rewrite_path(route: _Route, match: _Match | None, path: str, path_only: str) -> str:
    query = path[len(path_only):]
    if route.regex_rewrite is not None:
        pat, repl = route.regex_rewrite
        return pat.sub(repl, path_only) + query
    new = route.rewrite_uri
    kind = match.uri_kind if match is not None else None
    if kind == "prefix":
        return new + path_only[len(match.uri_value):] + query
    if kind in ("exact", "regex"):
        return new + query
    # no uri match: Envoy's catch-all prefix "/" is what gets replaced
    return new + path_only[1:] + query


def _redirect(route: _Route, req: RequestAttrs) -> Reject:
    rd = route.redirect
    scheme = rd.scheme or req.scheme
    host = rd.authority or req.authority
    if rd.port is not None:
        host = f"{_host_only(host)}:{rd.port}"
    elif rd.derive_port == "FROM_REQUEST_PORT":
        host = f"{_host_only(host)}:{req.port}"
    elif rd.derive_port == "FROM_PROTOCOL_DEFAULT":
        host = _host_only(host)
    if rd.uri is not None:
        path = rd.uri
        if "?" not in path:
            _, sep, query = req.path.partition("?")
            if sep:
                path = f"{path}?{query}"
    else:
        path = req.path
    return Reject(rd.redirect_code or 301, "", (("location", f"{scheme}://{host}{path}"),))


def _host_only(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def plan_for_service(snapshot: ConfigSnapshot, service: Service, service_port: int,
                     req: RequestAttrs, rand: random.Random) -> RoutePlan | Reject:
    """Route a request already known to target ``service:service_port``.
    No VirtualService -> the default route to the service itself; a VS where
    no rule matches -> Reject(404, "NR"); a picked destination that names no
    known service/port/subset -> Reject(503, "NC")."""
    src = req.source
    ns = src.namespace if src is not None else "default"
    table = route_table(snapshot, service, service_port, ns)
    path = req.path
    path_only = path_part(path)
    hit = select_route(table, req, path_only, rand)
    if hit.__class__ is Reject:
        return hit
    return finish_plan(hit[0], hit[1], hit[2], req, path_only, rand)


def path_part(path: str) -> str:
    """The path without its query or fragment (what ``uri`` matches)."""
    i = path.find("?")
    if i >= 0:
        path = path[:i]
    i = path.find("#")
    if i >= 0:
        path = path[:i]
    return path


def select_route(table, req, path_only: str, rand: random.Random):
    """The first half of ``plan_for_service`` on a ``route_table``: the first
    matching route, the matched entry (None without one) and the destination
    picked by weight, as ``(route, match, destination)``; or a ``Reject`` (no
    route, redirect, direct response, unknown cluster). ``req`` is a
    ``RequestAttrs`` or any object with the same attributes. The weight roll
    is the only use of ``rand`` here; ``finish_plan`` makes the others."""
    match = None
    if type(table) is tuple:
        for route in table:
            if not route.matches:
                break
            for m in route.matches:
                # a match on the uri alone (exact or prefix, case-sensitive): tested inline
                kind = m.uri_only
                if kind == 2:
                    if path_only.startswith(m.uri_value):
                        match = m
                        break
                elif kind == 1:
                    if path_only == m.uri_value:
                        match = m
                        break
                elif m.test(req, path_only):
                    match = m
                    break
            if match is not None:
                break
        else:
            return _NO_ROUTE
    else:
        route = table
    if route.redirect is not None:
        return _redirect(route, req)
    if route.reject is not None:
        return route.reject
    dests = route.destinations
    if len(dests) == 1:
        dest = dests[0]
    else:
        dest = dests[_bisect_right(route.cum, rand.random() * route.total)]
    if not dest.known:
        return _NO_CLUSTER
    return route, match, dest


def is_static(route: _Route, dest: WeightedCluster) -> bool:
    """True when ``finish_plan`` for this route and destination always keeps
    the request's path and authority and rolls nothing (no rewrite, no host
    rewrite, no fault, no mirror): the plan is then the same for every request
    except for the request's own path and authority. A route with a ``corsPolicy`` is
    never static: its preflights are answered per request."""
    return (route.cors is None and route.rewrite_uri is None and route.regex_rewrite is None and dest.authority is None
            and route.rewrite_authority is None and route.delay is None and route.abort_pct is None
            and not route.mirrors)


def fixed_destination(table) -> WeightedCluster | None:
    """The destination ``select_route`` gives every request on this table when
    that depends neither on the request nor on ``rand``: the first route has no
    ``match``, one known destination, and is no redirect or direct response
    (always so for the default route). None otherwise."""
    route = table
    if type(table) is tuple:
        if not table or table[0].matches:
            return None
        route = table[0]
    if route.redirect is not None or route.reject is not None or len(route.destinations) != 1:
        return None
    dest = route.destinations[0]
    return dest if dest.known else None


def finish_plan(route: _Route, match, dest: WeightedCluster, req, path_only: str,
                rand: random.Random) -> RoutePlan:
    """The second half of ``plan_for_service``: rewrites, fault and mirror rolls
    for what ``select_route`` returned."""
    path = req.path
    if route.rewrite_uri is not None or route.regex_rewrite is not None:
        path = _rewrite_path(route, match, path, path_only)
    authority = dest.authority or route.rewrite_authority or req.authority
    delay = abort = grpc = None
    if route.delay is not None and rand.random() * 100.0 < route.delay_pct:
        delay = route.delay
    if route.abort_pct is not None and rand.random() * 100.0 < route.abort_pct:
        abort = route.abort
        grpc = route.abort_grpc
    mirrors = ()
    if route.mirrors:
        mirrors = tuple(k for k, pct in route.mirrors if pct >= 100.0 or rand.random() * 100.0 < pct)
    return RoutePlan(route, dest, path, authority, delay, abort, grpc, mirrors)


def plan_request(snapshot: ConfigSnapshot, req: RequestAttrs,
                 rand: random.Random) -> RoutePlan | Reject:
    """Resolve the service from ``req.authority`` (relative to the source
    namespace) then route it (see ``plan_for_service``) on ``req.port``.
    Unknown host -> Reject(404, "NR"); a proxy that forwards unknown hosts to
    their original destination (Istio's ALLOW_ANY) checks ``resolve_host`` first."""
    src = req.source
    ns = src.namespace if src is not None else "default"
    service = snapshot.resolve_host(req.authority, ns)
    if service is None:
        return _NO_ROUTE
    return plan_for_service(snapshot, service, req.port, req, rand)


def _cumulative(dests) -> list[int]:
    cum = []
    total = 0
    for d in dests:
        total += d.weight
        cum.append(total)
    return cum
