"""AuthorizationPolicy verdicts, exactly as Istio evaluates them.

Pure: compiled policies and a plain attribute object in, a ``Verdict`` out.
No I/O, no clock. The proxy builds a ``Connection`` when it accepts a
connection (peer identity, addresses, SNI) and, for HTTP, a ``Request`` per
request; ``evaluate`` does the rest.

Evaluation order, quoting Istio's AuthorizationPolicy reference
(https://istio.io/latest/docs/reference/config/security/authorization-policy/):

    "When CUSTOM, DENY and ALLOW actions are used for a workload at the same
    time, the CUSTOM action is evaluated first, then the DENY action, and
    finally the ALLOW action. The evaluation is determined by the following
    rules:
      1. If there are any CUSTOM policies that match the request, evaluate and
         deny the request if the evaluation result is deny.
      2. If there are any DENY policies that match the request, deny the request.
      3. If there are no ALLOW policies for the workload, allow the request.
      4. If any of the ALLOW policies match the request, allow the request.
      5. Deny the request."

    "AUDIT policies do not affect whether requests are allowed or denied to
    the workload."

nodeagent has no external authorizer, so a CUSTOM policy that matches can
never be "evaluated": it denies (fail closed) with the reason
``CUSTOM provider <name> not supported: denied``.

Matching, as Istio's generator (pilot/pkg/security/authz/model) builds it:
a policy matches when any of its rules matches; a rule matches when its
``from``, ``to`` and ``when`` all match (an absent section matches anything);
``from``/``to`` match when any of their entries matches; an entry matches when
every field set in it matches; a field matches when any of its values
matches, and a ``not*`` field when none of its values matches. Values use
Istio's string forms: exact, prefix ``abc*``, suffix ``*abc``, presence ``*``.

Fields Istio cannot use for a connection -- HTTP-only fields (hosts,
methods, paths, request.headers, request principals, request.auth.*) on plain
TCP -- follow Istio's rule (``checkError`` in model.go): "Return the error
as-is for allow policy. This will make all rules in the current permission
ignored, effectively result in a smaller allow policy" and "Ignore the error
for a deny or audit policy. This will make the current rule ignored [...]
effectively resulting in a wider deny or audit policy". So for TCP an ALLOW
rule with an HTTP-only field never matches, while in DENY/AUDIT/CUSTOM the
HTTP-only field is dropped and the rest of the rule still applies. The same
rule applies to attributes nodeagent cannot evaluate at all (JWT: there is no
RequestAuthentication; experimental.envoy.filters.*; unknown keys) and to
values that do not parse (a bad CIDR or port): they can never widen an ALLOW
and never narrow a DENY.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping

from policy.principal import (
    DEFAULT_TRUST_DOMAIN, SPIFFE_PREFIX, expand_trust_domain_aliases, try_parse_principal,
)

__all__ = [
    "RBAC_DENIED_STATUS", "RBAC_DENIED_BODY", "RBAC_RESPONSE_FLAG",
    "Connection", "Request", "Verdict", "CompiledPolicy", "PolicySet", "AuthorizationIndex",
    "compile_policies", "compile_policy", "evaluate", "needs_l7", "normalize_path", "InvalidPath",
    "unsupported_field_warnings",
]

# What the proxy answers to a denied HTTP request (as Envoy's RBAC filter).
RBAC_DENIED_STATUS = 403
RBAC_DENIED_BODY = b"RBAC: access denied"
RBAC_RESPONSE_FLAG = "RBAC"  # response_flags in access log and metrics

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")


# --------------------------------------------------------------------------
# attributes


@lru_cache(maxsize=8192)
def _ip_key(ip: str | None) -> tuple[int, int] | None:
    """(version, integer) of an address; None when absent or unparsable."""
    if not ip:
        return None
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return (a.version, int(a))


class Connection:
    """L4 attributes of one inbound connection, as the proxy knows them.

    ``source_principal`` is the peer's principal (``td/ns/x/sa/y``; a
    ``spiffe://`` URI is accepted too) or None for plaintext. Istio derives
    ``source.namespace`` from the peer identity, so plaintext has none.
    ``remote_ip`` is the original client address when an X-Forwarded-For /
    PROXY-protocol source is trusted; otherwise it equals ``source_ip``.
    """
    __slots__ = ("source_principal", "source_namespace", "source_service_account",
                 "source_ip", "remote_ip", "destination_ip", "destination_port", "sni",
                 "_src", "_remote", "_dst", "_ns_sa")

    def __init__(self, *, source_principal: str | None = None, source_ip: str | None = None,
                 destination_ip: str | None = None, destination_port: int | None = None,
                 sni: str | None = None, remote_ip: str | None = None):
        if source_principal and source_principal[:9].lower() == SPIFFE_PREFIX:
            source_principal = source_principal[9:]
        self.source_principal = source_principal or None
        sid = try_parse_principal(self.source_principal)
        self.source_namespace = sid.namespace if sid else None
        self.source_service_account = sid.service_account if sid else None
        self._ns_sa = f"{sid.namespace}/{sid.service_account}" if sid else None
        self.source_ip = source_ip
        self.remote_ip = remote_ip if remote_ip is not None else source_ip
        self.destination_ip = destination_ip
        self.destination_port = destination_port
        self.sni = sni or None
        self._src = _ip_key(source_ip)
        self._remote = _ip_key(self.remote_ip)
        self._dst = _ip_key(destination_ip)

    def __repr__(self) -> str:
        return (f"Connection(source_principal={self.source_principal!r}, source_ip={self.source_ip!r}, "
                f"destination={self.destination_ip!r}:{self.destination_port!r}, sni={self.sni!r})")


_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")
# Istio BASE normalization decodes these once: - . 0-9 A-Z _ a-z ~ (RFC 3986 unreserved)
_UNRESERVED_ESCAPE = re.compile(r"%(?:2[dDeE]|3[0-9]|4[1-9a-fA-F]|5[0-9aAfF]|6[1-9a-fA-F]|7[0-9aAeE])")


class InvalidPath(ValueError):
    """A request path Istio refuses outright (``%00``): the proxy answers 400."""


def _unescape(m: re.Match) -> str:
    return chr(int(m.group()[1:], 16))


def normalize_path(target: str, keep_query: bool = False) -> str:
    """Istio's default (``BASE``) normalization of a request path.

    As https://istio.io/latest/docs/reference/config/security/normalization/
    lists it: percent-encoded unreserved characters (``%2d %2e %30-%39
    %41-%5a %5f %61-%7a %7e``) are decoded once; ``%00`` rejects the request
    (``InvalidPath``); a backslash becomes ``/``; ``.`` and ``..`` segments are
    resolved as in RFC 3986; slashes are not merged and ``%2f`` stays encoded.
    "The normalized request will be used for both the evaluation of
    authorization policies and the request that is ultimately sent to the
    backend server": ``paths`` are matched without the query, and the query is
    kept (``keep_query``) for forwarding. A fragment is dropped.
    """
    i = target.find("#")
    if i >= 0:
        target = target[:i]
    query = ""
    i = target.find("?")
    if i >= 0:
        target, query = target[:i], target[i:]
    path = target
    if "%" in path:
        if "%00" in path:
            raise InvalidPath("request path contains %00")
        path = _UNRESERVED_ESCAPE.sub(_unescape, path)
    if "\\" in path:
        path = path.replace("\\", "/")
    if "." in path and _DOT_SEGMENT.search(path):
        out: list[str] = []
        segments = path.split("/")
        last = len(segments) - 1
        for n, seg in enumerate(segments):
            if seg == "." or seg == "..":
                if seg == ".." and len(out) > 1:
                    out.pop()
                if n == last:
                    out.append("")
                continue
            out.append(seg)
        path = "/".join(out)
    if not path.startswith("/"):
        path = "/" + path
    return path + query if keep_query else path


class Request:
    """L7 attributes of one HTTP request on a ``Connection``.

    ``path`` is the request target as received; ``Request.path`` is the
    normalized path that ``paths`` match (no query) and ``Request.target`` the
    normalized path with the query, which the proxy forwards (see
    ``normalize_path``; raises ``InvalidPath`` for ``%00``: answer 400).
    ``headers`` maps lower-case names to values; repeated headers are joined
    with "," (as Envoy does); pairs are accepted too.
    """
    __slots__ = ("connection", "host", "method", "path", "target", "headers")

    def __init__(self, connection: Connection, *, host: str | None = None, method: str | None = None,
                 path: str | None = None,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None):
        self.connection = connection
        self.host = host
        self.method = method
        if path is None:
            self.path = self.target = None
        else:
            self.target = normalize_path(path, keep_query=True)
            i = self.target.find("?")
            self.path = self.target if i < 0 else self.target[:i]
        if headers is None:
            self.headers: Mapping[str, str] = {}
        elif isinstance(headers, Mapping):
            self.headers = headers if all(k == k.lower() for k in headers) \
                else {k.lower(): v for k, v in headers.items()}
        else:
            joined: dict[str, str] = {}
            for k, v in headers:
                k = k.lower()
                joined[k] = f"{joined[k]},{v}" if k in joined else v
            self.headers = joined

    def __repr__(self) -> str:
        return f"Request({self.method} {self.host}{self.path} on {self.connection!r})"


# --------------------------------------------------------------------------
# value matchers (one per field, built from the whole list of values)


class _Strings:
    """Istio's string forms: exact, ``prefix*``, ``*suffix``, ``*`` (presence)."""
    __slots__ = ("exact", "prefixes", "suffixes", "any", "fold")

    def __init__(self, values: Iterable[str], fold: bool = False):
        exact, prefixes, suffixes, any_ = set(), [], [], False
        for v in values:
            if fold:
                v = v.lower()
            if v == "*":
                any_ = True
            elif v.startswith("*"):
                suffixes.append(v[1:])
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            else:
                exact.add(v)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.any = any_
        self.fold = fold

    def __call__(self, v: str | None) -> bool:
        if v is None:
            return False
        if self.any:
            return True
        if self.fold:
            v = v.lower()
        return v in self.exact or (bool(self.prefixes) and v.startswith(self.prefixes)) \
            or (bool(self.suffixes) and v.endswith(self.suffixes))


class _Paths(_Strings):
    """Paths: the string forms plus Istio's templates ``{*}`` (one segment) and ``{**}``."""
    __slots__ = ("templates",)

    def __init__(self, values: Iterable[str]):
        values = list(values)
        super().__init__([v for v in values if not _is_path_template(v)])
        self.templates = tuple(_compile_path_template(v) for v in values if _is_path_template(v))

    def __call__(self, v: str | None) -> bool:
        if v is None:
            return False
        if _Strings.__call__(self, v):
            return True
        for t in self.templates:
            if t.match(v):
                return True
        return False


def _is_path_template(v: str) -> bool:
    return "{*}" in v or "{**}" in v


def _compile_path_template(v: str) -> re.Pattern:
    """``{*}`` matches within one segment; ``{**}`` (the last operator) matches the rest.

    Tuned to Istio's documented examples: ``/foo/{*}`` matches ``/foo/bar``
    not ``/foo/bar/baz``; ``/foo/{**}/`` matches ``/foo/bar/``,
    ``/foo/bar/baz.txt`` and ``/foo//`` but not ``/foo/bar``.
    """
    out = []
    for part in re.split(r"(\{\*\*\}|\{\*\})", v):
        if part == "{*}":
            out.append(r"[^/]+")
        elif part == "{**}":
            out.append(r".*")
        else:
            out.append(re.escape(part))
    body = "".join(out)
    return re.compile(body if "{**}" in v else body + r"\Z")


class _Cidrs:
    __slots__ = ("nets",)

    def __init__(self, nets: Iterable[tuple[int, int, int]]):
        self.nets = tuple(nets)  # (version, network int, mask int)

    def __call__(self, key: tuple[int, int] | None) -> bool:
        if key is None:
            return False
        version, value = key
        for v, net, mask in self.nets:
            if v == version and value & mask == net:
                return True
        return False


def _parse_cidr(value: str) -> tuple[int, int, int]:
    n = ipaddress.ip_network(value.strip(), strict=False)
    bits = n.max_prefixlen
    mask = ((1 << bits) - 1) ^ ((1 << (bits - n.prefixlen)) - 1)
    return (n.version, int(n.network_address), mask)


def _parse_port(value: str) -> int:
    p = int(str(value).strip(), 10)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {value} out of range 0..65535")
    return p


class _Ports:
    __slots__ = ("ports",)

    def __init__(self, ports: Iterable[int]):
        self.ports = frozenset(ports)

    def __call__(self, v: int | None) -> bool:
        return v is not None and v in self.ports


# --------------------------------------------------------------------------
# fields: how to read the attribute, how to build the matcher, HTTP-only or not

Getter = Callable[["Connection", "Request | None"], object]


def _req_attr(name: str) -> Getter:
    def get(c, r):
        return getattr(r, name) if r is not None else None
    return get


def _header_getter(header: str) -> Getter:
    header = header.lower()

    def get(c, r):
        return r.headers.get(header) if r is not None else None
    return get


_GET_PRINCIPAL: Getter = lambda c, r: c.source_principal  # noqa: E731
_GET_NAMESPACE: Getter = lambda c, r: c.source_namespace  # noqa: E731
_GET_NS_SA: Getter = lambda c, r: c._ns_sa  # noqa: E731
_GET_SRC_IP: Getter = lambda c, r: c._src  # noqa: E731
_GET_REMOTE_IP: Getter = lambda c, r: c._remote  # noqa: E731
_GET_DST_IP: Getter = lambda c, r: c._dst  # noqa: E731
_GET_DST_PORT: Getter = lambda c, r: c.destination_port  # noqa: E731
_GET_SNI: Getter = lambda c, r: c.sni  # noqa: E731
_GET_HOST = _req_attr("host")
_GET_METHOD = _req_attr("method")
_GET_PATH = _req_attr("path")


@dataclass(frozen=True, slots=True)
class _Field:
    label: str            # as written, for messages: "principals", "when[request.headers[x]]"
    getter: Getter | None  # None: nodeagent cannot evaluate it
    build: Callable[[list[str]], Callable] | None
    parse: Callable[[str], object] | None  # per value; raising ValueError = invalid value
    http_only: bool = False
    unsupported_reason: str = ""


def _strings(values):
    return _Strings(values)


def _hosts(values):
    return _Strings(values, fold=True)


def _cidrs(values):
    return _Cidrs(values)


def _ports(values):
    return _Ports(values)


def _sa_values(policy_ns: str):
    def parse(v: str) -> str:
        return v if "/" in v else f"{policy_ns}/{v}"
    return parse


_JWT_REASON = "needs JWT validation (RequestAuthentication), which nodeagent does not implement"


def _source_fields(policy_ns: str) -> dict[str, tuple[str, _Field]]:
    """Source field -> (its not-field, spec)."""
    return {
        "principals": ("not_principals", _Field("principals", _GET_PRINCIPAL, _strings, None)),
        "namespaces": ("not_namespaces", _Field("namespaces", _GET_NAMESPACE, _strings, None)),
        "service_accounts": ("not_service_accounts",
                             _Field("serviceAccounts", _GET_NS_SA, _strings, _sa_values(policy_ns))),
        "ip_blocks": ("not_ip_blocks", _Field("ipBlocks", _GET_SRC_IP, _cidrs, _parse_cidr)),
        "remote_ip_blocks": ("not_remote_ip_blocks",
                             _Field("remoteIpBlocks", _GET_REMOTE_IP, _cidrs, _parse_cidr)),
        "request_principals": ("not_request_principals",
                               _Field("requestPrincipals", None, None, None, True, _JWT_REASON)),
    }


_OPERATION_FIELDS: dict[str, tuple[str, _Field]] = {
    "hosts": ("not_hosts", _Field("hosts", _GET_HOST, _hosts, None, True)),
    "ports": ("not_ports", _Field("ports", _GET_DST_PORT, _ports, _parse_port)),
    "methods": ("not_methods", _Field("methods", _GET_METHOD, _strings, None, True)),
    "paths": ("not_paths", _Field("paths", _GET_PATH, _Paths, None, True)),
}


def _condition_field(key: str, policy_ns: str) -> _Field:
    label = f"when[{key}]"
    if key == "source.ip":
        return _Field(label, _GET_SRC_IP, _cidrs, _parse_cidr)
    if key == "remote.ip":
        return _Field(label, _GET_REMOTE_IP, _cidrs, _parse_cidr)
    if key == "source.namespace":
        return _Field(label, _GET_NAMESPACE, _strings, None)
    if key == "source.principal":
        return _Field(label, _GET_PRINCIPAL, _strings, None)
    if key == "source.serviceAccount":
        return _Field(label, _GET_NS_SA, _strings, _sa_values(policy_ns))
    if key == "destination.ip":
        return _Field(label, _GET_DST_IP, _cidrs, _parse_cidr)
    if key == "destination.port":
        return _Field(label, _GET_DST_PORT, _ports, _parse_port)
    if key == "connection.sni":
        return _Field(label, _GET_SNI, _strings, None)
    if key.startswith("request.headers"):
        name = key[len("request.headers"):]
        if len(name) > 2 and name.startswith("[") and name.endswith("]"):
            return _Field(label, _header_getter(name[1:-1]), _strings, None, True)
        return _Field(label, None, None, None, True, "expects request.headers[<name>]")
    if key.startswith("request.auth."):
        return _Field(label, None, None, None, True, _JWT_REASON)
    if key.startswith(("experimental.envoy.filters.", "request.experimental.envoy.filters.")):
        return _Field(label, None, None, None, False,
                      "reads Envoy filter metadata, which nodeagent does not have")
    return _Field(label, None, None, None, False, "is not a key Istio supports")


# --------------------------------------------------------------------------
# compiled policies


class _SkipRule(Exception):
    """An ALLOW rule that Istio drops (it can never match)."""


Pred = Callable[["Connection", "Request | None"], bool]


def _positive(get: Getter, m) -> Pred:
    return lambda c, r: m(get(c, r))


def _negative(get: Getter, m) -> Pred:
    return lambda c, r: not m(get(c, r))


def _compile_field(f: _Field, values: tuple[str, ...], not_values: tuple[str, ...], *,
                   for_tcp: bool, strict: bool, notes: list[str], where: str) -> list[Pred]:
    """Predicates for one field; Istio's checkError decides what an error does."""
    preds: list[Pred] = []
    for vals, make in ((values, _positive), (not_values, _negative)):
        if not vals:
            continue
        if f.getter is None or (for_tcp and f.http_only):
            why = f.unsupported_reason or "is HTTP-only and this is a TCP connection"
            if strict:
                raise _SkipRule(f"{where}: {f.label} {why}")
            notes.append(f"{where}: {f.label} {why}: ignored (a DENY/AUDIT/CUSTOM rule only gets wider)")
            continue
        good: list = []
        for v in vals:
            try:
                good.append(f.parse(v) if f.parse else v)
            except (ValueError, TypeError) as exc:
                if strict:
                    raise _SkipRule(f"{where}: {f.label} value {v!r} is invalid ({exc})")
                notes.append(f"{where}: {f.label} value {v!r} is invalid ({exc}): ignored")
        if good:
            preds.append(make(f.getter, f.build(good)))
    return preds


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    index: int
    whens: tuple[Pred, ...]
    froms: tuple[tuple[Pred, ...], ...]   # any of; () never happens: absent = ((),)
    tos: tuple[tuple[Pred, ...], ...]
    uses_http: bool

    def matches(self, c, r) -> bool:
        for p in self.whens:
            if not p(c, r):
                return False
        for alt in self.froms:
            for p in alt:
                if not p(c, r):
                    break
            else:
                break
        else:
            return False
        for alt in self.tos:
            for p in alt:
                if not p(c, r):
                    break
            else:
                return True
        return False


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One AuthorizationPolicy, compiled twice: for HTTP requests and for TCP connections."""
    name: str                 # "namespace/name"
    action: str
    provider: str | None
    http_rules: tuple[_CompiledRule, ...]
    tcp_rules: tuple[_CompiledRule, ...]
    uses_http: bool           # some rule reads an HTTP-only attribute nodeagent evaluates
    http_notes: tuple[str, ...]  # rules dropped / fields ignored for HTTP requests (explain, validate)
    tcp_notes: tuple[str, ...]   # the same for TCP connections
    source: str = ""          # "file:line" when known

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.http_notes + self.tcp_notes))

    def match(self, c: Connection, r: Request | None) -> int | None:
        """Index of the first matching rule, or None."""
        for rule in (self.tcp_rules if r is None else self.http_rules):
            if rule.matches(c, r):
                return rule.index
        return None


def _uses_http(rule) -> bool:
    for rt in rule.to:
        o = rt.operation
        if o and (o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths):
            return True
    return any(c.key.startswith("request.headers") for c in rule.when)


def _compile_rules(spec, policy_ns: str, action: str, *, for_tcp: bool, trust_domain: str,
                   aliases: tuple[str, ...], notes: list[str], name: str) -> tuple[_CompiledRule, ...]:
    strict = action == "ALLOW"
    src_fields = _source_fields(policy_ns)
    out: list[_CompiledRule] = []
    for i, rule in enumerate(spec.rules):
        where = f"{name} rules[{i}]" + (" (TCP)" if for_tcp else "")
        try:
            whens: list[Pred] = []
            for cond in rule.when:
                values, not_values = cond.values, cond.not_values
                if cond.key == "source.principal":
                    values = expand_trust_domain_aliases(values, trust_domain, aliases)
                    not_values = expand_trust_domain_aliases(not_values, trust_domain, aliases)
                whens += _compile_field(_condition_field(cond.key, policy_ns), tuple(values), tuple(not_values),
                                        for_tcp=for_tcp, strict=strict, notes=notes, where=where)
            froms: list[tuple[Pred, ...]] = []
            for j, rf in enumerate(rule.from_):
                preds: list[Pred] = []
                s = rf.source
                if s is not None:
                    for attr, (not_attr, f) in src_fields.items():
                        values, not_values = getattr(s, attr), getattr(s, not_attr)
                        if attr == "principals":
                            values = expand_trust_domain_aliases(values, trust_domain, aliases)
                            not_values = expand_trust_domain_aliases(not_values, trust_domain, aliases)
                        preds += _compile_field(f, tuple(values), tuple(not_values), for_tcp=for_tcp,
                                                strict=strict, notes=notes, where=f"{where}.from[{j}]")
                froms.append(tuple(preds))
            tos: list[tuple[Pred, ...]] = []
            for j, rt in enumerate(rule.to):
                preds = []
                o = rt.operation
                if o is not None:
                    for attr, (not_attr, f) in _OPERATION_FIELDS.items():
                        preds += _compile_field(f, tuple(getattr(o, attr)), tuple(getattr(o, not_attr)),
                                                for_tcp=for_tcp, strict=strict, notes=notes,
                                                where=f"{where}.to[{j}]")
                tos.append(tuple(preds))
        except _SkipRule as skip:
            notes.append(f"{skip}: ALLOW rule never matches")
            continue
        out.append(_CompiledRule(i, tuple(whens), tuple(froms) or ((),), tuple(tos) or ((),),
                                 _uses_http(rule)))
    return tuple(out)


def compile_policy(resource, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                   trust_domain_aliases: tuple[str, ...] = ()) -> CompiledPolicy:
    """Compile one AuthorizationPolicy ``Resource``."""
    spec = resource.spec
    name = f"{resource.namespace}/{resource.name}"
    action = (spec.action or "ALLOW").upper()
    http_notes: list[str] = []
    if action not in ACTIONS:
        # The loader rejects this; should one get here, it must not open anything up.
        http_notes.append(f"{name}: unknown action {action!r}: treated as DENY")
        action = "DENY"
    tcp_notes = list(http_notes)
    kw = dict(trust_domain=trust_domain, aliases=tuple(trust_domain_aliases), name=name)
    http_rules = _compile_rules(spec, resource.namespace, action, for_tcp=False, notes=http_notes, **kw)
    tcp_rules = _compile_rules(spec, resource.namespace, action, for_tcp=True, notes=tcp_notes, **kw)
    provider = spec.provider.name if spec.provider is not None else None
    src = getattr(resource, "source", None)
    return CompiledPolicy(
        name=name, action=action, provider=provider, http_rules=http_rules, tcp_rules=tcp_rules,
        uses_http=any(r.uses_http for r in http_rules), http_notes=tuple(dict.fromkeys(http_notes)),
        tcp_notes=tuple(dict.fromkeys(tcp_notes)),
        source=f"{src.file}:{src.line}" if src is not None else "")


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The compiled policies that apply to one workload, grouped by action (in resource order)."""
    custom: tuple[CompiledPolicy, ...] = ()
    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()
    needs_l7: bool = False
    skipped: tuple[str, ...] = ()     # policies that do not apply to workloads (targetRef)

    @property
    def policies(self) -> tuple[CompiledPolicy, ...]:
        """In evaluation order: CUSTOM, DENY, ALLOW, AUDIT."""
        return self.custom + self.deny + self.allow + self.audit

    def notes_for(self, http: bool) -> tuple[str, ...]:
        """What was dropped or ignored when evaluating HTTP requests (or TCP connections)."""
        return tuple(n for p in self.policies for n in (p.http_notes if http else p.tcp_notes))

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(n for p in self.policies for n in p.notes)


def _targets_something(spec) -> bool:
    return getattr(spec, "target_ref", None) is not None or bool(getattr(spec, "target_refs", ()))


def compile_policies(resources: Iterable, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                     trust_domain_aliases: tuple[str, ...] = (),
                     _cache: dict | None = None) -> PolicySet:
    """Compile the AuthorizationPolicies that apply to one workload.

    ``resources`` is what ``snapshot.authorization_policies_for(ns, labels)``
    returns. Policies with ``targetRef``/``targetRefs`` attach to a Gateway,
    waypoint or Service, never to a workload's inbound traffic (Istio: "at most
    one of selector or targetRefs can be set"; ztunnel ignores them), so they
    are skipped and listed in ``skipped``.
    """
    groups: dict[str, list[CompiledPolicy]] = {a: [] for a in ACTIONS}
    skipped: list[str] = []
    for res in resources:
        if getattr(res, "kind", "AuthorizationPolicy") != "AuthorizationPolicy":
            continue
        if _targets_something(res.spec):
            skipped.append(f"{res.namespace}/{res.name}: has targetRef(s), applies to a gateway/waypoint, "
                           f"not to workload traffic")
            continue
        key = (res.namespace, res.name, id(res))
        cp = _cache.get(key) if _cache is not None else None
        if cp is None:
            cp = compile_policy(res, trust_domain=trust_domain, trust_domain_aliases=trust_domain_aliases)
            if _cache is not None:
                _cache[key] = cp
        groups[cp.action].append(cp)
    enforcing = groups["CUSTOM"] + groups["DENY"] + groups["ALLOW"]
    return PolicySet(custom=tuple(groups["CUSTOM"]), deny=tuple(groups["DENY"]),
                     allow=tuple(groups["ALLOW"]), audit=tuple(groups["AUDIT"]),
                     needs_l7=any(p.uses_http for p in enforcing),
                     skipped=tuple(skipped))


def needs_l7(policy_set: PolicySet) -> bool:
    """True when some CUSTOM/DENY/ALLOW rule reads hosts, methods, paths or headers.

    When False, the verdict for an HTTP connection is the same for every
    request on it, so the proxy may decide once at connect
    (``evaluate(policy_set, connection)``). AUDIT policies are not counted:
    they never change a verdict.
    """
    return policy_set.needs_l7


# --------------------------------------------------------------------------
# verdicts


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str | None        # "namespace/name" of the deciding policy; None for a default
    rule_index: int | None
    reason: str
    audited: tuple[str, ...] = ()   # AUDIT policies that matched (no effect on the verdict)
    action: str | None = None       # action of the deciding policy


_ALLOW_NO_POLICY = Verdict(True, None, None, "no ALLOW policy applies to the workload: allowed")
_DENY_NO_MATCH = Verdict(False, None, None, "ALLOW policies apply to the workload and none matched: denied")


def _verdict_for(p: CompiledPolicy, idx: int) -> Verdict:
    if p.action == "CUSTOM":
        return Verdict(False, p.name, idx, f"CUSTOM provider {p.provider or '<unnamed>'} not supported: denied "
                       f"(policy {p.name} rules[{idx}] matched)", (), "CUSTOM")
    if p.action == "DENY":
        return Verdict(False, p.name, idx, f"denied by DENY policy {p.name} rules[{idx}]", (), "DENY")
    return Verdict(True, p.name, idx, f"allowed by ALLOW policy {p.name} rules[{idx}]", (), "ALLOW")


def evaluate(policy_set: PolicySet, attrs: Connection | Request) -> Verdict:
    """The verdict for a TCP connection (``Connection``) or an HTTP request (``Request``)."""
    if isinstance(attrs, Request):
        c, r = attrs.connection, attrs
    else:
        c, r = attrs, None
    audited: tuple[str, ...] = ()
    if policy_set.audit:
        audited = tuple(p.name for p in policy_set.audit if p.match(c, r) is not None)
    verdict = None
    for group in (policy_set.custom, policy_set.deny):
        for p in group:
            idx = p.match(c, r)
            if idx is not None:
                verdict = _verdict_for(p, idx)
                break
        if verdict is not None:
            break
    if verdict is None:
        if not policy_set.allow:
            verdict = _ALLOW_NO_POLICY
        else:
            for p in policy_set.allow:
                idx = p.match(c, r)
                if idx is not None:
                    verdict = _verdict_for(p, idx)
                    break
            else:
                verdict = _DENY_NO_MATCH
    if audited:
        return Verdict(verdict.allowed, verdict.policy, verdict.rule_index, verdict.reason, audited,
                       verdict.action)
    return verdict


# --------------------------------------------------------------------------
# per-workload cache over one snapshot


class AuthorizationIndex:
    """Compiled policy sets for the workloads of one snapshot, built lazily and cached.

    Build one per snapshot (it is immutable, so is this); the proxy calls
    ``for_workload(namespace, labels)`` on each accepted connection.
    """

    def __init__(self, snapshot, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 trust_domain_aliases: tuple[str, ...] = ()):
        self._snapshot = snapshot
        self._td = trust_domain
        self._aliases = tuple(trust_domain_aliases)
        self._by_workload: dict[tuple, PolicySet] = {}
        self._compiled: dict = {}

    def for_workload(self, namespace: str, labels: Mapping[str, str]) -> PolicySet:
        key = (namespace, frozenset(labels.items()))
        ps = self._by_workload.get(key)
        if ps is None:
            resources = self._snapshot.authorization_policies_for(namespace, labels)
            ps = compile_policies(resources, trust_domain=self._td, trust_domain_aliases=self._aliases,
                                  _cache=self._compiled)
            self._by_workload[key] = ps
        return ps


def unsupported_field_warnings(spec, path: str = "spec") -> list[tuple[str, str]]:
    """(field path, message) warnings for what nodeagent enforces fail-closed.

    For the validator: ``for p, msg in unsupported_field_warnings(ap, path): ctx.warn(p, msg)``
    gives e.g. ``policy.yaml:12: warning: AuthorizationPolicy foo/x:
    spec.rules[0].from[0].source.requestPrincipals: nodeagent does not validate JWTs
    (no RequestAuthentication); in this ALLOW policy the rule never matches``.
    """
    action = (spec.action or "ALLOW").upper()
    effect = ("in this ALLOW policy the rule never matches" if action == "ALLOW"
              else f"in this {action} policy the condition is treated as matching (the rule applies more widely)")
    out: list[tuple[str, str]] = []
    for i, rule in enumerate(spec.rules):
        for j, rf in enumerate(rule.from_):
            s = rf.source
            if s is None:
                continue
            for attr, label in (("request_principals", "requestPrincipals"),
                                ("not_request_principals", "notRequestPrincipals")):
                if getattr(s, attr):
                    out.append((f"{path}.rules[{i}].from[{j}].source.{label}",
                                f"nodeagent does not validate JWTs (no RequestAuthentication); {effect}"))
        for j, cond in enumerate(rule.when):
            f = _condition_field(cond.key, "")
            if f.getter is None:
                out.append((f"{path}.rules[{i}].when[{j}].key", f"{cond.key} {f.unsupported_reason}; {effect}"))
    if action == "CUSTOM":
        name = spec.provider.name if spec.provider is not None else "<unnamed>"
        out.append((f"{path}.action", f"CUSTOM provider {name} not supported: nodeagent has no external "
                                      f"authorizer, so requests matching a rule are denied"))
    return out
