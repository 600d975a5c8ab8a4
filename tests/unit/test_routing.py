"""Route planning: VirtualService matching, destinations, rewrites, redirects,
header ops, faults, mirrors, timeouts and retries (Istio/Envoy semantics)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from policy.cluster import ClusterKey
from policy.loader import load_text
from policy.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from policy.routing import (HeaderOps, Reject, RequestAttrs, RoutePlan, plan_for_service, plan_request,
                            route_table)
from policy.snapshot import WorkloadRef, build_snapshot

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: multi, namespace: default}
spec:
  hosts: [multi.default.svc.cluster.local]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 8080, name: http-alt, protocol: HTTP}
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.2.1}]
"""

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
MULTI = "multi.default.svc.cluster.local"
PRODUCTPAGE = WorkloadRef(name="productpage-v1", namespace="default", service_account="bookinfo-productpage",
                          labels={"app": "productpage", "version": "v1"}, address="10.0.9.1")


def snapshot(*docs: str):
    loaded = load_text("\n---\n".join((SERVICES,) + docs), "test.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    return build_snapshot(loaded.resources)


def vs(http: str, host: str = "reviews", extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs-{host}, namespace: default}}
spec:
  hosts: [{host}]
{extra}  http:
{http}"""


def req(path: str = "/", *, method: str = "GET", headers: dict | None = None, authority: str = "reviews:9080",
        port: int = 9080, source: WorkloadRef | None = PRODUCTPAGE, scheme: str = "http") -> RequestAttrs:
    return RequestAttrs(method, scheme, authority, path, headers or {}, port, source)


def plan(snap, r: RequestAttrs, seed: int = 0):
    return plan_request(snap, r, random.Random(seed))


def route_name(snap, r: RequestAttrs):
    p = plan(snap, r)
    return p.route_name if isinstance(p, RoutePlan) else p


# -- defaults -----------------------------------------------------------------------

def test_no_virtual_service_routes_to_the_service_itself():
    p = plan(snapshot(), req("/reviews/1"))
    assert isinstance(p, RoutePlan)
    assert p.cluster == ClusterKey(REVIEWS, None, 9080)
    assert p.route_name == "default" and p.virtual_service is None
    assert p.timeout is None and p.retry == DEFAULT_RETRY_POLICY
    assert (p.path, p.authority) == ("/reviews/1", "reviews:9080")
    assert p.fault_delay is None and p.fault_abort is None and p.mirrors == ()
    assert not p.request_headers and not p.response_headers


def test_default_route_preserves_the_request_port():
    p = plan(snapshot(), req(authority="multi", port=8080))
    assert p.cluster == ClusterKey(MULTI, None, 8080)


def test_unknown_host_is_no_route():
    assert plan(snapshot(), req(authority="nosuch:9080")) == Reject(404, "NR")


def test_virtual_service_without_a_matching_rule_is_no_route():
    snap = snapshot(vs("""  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: reviews}}]"""))
    assert plan(snap, req("/other")) == Reject(404, "NR")
    assert isinstance(plan(snap, req("/api/x")), RoutePlan)


def test_host_forms_resolve_relative_to_the_source_namespace():
    snap = snapshot()
    for authority in ("reviews", "reviews:9080", "reviews.default", "reviews.default.svc",
                      REVIEWS, f"{REVIEWS}:9080", "Reviews.Default.SVC.cluster.local."):
        assert plan(snap, req(authority=authority)).cluster.host == REVIEWS, authority
    other_ns = WorkloadRef("x", "other", "x", {}, "10.9.9.9")
    assert plan(snap, req(authority="reviews", source=other_ns)) == Reject(404, "NR")
    assert plan(snap, req(authority="reviews.default", source=other_ns)).cluster.host == REVIEWS


def test_plan_for_service_skips_host_resolution():
    snap = snapshot()
    svc = snap.services[REVIEWS]
    p = plan_for_service(snap, svc, 9080, req(authority="10.0.0.1:9080"), random.Random(0))
    assert p.cluster == ClusterKey(REVIEWS, None, 9080)


# -- first match wins, OR / AND ------------------------------------------------------

TWO_RULES = """  - name: first
    match: [{uri: {prefix: /a}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: second
    match: [{uri: {prefix: /a/b}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: rest
    route: [{destination: {host: reviews, subset: v3}}]"""


def test_first_matching_rule_wins():
    snap = snapshot(vs(TWO_RULES))
    assert route_name(snap, req("/a/b/c")) == "first"
    assert route_name(snap, req("/zzz")) == "rest"


def test_match_list_is_or_and_fields_are_and():
    snap = snapshot(vs("""  - name: m
    match:
    - {uri: {prefix: /x}, method: {exact: POST}}
    - {headers: {end-user: {exact: jason}}}
    route: [{destination: {host: reviews}}]
  - name: rest
    route: [{destination: {host: reviews}}]"""))
    assert route_name(snap, req("/x", method="POST")) == "m"
    assert route_name(snap, req("/x", method="GET")) == "rest"          # AND fails
    assert route_name(snap, req("/y", headers={"end-user": "jason"})) == "m"   # second entry


# -- every match field ---------------------------------------------------------------

def matches(match_yaml: str, r: RequestAttrs, host: str = "reviews") -> bool:
    snap = snapshot(vs(f"""  - name: hit
    match: [{match_yaml}]
    route: [{{destination: {{host: {host}}}}}]
  - name: miss
    route: [{{destination: {{host: {host}}}}}]""", host=host))
    return route_name(snap, r) == "hit"


@pytest.mark.parametrize("m,path,expected", [
    ("{uri: {exact: /a}}", "/a", True),
    ("{uri: {exact: /a}}", "/a?x=1", True),           # query is not part of the path
    ("{uri: {exact: /a}}", "/a/", False),
    ("{uri: {exact: /a}}", "/A", False),
    ("{uri: {exact: /a}, ignoreUriCase: true}", "/A", True),
    ("{uri: {prefix: /api}}", "/api/v1", True),
    ("{uri: {prefix: /api}}", "/ap", False),
    ("{uri: {prefix: /api}, ignoreUriCase: true}", "/API/v1", True),
    ("{uri: {regex: '/api/v[0-9]+'}}", "/api/v12", True),
    ("{uri: {regex: '/api/v[0-9]+'}}", "/api/v12/x", False),     # full match
    ("{uri: {regex: '/API'}, ignoreUriCase: true}", "/api", False),   # case only for exact/prefix
    ("{uri: {prefix: /a}}", "/b#/a", False),
])
def test_uri(m, path, expected):
    assert matches(m, req(path)) is expected


@pytest.mark.parametrize("m,r,expected", [
    ("{scheme: {exact: https}}", req(scheme="https"), True),
    ("{scheme: {exact: https}}", req(scheme="http"), False),
    ("{method: {exact: POST}}", req(method="POST"), True),
    ("{method: {regex: 'GET|HEAD'}}", req(method="HEAD"), True),
    ("{method: {regex: 'GET|HEAD'}}", req(method="PUT"), False),
    ("{authority: {exact: 'reviews:9080'}}", req(authority="reviews:9080"), True),
    ("{authority: {prefix: reviews.default}}", req(authority="reviews:9080"), False),
    ("{authority: {prefix: reviews.default}}", req(authority="reviews.default:9080"), True),
    ("{port: 9080}", req(), True),
    ("{port: 9999}", req(), False),
])
def test_scheme_method_authority_port(m, r, expected):
    assert matches(m, r) is expected


@pytest.mark.parametrize("m,headers,expected", [
    ("{headers: {end-user: {exact: jason}}}", {"end-user": "jason"}, True),
    ("{headers: {end-user: {exact: jason}}}", {"end-user": "Jason"}, False),
    ("{headers: {end-user: {exact: jason}}}", {}, False),
    ("{headers: {x-v: {prefix: v2}}}", {"x-v": "v2.1"}, True),
    ("{headers: {x-v: {regex: 'v[0-9]'}}}", {"x-v": "v7"}, True),
    ("{headers: {x-v: {regex: 'v[0-9]'}}}", {"x-v": "v77"}, False),
    ("{headers: {x-v: {}}}", {"x-v": ""}, True),                 # {} = present
    ("{headers: {x-v: {}}}", {}, False),
    ("{headers: {End-User: {exact: jason}}}", {"end-user": "jason"}, True),
    ("{headers: {a: {exact: '1'}, b: {exact: '2'}}}", {"a": "1", "b": "2"}, True),
    ("{headers: {a: {exact: '1'}, b: {exact: '2'}}}", {"a": "1"}, False),
    ("{withoutHeaders: {x-debug: {}}}", {}, True),                # {} = absent
    ("{withoutHeaders: {x-debug: {}}}", {"x-debug": "1"}, False),
    ("{withoutHeaders: {x-v: {exact: v1}}}", {"x-v": "v2"}, True),
    ("{withoutHeaders: {x-v: {exact: v1}}}", {"x-v": "v1"}, False),
    ("{withoutHeaders: {x-v: {exact: v1}}}", {}, True),           # missing passes a negated match
])
def test_headers_and_without_headers(m, headers, expected):
    assert matches(m, req(headers=headers)) is expected


@pytest.mark.parametrize("m,path,expected", [
    ("{queryParams: {u: {exact: bob}}}", "/?u=bob", True),
    ("{queryParams: {u: {exact: bob}}}", "/?a=1&u=bob", True),
    ("{queryParams: {u: {exact: bob}}}", "/?u=bobby", False),
    ("{queryParams: {u: {exact: bob}}}", "/", False),
    ("{queryParams: {u: {exact: 'a b'}}}", "/?u=a%20b", True),
    ("{queryParams: {u: {regex: 'b.b'}}}", "/?u=bob", True),
    ("{queryParams: {u: {regex: 'b.b'}}}", "/?u=bobo", False),
    ("{queryParams: {u: {}}}", "/?u=", True),
    ("{queryParams: {u: {}}}", "/?v=1", False),
])
def test_query_params(m, path, expected):
    assert matches(m, req(path)) is expected


@pytest.mark.parametrize("m,source,expected", [
    ("{sourceLabels: {app: productpage}}", PRODUCTPAGE, True),
    ("{sourceLabels: {app: productpage, version: v2}}", PRODUCTPAGE, False),
    ("{sourceLabels: {app: productpage}}", None, False),
    ("{sourceNamespace: default}", PRODUCTPAGE, True),
    ("{sourceNamespace: prod}", PRODUCTPAGE, False),
    ("{sourceNamespace: default}", None, False),
])
def test_source_labels_and_namespace(m, source, expected):
    r = req(authority=REVIEWS, source=source)
    assert matches(m, r) is expected


def test_match_for_gateways_only_never_matches_mesh_traffic():
    assert not matches("{gateways: [bookinfo-gateway], uri: {prefix: /}}", req())
    assert matches("{gateways: [mesh], uri: {prefix: /}}", req())


def test_virtual_service_bound_to_gateways_only_is_ignored():
    snap = snapshot(vs("""  - route: [{destination: {host: reviews, subset: v2}}]""",
                       extra="  gateways: [bookinfo-gateway]\n"))
    p = plan(snap, req())
    assert p.virtual_service is None and p.cluster.subset is None


# -- destinations ---------------------------------------------------------------------

def test_subset_and_explicit_port():
    snap = snapshot(vs("""  - route: [{destination: {host: multi, subset: v1, port: {number: 8080}}}]""", host="multi"))
    p = plan(snap, req(authority="multi", port=80))
    assert p == Reject(503, "NC")          # no DestinationRule defines multi's subset v1
    snap = snapshot(vs("""  - route: [{destination: {host: multi, port: {number: 8080}}}]""", host="multi"))
    assert plan(snap, req(authority="multi", port=80)).cluster == ClusterKey(MULTI, None, 8080)


def test_destination_port_defaults():
    snap = snapshot(vs("""  - route: [{destination: {host: ratings}}]"""),     # reviews -> ratings (one port)
                    vs("""  - route: [{destination: {host: reviews}}]""", host="multi"))
    assert plan(snap, req()).cluster == ClusterKey(RATINGS, None, 9080)
    # multi-port source service, single-port destination: the destination's only port
    assert plan(snap, req(authority="multi", port=8080)).cluster == ClusterKey(REVIEWS, None, 9080)


def test_multi_port_destination_uses_the_request_port():
    snap = snapshot(vs("""  - route: [{destination: {host: multi}}]""", host="multi"))
    assert plan(snap, req(authority="multi", port=8080)).cluster == ClusterKey(MULTI, None, 8080)
    assert plan(snap, req(authority="multi", port=80)).cluster == ClusterKey(MULTI, None, 80)


def test_unknown_destination_or_subset_is_no_cluster():
    snap = snapshot(vs("""  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: nosuch}}]
  - route: [{destination: {host: reviews, subset: v9}}]"""))
    assert plan(snap, req("/a")) == Reject(503, "NC")
    assert plan(snap, req("/b")) == Reject(503, "NC")


def test_destinations_are_listed_with_weights():
    snap = snapshot(vs("""  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}"""))
    p = plan(snap, req())
    assert [(d.cluster.subset, d.weight) for d in p.destinations] == [("v1", 80), ("v2", 20)]


# -- rewrite -------------------------------------------------------------------------

@pytest.mark.parametrize("m,rewrite,path,expected", [
    ("{uri: {prefix: /api/v1}}", "{uri: /v2}", "/api/v1/items?x=1", "/v2/items?x=1"),
    ("{uri: {prefix: /api}, ignoreUriCase: true}", "{uri: /x}", "/API/items", "/x/items"),
    ("{uri: {exact: /old}}", "{uri: /new}", "/old?q=1", "/new?q=1"),
    ("{uri: {regex: '/old/[0-9]+'}}", "{uri: /new}", "/old/42", "/new"),
    ("{method: {exact: GET}}", "{uri: /v2}", "/items", "/v2items"),        # Envoy's catch-all prefix "/"
    ("{uri: {prefix: /}}", "{uriRegexRewrite: {match: '^/svc/([^/]+)/(.*)$', rewrite: '/\\2/\\1'}}",
     "/svc/a/b/c?k=v", "/b/c/a?k=v"),
])
def test_path_rewrite(m, rewrite, path, expected):
    snap = snapshot(vs(f"""  - match: [{m}]
    rewrite: {rewrite}
    route: [{{destination: {{host: reviews}}}}]"""))
    assert plan(snap, req(path)).path == expected


def test_rewrite_uses_the_match_entry_that_matched():
    snap = snapshot(vs("""  - match: [{uri: {prefix: /one}}, {uri: {prefix: /second}}]
    rewrite: {uri: /x}
    route: [{destination: {host: reviews}}]"""))
    assert plan(snap, req("/one/a")).path == "/x/a"
    assert plan(snap, req("/second/a")).path == "/x/a"


def test_authority_rewrite():
    snap = snapshot(vs("""  - rewrite: {authority: reviews.internal}
    route: [{destination: {host: reviews}}]"""))
    p = plan(snap, req("/p"))
    assert (p.authority, p.path) == ("reviews.internal", "/p")


# -- redirect / direct response --------------------------------------------------------

@pytest.mark.parametrize("redirect,path,status,location", [
    ("{uri: /new}", "/old?a=1", 301, "http://reviews:9080/new?a=1"),
    ("{uri: '/new?b=2'}", "/old?a=1", 301, "http://reviews:9080/new?b=2"),
    ("{authority: example.com, redirectCode: 302}", "/p", 302, "http://example.com/p"),
    ("{scheme: https, port: 8443}", "/p", 301, "https://reviews:8443/p"),
    ("{scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}", "/p", 301, "https://reviews/p"),
    ("{authority: other, derivePort: FROM_REQUEST_PORT}", "/p", 301, "http://other:9080/p"),
])
def test_redirect(redirect, path, status, location):
    snap = snapshot(vs(f"""  - redirect: {redirect}"""))
    assert plan(snap, req(path)) == Reject(status, "", (("location", location),))


def test_direct_response():
    snap = snapshot(vs("""  - directResponse: {status: 418, body: {string: "short and stout"}}"""))
    assert plan(snap, req()) == Reject(418, "", (("content-type", "text/plain"),), b"short and stout")


# -- header operations --------------------------------------------------------------------

HEADERS = """  - headers:
      request:
        set: {x-route: r, x-both: route}
        add: {x-added: a}
        remove: [x-secret, x-dest]
      response:
        set: {x-resp: r}
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        request: {set: {x-dest: d, x-both: dest}, remove: [x-route-only]}
        response: {add: {x-resp-dest: d}}
%s"""

SECOND = """      weight: 50
    - destination: {host: reviews, subset: v1}
      weight: 50
      headers:
        request: {set: {x-dest: d, x-both: dest}, remove: [x-route-only]}
        response: {add: {x-resp-dest: d}}"""


def test_single_destination_ops_join_the_route_level_after_the_route_ones():
    # Istio appends a single destination's ops to the route's lists: all removes
    # first, then the route's set/add, then the destination's (which wins a set)
    p = plan(snapshot(vs(HEADERS % "")), req())
    h = {"x-secret": "s", "x-added": "old", "x-route-only": "z", "x-dest": "old", "keep": "k"}
    p.request_headers.apply(h)
    assert h == {"keep": "k", "x-route": "r", "x-both": "dest", "x-added": "old, a", "x-dest": "d"}
    resp = {}
    p.response_headers.apply(resp)
    assert resp == {"x-resp": "r", "x-resp-dest": "d"}


def test_weighted_destination_ops_run_first_and_the_route_level_wins():
    p = plan(snapshot(vs(HEADERS % SECOND)), req())
    h = {"x-secret": "s", "x-route-only": "z"}
    p.request_headers.apply(h)
    # the route level removes x-dest after the destination level set it
    assert h == {"x-both": "route", "x-route": "r", "x-added": "a"}


def test_header_ops_on_pairs_keep_multiple_values():
    ops = plan(snapshot(vs(HEADERS % "")), req()).request_headers
    out = ops.apply_pairs([("X-Added", "1"), ("X-Secret", "s"), ("Host", "h")])
    assert out == [("X-Added", "1"), ("Host", "h"), ("x-route", "r"), ("x-added", "a"),
                   ("x-dest", "d"), ("x-both", "dest")]


def test_header_ops_views():
    ops = plan(snapshot(vs(HEADERS % "")), req()).request_headers
    assert ops.set == {"x-dest": "d", "x-both": "dest", "x-route": "r"}
    assert ops.add == {"x-added": "a"} and ops.remove == ("x-secret", "x-dest", "x-route-only")
    assert HeaderOps() == HeaderOps(()) and not HeaderOps()


def test_setting_host_is_a_host_rewrite_and_pseudo_headers_are_not_removed():
    snap = snapshot(vs("""  - headers:
      request: {set: {host: api.internal, x-a: "1"}, remove: [host, x-b]}
    route: [{destination: {host: reviews}}]"""))
    p = plan(snap, req())
    assert p.authority == "api.internal"
    assert p.request_headers.ops == ((0, "x-b", ""), (1, "x-a", "1"))
    snap = snapshot(vs("""  - route:
    - destination: {host: reviews, subset: v1}
      headers: {request: {set: {Host: v1.internal}}}
      weight: 100
    - destination: {host: reviews, subset: v2}
      weight: 0"""))
    assert plan(snap, req()).authority == "v1.internal"


# -- faults ---------------------------------------------------------------------------------

def fault_snapshot(fault: str):
    return snapshot(vs(f"""  - fault: {fault}
    route: [{{destination: {{host: reviews}}}}]"""))


def test_fault_delay_and_abort_always():
    snap = fault_snapshot("{delay: {fixedDelay: 7s, percentage: {value: 100}}, "
                          "abort: {httpStatus: 500, percentage: {value: 100}}}")
    p = plan(snap, req())
    assert (p.fault_delay, p.fault_abort, p.fault_grpc_status) == (7.0, 500, None)


def test_fault_without_percentage_injects_nothing():
    # Istio: "If left unspecified, no request will be delayed" / "... aborted"
    snap = fault_snapshot("{delay: {fixedDelay: 7s}, abort: {httpStatus: 500}}")
    r = random.Random(0)
    for _ in range(100):
        p = plan_request(snap, req(), r)
        assert p.fault_delay is None and p.fault_abort is None


def test_legacy_integer_delay_percent():
    snap = fault_snapshot("{delay: {fixedDelay: 1s, percent: 100}}")
    assert plan(snap, req()).fault_delay == 1.0


def test_fault_zero_percent_never():
    snap = fault_snapshot("{delay: {fixedDelay: 1s, percentage: {value: 0}}, "
                          "abort: {httpStatus: 503, percentage: {value: 0}}}")
    r = random.Random(1)
    for _ in range(200):
        p = plan_request(snap, req(), r)
        assert p.fault_delay is None and p.fault_abort is None


def test_fault_percentages_are_rolled_per_request():
    snap = fault_snapshot("{delay: {fixedDelay: 2s, percentage: {value: 25}}, "
                          "abort: {httpStatus: 503, percentage: {value: 50}}}")
    r = random.Random(2)
    n = 4000
    plans = [plan_request(snap, req(), r) for _ in range(n)]
    delayed = sum(p.fault_delay == 2.0 for p in plans) / n
    aborted = sum(p.fault_abort == 503 for p in plans) / n
    assert abs(delayed - 0.25) < 0.03 and abs(aborted - 0.5) < 0.03


def test_grpc_abort():
    p = plan(fault_snapshot("{abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}"), req())
    assert (p.fault_abort, p.fault_grpc_status) == (None, "UNAVAILABLE")


# -- mirrors ----------------------------------------------------------------------------------

def test_mirror_and_mirrors_with_percentages():
    snap = snapshot(vs("""  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}"""))
    assert plan(snap, req()).mirrors == (ClusterKey(REVIEWS, "v2", 9080),)
    snap = snapshot(vs("""  - route: [{destination: {host: reviews, subset: v1}}]
    mirrors:
    - {destination: {host: reviews, subset: v2}, percentage: {value: 0}}
    - {destination: {host: ratings}}"""))
    assert plan(snap, req()).mirrors == (ClusterKey(RATINGS, None, 9080),)


def test_mirror_percentage_rolls():
    snap = snapshot(vs("""  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 10}"""))
    r = random.Random(3)
    share = sum(bool(plan_request(snap, req(), r).mirrors) for _ in range(5000)) / 5000
    assert abs(share - 0.10) < 0.02


# -- timeouts and retries ------------------------------------------------------------------------

def test_timeout_and_retries():
    snap = snapshot(vs("""  - match: [{uri: {prefix: /t}}]
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,503"}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /zero}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]"""))
    p = plan(snap, req("/t"))
    assert p.timeout == 0.5
    assert p.retry == RetryPolicy(3, 2.0, frozenset({"gateway-error", "retriable-status-codes"}),
                                  frozenset({503}))
    p = plan(snap, req("/zero"))
    assert p.timeout is None and p.retry is None
    p = plan(snap, req("/other"))
    assert p.timeout is None and p.retry == DEFAULT_RETRY_POLICY


# -- caching ---------------------------------------------------------------------------------------

def test_route_table_is_compiled_once_per_snapshot():
    snap = snapshot(vs(TWO_RULES))
    svc = snap.services[REVIEWS]
    t1 = route_table(snap, svc, 9080, "default")
    assert route_table(snap, svc, 9080, "default") is t1
    snap2 = snapshot(vs(TWO_RULES))
    assert route_table(snap2, snap2.services[REVIEWS], 9080, "default") is not t1


def test_weighted_pick_uses_the_random_source():
    snap = snapshot(vs("""  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v2}, weight: 50}"""))
    a = [plan(snap, req(), seed=s).cluster.subset for s in range(40)]
    b = [plan(snap, req(), seed=s).cluster.subset for s in range(40)]
    assert a == b and Counter(a).keys() == {"v1", "v2"}


def test_re2_full_match_semantics():
    from policy.routing import re2_fullmatch
    m = re2_fullmatch("/api/v[0-9]+")
    assert m("/api/v12") and not m("/api/v12/x") and not m("x/api/v1")
    assert re2_fullmatch("é+")("éé")
    assert re2_fullmatch("")("") and not re2_fullmatch("")("a")
    with pytest.raises(ValueError, match="invalid RE2 regex"):
        re2_fullmatch("(")
    with pytest.raises(ValueError):
        re2_fullmatch("(?=lookahead)")          # not RE2 syntax
