"""policy.cors: Envoy's CORS filter decisions for Istio's corsPolicy, table-driven."""
from __future__ import annotations

import pytest

from policy.cors import compile_cors, origin_allowed, preflight, response_headers
from policy.model import CorsPolicy, StringMatch


def policy(**kw) -> CorsPolicy:
    return CorsPolicy(**kw)


EXACT = (StringMatch("exact", "https://app.example.com"),)
PREFIX = (StringMatch("prefix", "https://dev."),)
REGEX = (StringMatch("regex", r"https://[a-z]+\.example\.org"),)


@pytest.mark.parametrize("origins, legacy, origin, allowed", [
    (EXACT, (), "https://app.example.com", True),
    (EXACT, (), "https://app.example.com.evil", False),
    (EXACT, (), "http://app.example.com", False),
    (PREFIX, (), "https://dev.anything", True),
    (PREFIX, (), "https://prod.anything", False),
    (REGEX, (), "https://shop.example.org", True),
    (REGEX, (), "https://shop.example.org:8443", False),   # full match, as Envoy's safe_regex
    (REGEX, (), "https://SHOP.example.org", False),
    ((), ("https://legacy.example.com",), "https://legacy.example.com", True),   # allowOrigin: exact
    ((), ("https://legacy.example.com",), "https://legacy.example.co", False),
    ((StringMatch("exact", "*"),), (), "https://whatever.test", True),            # matches "*": any origin
    ((StringMatch("regex", ".*"),), (), "null", True),
    ((StringMatch("prefix", "*"),), (), "https://x", True),
    ((), (), "https://app.example.com", False),                                 # no origin configured
    (EXACT + REGEX, (), "https://b.example.org", True),                         # any entry may match
])
def test_origin_matching(origins, legacy, origin, allowed):
    cfg = compile_cors(policy(allow_origins=origins, allow_origin=legacy))
    assert origin_allowed(cfg, origin) is allowed


def test_allow_origins_wins_over_deprecated_allow_origin():
    cfg = compile_cors(policy(allow_origins=EXACT, allow_origin=("https://legacy.example.com",)))
    assert origin_allowed(cfg, "https://app.example.com")
    assert not origin_allowed(cfg, "https://legacy.example.com")


def test_no_policy_compiles_to_none():
    assert compile_cors(None) is None


FULL = policy(allow_origins=EXACT, allow_methods=("GET", "POST"), allow_headers=("x-a", "x-b"),
              expose_headers=("x-exp", "x-two"), max_age=86400.0, allow_credentials=True)
GOOD = "https://app.example.com"
BAD = "https://evil.example.com"


def hdrs(**kw) -> dict:
    return {k.replace("_", "-"): v for k, v in kw.items()}


@pytest.mark.parametrize("pol, method, headers, expected", [
    # an allowed origin's preflight: answered with every configured header
    (FULL, "OPTIONS", hdrs(origin=GOOD, access_control_request_method="PUT"),
     (("access-control-allow-origin", GOOD), ("access-control-allow-credentials", "true"),
      ("access-control-allow-methods", "GET,POST"), ("access-control-allow-headers", "x-a,x-b"),
      ("access-control-max-age", "86400"))),
    # not preflights: forwarded
    (FULL, "OPTIONS", hdrs(origin=GOOD), None),
    (FULL, "OPTIONS", hdrs(origin=GOOD, access_control_request_method=""), None),
    (FULL, "GET", hdrs(origin=GOOD, access_control_request_method="PUT"), None),
    (FULL, "OPTIONS", hdrs(access_control_request_method="PUT"), None),
    (FULL, "OPTIONS", hdrs(origin="", access_control_request_method="PUT"), None),
    # a disallowed origin's preflight is forwarded by default (FORWARD / unset)
    (FULL, "OPTIONS", hdrs(origin=BAD, access_control_request_method="PUT"), None),
    (policy(allow_origins=EXACT, unmatched_preflights="FORWARD"), "OPTIONS",
     hdrs(origin=BAD, access_control_request_method="PUT"), None),
    # IGNORE: answered locally, without allow-origin (the rest as configured)
    (policy(allow_origins=EXACT, allow_methods=("GET",), unmatched_preflights="IGNORE"), "OPTIONS",
     hdrs(origin=BAD, access_control_request_method="PUT"), (("access-control-allow-methods", "GET"),)),
    (policy(allow_origins=EXACT, unmatched_preflights="IGNORE"), "OPTIONS",
     hdrs(origin=BAD, access_control_request_method="PUT"), ()),
    # nothing else configured: only allow-origin
    (policy(allow_origins=EXACT), "OPTIONS", hdrs(origin=GOOD, access_control_request_method="DELETE"),
     (("access-control-allow-origin", GOOD),)),
    # "*" methods / headers echo what the browser asked for
    (policy(allow_origins=EXACT, allow_methods=("*",), allow_headers=("*",)), "OPTIONS",
     hdrs(origin=GOOD, access_control_request_method="PATCH", access_control_request_headers="x-q, x-r"),
     (("access-control-allow-origin", GOOD), ("access-control-allow-methods", "PATCH"),
      ("access-control-allow-headers", "x-q, x-r"))),
    # maxAge 0s is still sent ("0"); allowCredentials false is not
    (policy(allow_origins=EXACT, max_age=0.0, allow_credentials=False), "OPTIONS",
     hdrs(origin=GOOD, access_control_request_method="GET"),
     (("access-control-allow-origin", GOOD), ("access-control-max-age", "0"))),
])
def test_preflight(pol, method, headers, expected):
    assert preflight(compile_cors(pol), method, headers) == expected


@pytest.mark.parametrize("pol, origin, expected", [
    (FULL, GOOD, (("access-control-allow-origin", GOOD), ("access-control-allow-credentials", "true"),
                  ("access-control-expose-headers", "x-exp,x-two"))),
    (FULL, BAD, ()),
    (FULL, None, ()),
    (FULL, "", ()),
    (policy(allow_origins=EXACT), GOOD, (("access-control-allow-origin", GOOD),)),
    (policy(allow_origins=(StringMatch("exact", "*"),)), "https://x.test",
     (("access-control-allow-origin", "https://x.test"),)),   # the origin is echoed, never "*"
])
def test_response_headers(pol, origin, expected):
    assert response_headers(compile_cors(pol), origin) == expected


def test_unknown_match_kind_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="allowOrigins"):
        compile_cors(policy(allow_origins=(StringMatch("present", ""),)))


def test_routes_compile_their_cors_policy_and_are_never_static():
    import random

    from policy.loader import load_text
    from policy.routing import RequestAttrs, is_static, plan_request, route_table
    from policy.snapshot import build_snapshot

    text = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /api}}]
    corsPolicy:
      allowOrigin: [https://legacy.test]
      allowMethods: [GET]
      maxAge: 90s
      unmatchedPreflights: IGNORE
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
"""
    loaded = load_text(text, "cors.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    snap = build_snapshot(loaded.resources)

    def plan(path):
        return plan_request(snap, RequestAttrs("GET", "http", "web.default.svc.cluster.local", path, {}, 80, None),
                            random.Random(1))

    cfg = plan("/api/x").cors
    assert cfg is not None and origin_allowed(cfg, "https://legacy.test")
    assert (cfg.allow_methods, cfg.max_age, cfg.forward_not_matching_preflights) == ("GET", "90", False)
    assert plan("/other").cors is None
    table = route_table(snap, snap.services["web.default.svc.cluster.local"], 80, "default")
    assert not is_static(table[0], table[0].destinations[0])
    assert is_static(table[1], table[1].destinations[0])
