"""ConfigSnapshot: indexes, host resolution, rule selection, immutability."""
from __future__ import annotations

import pytest

from policy import model as m
from policy.loader import load_text
from policy.snapshot import ConfigSnapshot, build_snapshot, host_matches, qualify_host, split_authority


def objs(yaml_text: str) -> list[m.Resource]:
    res = load_text(yaml_text, "snap.yaml")
    assert res.errors == [], "\n".join(map(str, res.errors))
    return res.resources


def se(name, ns, hosts, *, ports="[{number: 80, name: http, protocol: HTTP}]", extra=""):
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: {hosts}
  ports: {ports}
{extra}---
"""


def we(name, ns, address, labels, extra=""):
    return f"""\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  address: {address}
  labels: {labels}
{extra}---
"""


def vs(name, ns, hosts, dest, extra=""):
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: {hosts}
  http:
  - route:
    - destination: {{host: {dest}}}
{extra}---
"""


def dr(name, ns, host, extra=""):
    return f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {ns}}}
spec:
  host: {host}
{extra}---
"""


WORLD = (
    se("catalog", "shop", "[catalog.shop.svc.cluster.local]",
       ports="[{number: 80, name: http, protocol: HTTP}, {number: 9090, name: metrics, targetPort: 9191}]",
       extra="  addresses: [127.0.10.1]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
             "  workloadSelector: {labels: {app: catalog}}\n")
    + we("catalog-v1", "shop", "127.0.1.1", "{app: catalog, version: v1}",
         "  ports: {http: 8080}\n  serviceAccount: catalog\n  weight: 3\n")
    + we("catalog-v2", "shop", "127.0.1.2", "{app: catalog, version: v2}")
    + we("catalog-other-ns", "dev", "127.0.1.3", "{app: catalog, version: v1}")
    + se("ext", "shop", "[api.example.com]", extra="  resolution: DNS\n")
    + se("wild", "shop", "['*.bar.com']", extra="  resolution: NONE\n")
    + se("wilder", "shop", "['*.api.bar.com']", extra="  resolution: NONE\n")
    + se("legacy", "dev", "[legacy.internal]", extra="  addresses: [10.9.0.0/16]\n  resolution: STATIC\n"
         "  endpoints:\n  - address: 10.9.1.1\n    labels: {version: old}\n  - address: 10.9.1.2\n    ports: {http: 8081}\n")
)


@pytest.fixture(scope="module")
def snap() -> ConfigSnapshot:
    return build_snapshot(objs(WORLD), version=7)


def test_services_and_endpoints(snap):
    assert snap.version == 7
    assert set(snap.services) == {"catalog.shop.svc.cluster.local", "api.example.com", "*.bar.com",
                                  "*.api.bar.com", "legacy.internal"}
    cat = snap.services["catalog.shop.svc.cluster.local"]
    assert cat.namespace == "shop" and cat.mesh_internal and cat.resolution == "STATIC"
    assert [(e.address, e.workload.name) for e in cat.endpoints] == [("127.0.1.1", "catalog-v1"),
                                                                     ("127.0.1.2", "catalog-v2")]
    e1, e2 = cat.endpoints
    assert e1.weight == 3 and e1.service_account == "catalog" and e2.service_account == "default"
    http, metrics = cat.ports
    assert cat.endpoint_port(e1, http) == 8080      # WorkloadEntry ports by name
    assert cat.endpoint_port(e2, http) == 80        # the service port number
    assert cat.endpoint_port(e1, metrics) == 9191   # targetPort
    assert [e.address for e in cat.endpoints_matching({"version": "v2"})] == ["127.0.1.2"]
    assert cat.port(9090) is metrics and cat.port(1) is None and cat.port_by_name("http") is http
    # DNS resolution without endpoints: the host itself is the endpoint
    assert [e.address for e in snap.services["api.example.com"].endpoints] == ["api.example.com"]
    assert snap.services["api.example.com"].location == "MESH_EXTERNAL"
    assert snap.services["*.bar.com"].endpoints == ()


@pytest.mark.parametrize("authority,ns,host", [
    ("catalog", "shop", "catalog.shop.svc.cluster.local"),
    ("catalog:80", "shop", "catalog.shop.svc.cluster.local"),
    ("Catalog.Shop", "dev", "catalog.shop.svc.cluster.local"),
    ("catalog.shop.svc", "dev", "catalog.shop.svc.cluster.local"),
    ("catalog.shop.svc.cluster.local.:8080", "dev", "catalog.shop.svc.cluster.local"),
    ("api.example.com:443", "shop", "api.example.com"),
    ("x.bar.com", "shop", "*.bar.com"),
    ("v1.api.bar.com", "shop", "*.api.bar.com"),
    ("legacy.internal", "shop", "legacy.internal"),
    ("catalog", "dev", None),
    ("nothing.example.org", "shop", None),
    ("", "shop", None),
])
def test_resolve_host(snap, authority, ns, host):
    svc = snap.resolve_host(authority, ns)
    assert (svc.host if svc else None) == host


def test_resolve_host_is_memoized(snap):
    a = snap.resolve_host("catalog:80", "shop")
    assert snap.resolve_host("catalog:80", "shop") is a
    assert ("catalog:80", "shop") in snap._memo_host


def test_split_authority_and_helpers():
    assert split_authority("[::1]:8080") == ("::1", 8080)
    assert split_authority("[fe80::1]") == ("fe80::1", None)
    assert split_authority("Reviews.Shop.:9080") == ("reviews.shop", 9080)
    assert split_authority("host:notaport") == ("host", None)
    assert qualify_host("reviews", "shop") == "reviews.shop.svc.cluster.local"
    assert qualify_host("reviews.shop", "x") == "reviews.shop"
    assert qualify_host("*", "x") == "*"
    assert host_matches("*.shop.svc.cluster.local", "reviews.shop.svc.cluster.local")
    assert not host_matches("*.shop.svc.cluster.local", "shop.svc.cluster.local")


def test_service_by_address(snap):
    svc, port = snap.service_by_address("127.0.10.1", 80)
    assert svc.host == "catalog.shop.svc.cluster.local" and port.name == "http"
    assert snap.service_by_address("127.0.10.1", 81) is None
    svc, port = snap.service_by_address("10.9.200.7", 80)          # inside the CIDR
    assert svc.host == "legacy.internal"
    svc, port = snap.service_by_address("127.0.1.1", 8080)         # an endpoint, its own port
    assert (svc.host, port.number) == ("catalog.shop.svc.cluster.local", 80)
    svc, port = snap.service_by_address("127.0.1.2", 80)
    assert svc.host == "catalog.shop.svc.cluster.local"
    assert snap.service_by_address("127.0.1.1", 80) is None
    assert snap.service_by_address("not-an-ip", 80) is None


def test_workloads(snap):
    assert [w.name for w in snap.workloads] == ["catalog-v1", "catalog-v2", "catalog-other-ns"]
    w = snap.workload_by_address("127.0.1.1")
    assert (w.namespace, w.service_account, dict(w.labels), dict(w.ports)) == (
        "shop", "catalog", {"app": "catalog", "version": "v1"}, {"http": 8080})
    assert snap.workload_by_address("127.0.1.3").namespace == "dev"
    assert snap.workload_by_address("127.0.9.9") is None


def test_virtual_service_selection():
    s = build_snapshot(objs(
        vs("exact-old", "shop", "[reviews]", "reviews")
        + vs("exact-new", "shop", "[reviews.shop.svc.cluster.local]", "reviews")
        + vs("wild", "shop", "['*.shop.svc.cluster.local']", "reviews")
        + vs("wilder", "shop", "['*.svc.cluster.local']", "reviews")
        + vs("gateway-only", "shop", "[ratings]", "ratings", "  gateways: [shop-gateway]\n")
        + vs("mesh-and-gw", "shop", "[details]", "details", "  gateways: [mesh, shop-gateway]\n")
        + vs("private", "shop", "[secret]", "secret", "  exportTo: ['.']\n")
        + vs("to-dev", "shop", "[dev-only]", "x", "  exportTo: [dev]\n")
        + vs("any", "other", "['*.example.com']", "x")
        + vs("hidden-only", "shop", "[alone.example.org]", "x", "  exportTo: ['.']\n")
    ))
    pick = lambda host, ns="shop": (lambda r: r.name if r else None)(s.virtual_service_for(host, ns))
    assert pick("reviews.shop.svc.cluster.local") == "exact-old"       # exact beats wildcard; oldest wins
    assert pick("catalog.shop.svc.cluster.local") == "wild"            # longest wildcard
    assert pick("x.dev.svc.cluster.local") == "wilder"
    assert pick("ratings.shop.svc.cluster.local") == "wild"            # the gateway-only VS is skipped
    assert pick("details.shop.svc.cluster.local") == "mesh-and-gw"
    assert pick("secret.shop.svc.cluster.local") == "private"
    assert pick("secret.shop.svc.cluster.local", "dev") == "wild"      # exportTo "." hides "private"
    assert pick("dev-only.shop.svc.cluster.local", "dev") == "to-dev"
    assert pick("dev-only.shop.svc.cluster.local", "prod") == "wild"
    assert pick("api.example.com", "anything") == "any"
    assert pick("alone.example.org", "shop") == "hidden-only"
    assert pick("alone.example.org", "dev") is None
    assert s.virtual_service_for("reviews.shop.svc.cluster.local", "shop") is \
        s.virtual_service_for("reviews.shop.svc.cluster.local", "shop")


def test_destination_rule_selection():
    s = build_snapshot(objs(
        se("reviews", "shop", "[reviews.shop.svc.cluster.local]")
        + dr("root", "istio-system", "reviews.shop.svc.cluster.local")
        + dr("svc-ns", "shop", "reviews")
        + dr("client", "frontend", "reviews.shop.svc.cluster.local")
        + dr("client-wild", "frontend", "'*.svc.cluster.local'")
        + dr("hidden", "shop", "ratings", "  exportTo: ['.']\n")
        + dr("root-wild", "istio-system", "'*.local'",
             "  subsets:\n  - name: v1\n    labels: {version: v1}\n")
    ))
    pick = lambda host, ns: (lambda r: r.name if r else None)(s.destination_rule_for(host, ns))
    assert pick("reviews.shop.svc.cluster.local", "frontend") == "client"       # client namespace first
    assert pick("reviews.shop.svc.cluster.local", "shop") == "svc-ns"
    assert pick("reviews.shop.svc.cluster.local", "batch") == "svc-ns"          # then the service's namespace
    assert pick("other.x.svc.cluster.local", "batch") == "root-wild"            # then the root namespace
    assert pick("other.x.svc.cluster.local", "frontend") == "client-wild"
    assert pick("ratings.shop.svc.cluster.local", "shop") == "hidden"
    assert pick("ratings.shop.svc.cluster.local", "batch") == "root-wild"       # exportTo "." hides it
    assert s.subset_labels("x.y.local", "v1", "batch") == {"version": "v1"}
    assert s.subset_labels("x.y.local", "v9", "batch") is None


def test_authorization_policies_for():
    ap = lambda name, ns, spec: (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                                 f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n")
    s = build_snapshot(objs(
        ap("mesh-wide", "istio-system", "{action: DENY, rules: [{to: [{operation: {methods: [TRACE]}}]}]}")
        + ap("mesh-reviews", "istio-system", "{selector: {matchLabels: {app: reviews}}}")
        + ap("ns-wide", "shop", "{}")
        + ap("reviews-v1", "shop", "{selector: {matchLabels: {app: reviews, version: v1}}}")
        + ap("ratings", "shop", "{selector: {matchLabels: {app: ratings}}}")
        + ap("other-ns", "dev", "{}")
        + ap("targeted", "shop", "{targetRefs: [{kind: Service, group: '', name: reviews}]}")
    ))
    names = lambda ns, labels: [r.name for r in s.authorization_policies_for(ns, labels)]
    assert names("shop", {"app": "reviews", "version": "v1"}) == ["mesh-wide", "mesh-reviews", "ns-wide", "reviews-v1"]
    assert names("shop", {"app": "reviews", "version": "v2"}) == ["mesh-wide", "mesh-reviews", "ns-wide"]
    assert names("dev", {}) == ["mesh-wide", "other-ns"]
    assert names("istio-system", {"app": "reviews"}) == ["mesh-wide", "mesh-reviews"]
    assert [r.name for r in s.authorization_policies_for_target("Service", "shop", "reviews")] == ["targeted"]
    assert len(s.authorization_policies) == 7


def test_short_service_entry_hosts_are_qualified_with_their_namespace():
    s = build_snapshot(objs(se("httpbin", "web", "[httpbin]", extra="  resolution: STATIC\n"
                                                              "  endpoints: [{address: 127.0.5.1}]\n")
                            + vs("httpbin", "web", "[httpbin]", "httpbin")))
    svc = s.resolve_host("httpbin:80", "web")
    assert svc.host == "httpbin.web.svc.cluster.local"
    assert s.virtual_service_for(svc.host, "web").name == "httpbin"
    assert s.resolve_host("httpbin", "other") is None
    assert s.resolve_host("httpbin.web", "other") is svc


def test_resolve_host_by_service_address(snap):
    assert snap.resolve_host("127.0.10.1:80", "x").host == "catalog.shop.svc.cluster.local"
    assert snap.resolve_host("127.0.99.1", "x") is None


def test_peer_authentications_and_duplicate_hosts():
    pa = ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\n"
          "spec: {mtls: {mode: STRICT}}\n---\n")
    s = build_snapshot(objs(pa + se("a", "shop", "[dup.example.com]") + se("b", "dev", "[dup.example.com]")))
    assert [r.name for r in s.peer_authentications] == ["default"]
    assert s.services["dup.example.com"].source.name == "a"
    assert len(s.warnings) == 1 and "already defined by ServiceEntry shop/a" in s.warnings[0]


def test_snapshot_is_immutable(snap):
    with pytest.raises(AttributeError):
        snap.version = 8
    with pytest.raises(TypeError):
        snap.services["x"] = None
    assert isinstance(snap.resources, tuple)
    assert "version=7" in repr(snap)


def test_empty_snapshot():
    s = build_snapshot([])
    assert s.services == {} and s.resolve_host("a", "b") is None and s.virtual_service_for("a", "b") is None
    assert s.destination_rule_for("a", "b") is None and s.authorization_policies_for("a", {}) == ()
