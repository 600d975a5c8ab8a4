"""VirtualService ``corsPolicy`` as Envoy's CORS filter applies it (pure decisions).

Istio translates a route's ``corsPolicy`` into Envoy's route-level CorsPolicy:
``allowOrigins`` (StringMatch exact / prefix / regex; the deprecated
``allowOrigin`` strings become exact matches) -> ``allow_origin_string_match``;
``allowMethods``, ``allowHeaders`` and ``exposeHeaders`` are joined with ","; ``maxAge``
becomes whole seconds as a string; ``allowCredentials`` as is;
``unmatchedPreflights: IGNORE`` sets ``forward_not_matching_preflights: false``
(``FORWARD`` and unset forward them, Envoy's default).

Envoy's filter (``cors_filter.cc``), per request on a route that has a policy:

- no ``Origin`` header (or an empty one): nothing happens;
- the origin is allowed when some matcher matches the origin, or matches the
  literal ``*`` (so ``exact: "*"`` or ``regex: ".*"`` allow every origin);
- a preflight is ``OPTIONS`` with ``Origin`` and a non-empty
  ``Access-Control-Request-Method``. Allowed origin: answered locally, 200, with
  ``access-control-allow-origin`` (the request's origin), ``-allow-credentials:
  true`` when set, ``-allow-methods`` (``*`` echoes the requested method),
  ``-allow-headers`` (``*`` echoes ``Access-Control-Request-Headers``) and
  ``-max-age`` when configured; it never reaches the upstream. Origin not
  allowed: forwarded upstream unless ``unmatchedPreflights: IGNORE``, in which
  case it is answered locally the same way but without ``allow-origin``;
- any other request with an allowed origin is forwarded, and its response gets
  ``access-control-allow-origin`` (the origin), ``-allow-credentials: true`` when
  set and ``-expose-headers`` when configured, replacing what the upstream sent
  under those names. A disallowed origin's response is left alone.

Everything a policy implies is computed once by ``compile_cors`` (per compiled
route); the functions below only read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ALLOW_ORIGIN = "access-control-allow-origin"
ALLOW_CREDENTIALS = "access-control-allow-credentials"
ALLOW_METHODS = "access-control-allow-methods"
ALLOW_HEADERS = "access-control-allow-headers"
MAX_AGE = "access-control-max-age"
EXPOSE_HEADERS = "access-control-expose-headers"

# The response headers the filter sets (replacing the upstream's) on an actual request.
RESPONSE_HEADER_NAMES = frozenset({ALLOW_ORIGIN, ALLOW_CREDENTIALS, EXPOSE_HEADERS})


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """One route's compiled CORS policy (Envoy's view of it)."""
    origin_tests: tuple[Callable[[str], bool], ...]
    any_origin: bool               # some matcher matches the literal "*"
    allow_methods: str             # joined with ",", "" when unset
    allow_headers: str
    expose_headers: str
    max_age: str                   # whole seconds, "" when unset
    allow_credentials: bool
    forward_not_matching_preflights: bool


def _matcher(sm) -> Callable[[str], bool]:
    # Imported here: policy.routing imports this module for its compiled routes.
    from policy.routing import re2_fullmatch

    kind, value = sm.kind, sm.value
    if kind == "exact":
        return value.__eq__
    if kind == "prefix":
        return lambda s: s.startswith(value)
    if kind == "regex":
        return re2_fullmatch(value)
    raise ValueError(f"corsPolicy.allowOrigins: unsupported match kind {kind!r} (use exact, prefix or regex)")


def compile_cors(policy) -> CorsConfig | None:
    """The ``CorsConfig`` of a model ``CorsPolicy`` (None for None)."""
    if policy is None:
        return None
    if policy.allow_origins:
        tests = tuple(_matcher(sm) for sm in policy.allow_origins)
    else:
        tests = tuple(o.__eq__ for o in policy.allow_origin)  # deprecated exact strings
    return CorsConfig(
        origin_tests=tests,
        any_origin=any(t("*") for t in tests),
        allow_methods=",".join(policy.allow_methods),
        allow_headers=",".join(policy.allow_headers),
        expose_headers=",".join(policy.expose_headers),
        max_age="" if policy.max_age is None else str(int(policy.max_age)),
        allow_credentials=bool(policy.allow_credentials),
        forward_not_matching_preflights=policy.unmatched_preflights != "IGNORE",
    )


def origin_allowed(cfg: CorsConfig, origin: str) -> bool:
    if cfg.any_origin:
        return True
    for test in cfg.origin_tests:
        if test(origin):
            return True
    return False


def preflight(cfg: CorsConfig, method: str, headers) -> tuple[tuple[str, str], ...] | None:
    """The headers of the local 200 answer to a preflight, or None when the request
    goes on (not a preflight, or a disallowed origin's preflight that is forwarded).
    ``headers`` is a lower-case-keyed mapping of the request headers."""
    if method != "OPTIONS":
        return None
    origin = headers.get("origin")
    if not origin:
        return None
    requested = headers.get("access-control-request-method")
    if not requested:
        return None
    allowed = origin_allowed(cfg, origin)
    if not allowed and cfg.forward_not_matching_preflights:
        return None
    out = []
    if allowed:
        out.append((ALLOW_ORIGIN, origin))
    if cfg.allow_credentials:
        out.append((ALLOW_CREDENTIALS, "true"))
    if cfg.allow_methods:
        out.append((ALLOW_METHODS, requested if cfg.allow_methods == "*" else cfg.allow_methods))
    if cfg.allow_headers:
        out.append((ALLOW_HEADERS, headers.get("access-control-request-headers", "")
                    if cfg.allow_headers == "*" else cfg.allow_headers))
    if cfg.max_age:
        out.append((MAX_AGE, cfg.max_age))
    return tuple(out)


def response_headers(cfg: CorsConfig, origin: str | None) -> tuple[tuple[str, str], ...]:
    """The headers to set on the response of a forwarded request whose ``Origin`` is
    ``origin`` (None or "" when it has none): empty unless the origin is allowed.
    They replace any the upstream sent under the same names (``RESPONSE_HEADER_NAMES``)."""
    if not origin or not origin_allowed(cfg, origin):
        return ()
    out = [(ALLOW_ORIGIN, origin)]
    if cfg.allow_credentials:
        out.append((ALLOW_CREDENTIALS, "true"))
    if cfg.expose_headers:
        out.append((EXPOSE_HEADERS, cfg.expose_headers))
    return tuple(out)
