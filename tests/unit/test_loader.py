"""Loader behaviour: document-level errors, warnings, decoding details, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy import model as m
from policy.errors import ConfigError, Diagnostic
from nodeagent.configfiles import config_files, load_file, load_paths
from policy.loader import load_text, object_display

DATA = Path(__file__).resolve().parents[1] / "data" / "config"

HEAD = "apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n{ns}spec:\n"


def doc(kind: str, body: str, name: str = "x", namespace: str | None = "shop") -> str:
    ns = f"  namespace: {namespace}\n" if namespace else ""
    return HEAD.format(kind=kind, name=name, ns=ns) + body


def one(text: str) -> m.Resource:
    res = load_text(text, "t.yaml")
    assert res.errors == [], "\n".join(map(str, res.errors))
    (r,) = res.resources
    return r


# -- document level -------------------------------------------------------------


def test_malformed_yaml_reports_the_line():
    res = load_file(DATA / "malformed.yaml", "malformed.yaml")
    assert res.resources == []
    (e,) = res.errors
    assert str(e).startswith("malformed.yaml:8: invalid YAML:")


def test_tab_indentation_is_a_clear_yaml_error():
    res = load_text("apiVersion: v1\nkind: X\n\tmetadata: {}\n", "tabs.yaml")
    (e,) = res.errors
    assert e.line == 3 and "invalid YAML" in e.message


@pytest.mark.parametrize("name", ["empty.yaml", "comments-only.yaml"])
def test_empty_file_is_a_warning_with_no_objects(name):
    res = load_file(DATA / name, name)
    assert res.errors == [] and res.resources == []
    (w,) = res.warnings
    assert str(w) == f"{name}: warning: no objects in this file (it is empty)"


@pytest.mark.parametrize("name,what", [("list-document.yaml", "a list"), ("scalar-document.yaml", "string")])
def test_non_mapping_document(name, what):
    res = load_file(DATA / name, name)
    (e,) = res.errors
    assert str(e) == (f"{name}:1: document 1 must be a Kubernetes object (a mapping with apiVersion, kind "
                      f"and metadata), got {what}")


def test_duplicate_object_in_one_file():
    res = load_file(DATA / "duplicate.yaml", "duplicate.yaml")
    assert res.resources == []
    (e,) = res.errors
    assert str(e) == ("duplicate.yaml:12: DestinationRule shop/reviews: metadata.name: duplicate object: "
                      "DestinationRule shop/reviews is also defined at duplicate.yaml:1")


def test_duplicate_object_across_files(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(doc("DestinationRule", "  host: reviews\n", "reviews"))
    b.write_text("# again\n" + doc("DestinationRule", "  host: ratings\n", "reviews"))
    res = load_paths([tmp_path])
    (e,) = res.errors
    assert e.file == str(b) and e.line == 5 and f"also defined at {a}:1" in e.message
    # the same name in another namespace or kind is fine
    b.write_text(doc("DestinationRule", "  host: ratings\n", "reviews", "other"))
    assert load_paths([tmp_path]).errors == []


@pytest.mark.parametrize("text,fragment,line", [
    ("kind: VirtualService\nmetadata: {name: a}\nspec: {}\n", 'missing required field "apiVersion"', 1),
    ("apiVersion: networking.istio.io/v1\nmetadata: {name: a}\n", 'missing required field "kind"', 1),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\n", 'missing required field "metadata"', 1),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  labels: {a: b}\n",
     'metadata.name: missing required field "name"', 3),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: 7\n",
     "metadata.name: must be a non-empty string, got integer", 4),
    ("apiVersion: 1\nkind: VirtualService\nmetadata: {name: a}\n", "apiVersion must be a non-empty string", 1),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: [a]\n", "metadata: must be an object", 3),
])
def test_missing_or_bad_header_fields(text, fragment, line):
    res = load_text(text, "h.yaml")
    assert res.resources == []
    assert any(fragment in str(e) and e.line == line for e in res.errors), [str(e) for e in res.errors]


def test_file_with_one_error_changes_nothing():
    good = doc("DestinationRule", "  host: reviews\n", "good")
    bad = doc("DestinationRule", "  hots: reviews\n", "bad")
    res = load_text(good + "---\n" + bad, "t.yaml")
    assert res.resources == [] and len(res.errors) >= 1


def test_namespace_defaults_to_default_and_can_be_overridden():
    text = doc("DestinationRule", "  host: reviews\n", namespace=None)
    assert load_text(text, "t.yaml").resources[0].namespace == "default"
    assert load_text(text, "t.yaml", default_namespace="shop").resources[0].namespace == "shop"


LIST_ITEMS = """\
items:
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: a, namespace: shop}
  spec: {host: a}
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: b, namespace: shop}
  spec: {host: b}
"""


@pytest.mark.parametrize("meta", ["", "metadata: {resourceVersion: \"\"}\n", "metadata: {}\n",
                                  "metadata: null\n"])
def test_kind_list_is_expanded(meta):
    # kubectl writes a List without a name (``metadata: {resourceVersion: ""}`` or none at all)
    text = "apiVersion: v1\nkind: List\n" + meta + LIST_ITEMS
    res = load_text(text, "list.yaml")
    assert res.errors == [], "\n".join(map(str, res.errors))
    first = 3 + (1 if meta else 0)
    assert [r.name for r in res.resources] == ["a", "b"]
    assert [r.source.line for r in res.resources] == [first + 1, first + 5]


def test_kind_list_errors_and_nesting():
    # nested Lists are flattened (as kubectl does), iteratively
    nested = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items:\n" + \
        "".join("  " + ln + "\n" for ln in LIST_ITEMS.splitlines()[1:])
    assert [r.name for r in load_text(nested, "l.yaml").resources] == ["a", "b"]
    # an empty List is no objects (a warning); items that are not a list are an error
    res = load_text("apiVersion: v1\nkind: List\nitems: []\n", "l.yaml")
    assert res.errors == [] and "no objects" in str(res.warnings[0])
    res = load_text("apiVersion: v1\nkind: List\nitems: {a: 1}\n", "l.yaml")
    assert [str(e) for e in res.errors] == ["l.yaml:3: List: items: must be a list of objects, got an object"]
    res = load_text("apiVersion: v1\nkind: List\nmetadata: 3\nitems: []\n", "l.yaml")
    assert [str(e) for e in res.errors] == ["l.yaml:3: List: metadata: must be an object, got integer"]
    res = load_text("apiVersion: v1\nkind: List\nitemz: []\n", "l.yaml")
    assert [str(e) for e in res.errors] == ['l.yaml:3: List: itemz: unknown field "itemz" (did you mean "items"?)']
    # an item's own error keeps its line and document number
    res = load_text("apiVersion: v1\nkind: List\nitems:\n- 7\n- {apiVersion: v1, kind: Service}\n", "l.yaml")
    assert [str(e) for e in res.errors] == [
        "l.yaml:4: document 1 (List item 1) must be a Kubernetes object (a mapping with apiVersion, kind and "
        "metadata), got integer",
        'l.yaml:5: Service: document 1 (List item 2): missing required field "metadata" (with a name)']


def test_identities_only_reads_kind_namespace_and_name():
    text = ("apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\n" + LIST_ITEMS
            + "- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata: {name: c}\n"
              "  spec: {hosts: 7, bogus: 1}\n"
            + "- apiVersion: networking.istio.io/v1alpha3\n  kind: Gateway\n  metadata: {name: g}\n")
    res = load_text(text, "ids.yaml", default_namespace="team", identities_only=True)
    assert res.errors == [], "\n".join(map(str, res.errors))
    assert [r.key for r in res.refs] == [("DestinationRule", "shop", "a"), ("DestinationRule", "shop", "b"),
                                         ("VirtualService", "team", "c")]
    assert [(r.namespace_given, r.source.line) for r in res.refs] == [("shop", 5), ("shop", 9), (None, 13)]
    assert [o.ref for o in res.ignored] == ["Gateway team/g"]
    assert res.resources == []
    # the full load of the same text reports the invalid spec
    assert any("spec.hosts" in str(e) for e in load_text(text, "ids.yaml").errors)


def test_deep_nesting_is_an_error_not_a_crash():
    deep = "[" * 5000 + "]" * 5000 + "\n"
    for ids in (False, True):
        res = load_text(deep, "deep.yaml", identities_only=ids)
        assert [str(e) for e in res.errors] == ["deep.yaml:1: invalid YAML: nested more than 1000 levels deep"]
    # libyaml's C composer would overflow the C stack here (a segfault): refused before composing
    res = load_text("- " * 100000 + "x\n", "deep.yaml")
    assert [str(e) for e in res.errors] == ["deep.yaml:1: invalid YAML: nested more than 1000 levels deep"]
    block = "".join(" " * i + "a:\n" for i in range(1200))
    assert [str(e) for e in load_text(block, "deep.yaml").errors] == [
        "deep.yaml:1001: invalid YAML: nested more than 1000 levels deep"]
    # 900 levels (allowed by YAML) inside a spec: a clear error, not an internal one
    spec = doc("DestinationRule", "  host: a\n  trafficPolicy: " + "{a: " * 900 + "1" + "}" * 900 + "\n")
    (e,) = load_text(spec, "deep.yaml").errors
    assert "internal error" not in str(e) and "spec.trafficPolicy" in str(e)
    # Lists nested 400 deep (below YAML's own limit) are flattened without recursion
    dr = "{apiVersion: networking.istio.io/v1, kind: DestinationRule, metadata: {name: a}, spec: {host: a}}"
    nested = "{apiVersion: v1, kind: List, items: [" * 400 + dr + "]}" * 400 + "\n"
    for ids in (False, True):
        res = load_text(nested, "deep.yaml", identities_only=ids)
        assert res.errors == [] and [r.name for r in (res.refs if ids else res.resources)] == ["a"]


def test_duplicate_metadata_fields():
    text = doc("DestinationRule", "  host: a\n").replace("  name: x\n", "  name: a\n  name: b\n")
    for ids in (False, True):
        res = load_text(text, "dup.yaml", identities_only=ids)
        assert [str(e) for e in res.errors] == [
            'dup.yaml:5: DestinationRule shop/a: metadata.name: duplicate field "name"'], ids
        assert res.resources == [] and res.refs == []
    # on an ignored kind too, and for namespace
    svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  namespace: a\n  namespace: b\n"
    assert [str(e) for e in load_text(svc, "dup.yaml").errors] == [
        'dup.yaml:6: Service a/s: metadata.namespace: duplicate field "namespace"']


def test_json_file(tmp_path):
    obj = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
           "metadata": {"name": "reviews", "namespace": "shop"},
           "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}}
    f = tmp_path / "dr.json"
    f.write_text(json.dumps(obj, indent=2))
    (r,) = load_paths([tmp_path]).resources
    assert r.spec.traffic_policy.load_balancer.simple == "RANDOM"
    assert dict(r.raw) == obj


def test_unreadable_inputs_are_clear_errors(tmp_path):
    assert str(load_file(tmp_path / "nope.yaml", "nope.yaml").errors[0]) == "nope.yaml: no such file"
    (tmp_path / "bin.yaml").write_bytes(b"apiVersion: v1\n\xff\xfe\n")
    e = load_file(tmp_path / "bin.yaml", "bin.yaml").errors[0]
    assert e.line == 2 and "not UTF-8" in e.message
    assert "is a directory" in load_file(tmp_path, "d").errors[0].message


def test_config_files_order_and_filter(tmp_path):
    for n in ("b.yaml", "a.yml", "c.json", ".hidden.yaml", "notes.txt", "x.yaml~"):
        (tmp_path / n).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text(doc("DestinationRule", "  host: d\n", "d"))
    assert [p.name for p in config_files(tmp_path)] == ["a.yml", "b.yaml", "c.json"]
    assert load_paths([tmp_path]).resources == []
    assert [r.name for r in load_paths([tmp_path], recursive=True).resources] == ["d"]


def test_duplicate_keys_in_maps_and_objects():
    text = doc("VirtualService", """\
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: a}
        end-user: {exact: b}
    route:
    - destination: {host: reviews}
""")
    (e,) = load_text(text, "t.yaml").errors
    assert e.path == "spec.http[0].match[0].headers[end-user]" and e.line == 12 and "duplicate key" in e.message


def test_raise_for_errors_and_diagnostic_format():
    res = load_text(doc("DestinationRule", "  host: 5\n"), "t.yaml")
    with pytest.raises(ConfigError) as ei:
        res.raise_for_errors()
    assert "1 configuration error:" in str(ei.value)
    assert 't.yaml:7: DestinationRule shop/x: spec.host: must be a string, got integer 5 (quote it: "5")' in str(ei.value)
    assert str(Diagnostic("f.yaml", None, "boom")) == "f.yaml: boom"
    assert object_display("VirtualService", "networking.istio.io/v1", "r") == "virtualservice.networking.istio.io/r"


# -- decoding ----------------------------------------------------------------------


def test_http_route_decoding_and_legacy_folding():
    r = one(doc("VirtualService", """\
  hosts: [reviews]
  http:
  - name: main
    match:
    - uri: {prefix: /api}
      method: {exact: GET}
      authority: {regex: "shop\\\\..*"}
      scheme: {exact: http}
      headers:
        x-present: {}
        end-user: {exact: jason}
      withoutHeaders:
        x-debug: {}
      queryParams:
        v: {regex: "^[0-9]+$"}
      ignoreUriCase: true
      port: 9080
      sourceLabels: {app: productpage}
      sourceNamespace: shop
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      weight: 100
      headers:
        request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    rewrite: {uri: /v2, authority: reviews-v2}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx, connect-failure,503"}
    fault:
      delay: {fixedDelay: 2s, percent: 30}
      abort: {httpStatus: 503, percentage: {value: 0.5}}
    mirror: {host: reviews, subset: v3}
    mirrorPercent: 25
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example"}]
      allowMethods: [GET, POST]
      maxAge: 24h
      allowCredentials: false
    headers:
      response: {remove: [server]}
"""))
    route = r.spec.http[0]
    mt = route.match[0]
    assert mt.uri == m.StringMatch("prefix", "/api") and mt.method == m.StringMatch("exact", "GET")
    assert mt.authority == m.StringMatch("regex", "shop\\..*")
    assert mt.headers == {"x-present": m.StringMatch("present", ""), "end-user": m.StringMatch("exact", "jason")}
    assert mt.without_headers == {"x-debug": m.StringMatch("present", "")}
    assert mt.query_params["v"].kind == "regex"
    assert mt.ignore_uri_case is True and mt.port == 9080 and mt.source_namespace == "shop"
    assert mt.source_labels == {"app": "productpage"}
    d = route.route[0]
    assert d.destination == m.Destination("reviews", "v2", 9080) and d.weight == 100
    assert d.headers.request == m.HeaderOperations(m.frozen_map({"x-a": "1"}), m.frozen_map({"x-b": "2"}), ("x-c",))
    assert route.rewrite == m.HTTPRewrite(uri="/v2", authority="reviews-v2")
    assert route.timeout == 1.5
    assert route.retries == m.HTTPRetry(attempts=3, per_try_timeout=0.5, retry_on=("5xx", "connect-failure", "503"))
    assert route.fault.delay == m.Delay(fixed_delay=2.0, percentage=30.0, percent=30)
    assert route.fault.abort == m.Abort(http_status=503, percentage=0.5)
    assert route.mirror_percentage == 25.0 and route.mirror_percent == 25
    assert route.cors_policy.max_age == 86400.0 and route.cors_policy.allow_credentials is False
    assert route.headers.response.remove == ("server",)
    with pytest.raises(AttributeError):
        route.timeout = 3   # frozen


def test_percentage_wins_over_legacy_percent():
    r = one(doc("VirtualService", """\
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    fault:
      delay: {fixedDelay: 1s, percent: 30, percentage: {value: 12.5}}
"""))
    assert r.spec.http[0].fault.delay.percentage == 12.5


def test_destination_rule_decoding():
    r = one(doc("DestinationRule", """\
  host: reviews
  exportTo: ["."]
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
        ringHash: {minimumRingSize: 1024}
      localityLbSetting:
        enabled: true
        distribute:
        - from: us-west/zone1/*
          to: {"us-west/zone1/*": 80, "us-west/zone2/*": 20}
      warmupDurationSecs: 60s
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 30ms, tcpKeepalive: {probes: 3, time: 7200s, interval: 75s}}
      http: {http2MaxRequests: 100, idleTimeout: 1h, h2UpgradePolicy: UPGRADE, maxRetries: 3}
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 2
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 100
      minHealthPercent: 50
    tls: {mode: ISTIO_MUTUAL, sni: reviews.shop}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: LEAST_CONN}
"""))
    tp = r.spec.traffic_policy
    ch = tp.load_balancer.consistent_hash
    assert ch.http_header_name == "x-user" and ch.ring_hash == m.RingHash(1024)
    assert tp.load_balancer.locality_lb_setting.distribute[0].from_ == "us-west/zone1/*"
    assert tp.load_balancer.locality_lb_setting.distribute[0].to == {"us-west/zone1/*": 80, "us-west/zone2/*": 20}
    assert tp.load_balancer.warmup_duration_secs == 60.0
    assert tp.connection_pool.tcp.tcp_keepalive == m.TCPKeepalive(3, 7200.0, 75.0)
    assert tp.connection_pool.http.h2_upgrade_policy == "UPGRADE" and tp.connection_pool.http.idle_timeout == 3600.0
    od = tp.outlier_detection
    assert (od.consecutive_5xx_errors, od.consecutive_gateway_errors, od.min_health_percent) == (7, 2, 50)
    assert tp.tls == m.ClientTLSSettings(mode="ISTIO_MUTUAL", sni="reviews.shop")
    assert tp.port_level_settings == (m.PortTrafficPolicy(port=9080, load_balancer=m.LoadBalancerSettings("LEAST_REQUEST")),)
    assert r.spec.subsets[0].traffic_policy.load_balancer.simple == "LEAST_CONN"
    assert r.spec.export_to == (".",)


def test_security_decoding():
    ap = one("""\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  targetRefs:
  - {kind: Service, group: "", name: reviews}
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["cluster.local/ns/shop/sa/x"], notNamespaces: [dev], notIpBlocks: [10.0.0.0/8],
               notRemoteIpBlocks: [1.2.3.4], notRequestPrincipals: ["*"]}
    - source: {serviceAccounts: [shop/reviews]}
    to:
    - operation: {notHosts: [a.example], notPorts: ["81"], notMethods: [PUT], notPaths: [/admin*]}
    when:
    - key: request.headers[x-env]
      notValues: [prod]
""")
    s = ap.spec
    assert s.target_refs == (m.PolicyTargetReference(group="", kind="Service", name="reviews"),)
    src = s.rules[0].from_[0].source
    assert src.not_principals == ("cluster.local/ns/shop/sa/x",) and src.not_ip_blocks == ("10.0.0.0/8",)
    assert s.rules[0].from_[1].source.service_accounts == ("shop/reviews",)
    op = s.rules[0].to[0].operation
    assert (op.not_hosts, op.not_ports, op.not_methods, op.not_paths) == (("a.example",), ("81",), ("PUT",), ("/admin*",))
    assert s.rules[0].when[0] == m.Condition("request.headers[x-env]", (), ("prod",))

    pa = one("""\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    "9090": {mode: PERMISSIVE}
""")
    assert dict(pa.spec.port_level_mtls) == {8080: m.PeerAuthenticationMutualTLS("DISABLE"),
                                             9090: m.PeerAuthenticationMutualTLS("PERMISSIVE")}


def test_authorization_policy_fail_closed_fields_warn_but_load():
    res = load_text("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  rules:
  - from:
    - source: {requestPrincipals: ["issuer/subject"]}
""", "jwt.yaml")
    assert res.errors == [] and len(res.resources) == 1
    (w,) = res.warnings
    assert w.line == 7 and w.path == "spec.rules[0].from[0].source.requestPrincipals" and "JWT" in w.message


def test_null_fields_are_absent_and_empty_spec_is_allowed_where_istio_allows_it():
    r = one(doc("DestinationRule", "  host: reviews\n  trafficPolicy:\n  subsets:\n"))
    assert r.spec.traffic_policy is None and r.spec.subsets == ()
    pa = one("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: d, namespace: shop}\n")
    assert pa.spec == m.PeerAuthentication()
    ap = one("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: shop}\n"
             "spec: {}\n")
    assert ap.spec.action == "ALLOW" and ap.spec.rules == ()


def test_service_entry_and_workload_entry_decoding():
    res = load_text(doc("ServiceEntry", """\
  hosts: [catalog.shop.svc.cluster.local]
  addresses: [127.0.10.1, 10.9.0.0/16]
  ports:
  - {number: 80, name: http, protocol: http, targetPort: 8080}
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector:
    labels: {app: catalog}
  subjectAltNames: ["spiffe://cluster.local/ns/shop/sa/catalog"]
""", "catalog") + "---\n" + doc("WorkloadEntry", """\
  address: 127.0.1.1
  ports: {http: 8081}
  labels: {app: catalog, version: v1}
  network: n1
  locality: us/east/a
  weight: 3
  serviceAccount: catalog
""", "catalog-v1"), "t.yaml")
    assert res.errors == []
    se, we = (r.spec for r in res.resources)
    assert se.ports == (m.ServicePort(80, "HTTP", "http", 8080),)
    assert se.workload_selector == m.WorkloadSelector(m.frozen_map({"app": "catalog"}))
    assert se.addresses == ("127.0.10.1", "10.9.0.0/16")
    assert we == m.WorkloadEntry("127.0.1.1", m.frozen_map({"http": 8081}), m.frozen_map({"app": "catalog", "version": "v1"}),
                                 "n1", "us/east/a", 3, "catalog")


def test_yaml_anchors_and_merge_keys():
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: &od
      consecutive5xxErrors: 3
      interval: 10s
  subsets:
  - name: v1
    labels: &v1 {version: v1, app: reviews}
    trafficPolicy:
      outlierDetection:
        <<: *od
        interval: 1s
  - name: v1-canary
    labels:
      <<: *v1
      track: canary
"""
    r = one(text)
    assert r.spec.subsets[0].traffic_policy.outlier_detection == m.OutlierDetection(consecutive_5xx_errors=3, interval=1.0)
    assert dict(r.spec.subsets[1].labels) == {"version": "v1", "app": "reviews", "track": "canary"}
    assert r.raw["spec"]["subsets"][1]["labels"]["track"] == "canary"


def test_unreachable_rules_are_warnings():
    text = doc("VirtualService", """\
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: again
    match: [{name: other-name, headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /late}}]
    route: [{destination: {host: reviews}}]
""")
    res = load_text(text, "t.yaml")
    assert res.errors == [] and len(res.resources) == 1
    got = [(w.line, w.path, w.message.split(":")[0]) for w in res.warnings]
    assert got == [
        (13, "spec.http[1].match[0]", "match is ineffective"),
        (12, "spec.http[1]", 'HTTP rule "again" is unreachable'),
        (16, "spec.http[3]", "HTTP rule #3 is unreachable"),
    ]


def test_a_validator_bug_is_an_error_not_a_traceback(monkeypatch):
    from policy import validate

    def broken(obj, path, ctx):
        raise KeyError("boom")

    monkeypatch.setitem(validate.CHECKS, "Destination", broken)
    res = load_text(doc("VirtualService", "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n"), "t.yaml")
    (e,) = res.errors
    assert e.line == 1 and "internal error while validating (KeyError: 'boom')" in e.message


def test_no_reachability_warnings_for_invalid_rules():
    # a null rule is dropped from the decoded list: the indices no longer match the file, and
    # an invalid rule without matches is no catch-all; the errors are the whole story
    for http in ("[null, {route: ~}, {route: ~}]",
                 "[null, {route: ~}, {match: [{uri: {prefix: /a}}], route: [{destination: {host: r}}]}]",
                 "[{route: ~}, {match: [{uri: {prefix: /a}}], route: [{destination: {host: r}}]}]"):
        res = load_text(doc("VirtualService", f"  hosts: [r]\n  http: {http}\n"), "t.yaml")
        assert res.errors, http
        assert res.warnings == [], [str(w) for w in res.warnings]
    # valid rules still get the warning
    res = load_text(doc("VirtualService", "  hosts: [r]\n  http: [{route: [{destination: {host: r}}]}, "
                                          "{route: [{destination: {host: r}}]}]\n"), "t.yaml")
    assert res.errors == [] and "rule #1 is unreachable" in str(res.warnings[0])


@pytest.mark.parametrize("value,fragment", [
    ("99999999999999999999999999h", "too large"),
    ("315576000001s", "too large"),
    ("87660001h", "too large"),
    ("9999999999999999999999ns", "too large"),
])
def test_duration_above_protobuf_maximum_is_a_field_error(value, fragment):
    res = load_text(doc("VirtualService", f"  hosts: [r]\n  http:\n  - route: [{{destination: {{host: r}}}}]\n"
                                          f"    timeout: {value}\n"), "t.yaml")
    (e,) = res.errors
    assert e.line == 10 and e.path == "spec.http[0].timeout" and fragment in e.message, str(e)
    assert "315576000000s" in e.message


def test_policy_loader_does_no_io():
    """policy/ is pure: reading files is nodeagent.configfiles (the edge)."""
    import ast
    import policy.loader as loader
    tree = ast.parse(Path(loader.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"os", "pathlib", "io", "shutil", "glob", "nodeagent"}
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"open", "read_bytes", "read_text", "iterdir", "is_dir", "is_file", "stat", "scandir"}
    for name in ("load_file", "load_paths", "config_files"):
        assert not hasattr(loader, name)


def test_directory_entries_that_cannot_be_read_are_errors_naming_them(tmp_path):
    import os
    (tmp_path / "a.yaml").write_text(doc("DestinationRule", "  host: a\n", "a"))
    os.mkfifo(tmp_path / "f.yaml")
    (tmp_path / "l.yaml").symlink_to(tmp_path / "gone")
    (tmp_path / "sub.yaml").mkdir()
    res = load_paths([tmp_path])
    assert [str(e) for e in res.errors] == [
        f"{tmp_path}/f.yaml: cannot read: a FIFO, not a regular file",
        f"{tmp_path}/l.yaml: cannot read: dangling symbolic link to {tmp_path}/gone"]
    assert [r.name for r in res.resources] == ["a"]     # the readable file still loads ...
    assert not res.ok                                    # ... but the set is refused
    assert [p.name for p in config_files(tmp_path)] == ["a.yaml"]
    assert [str(e) for e in load_paths([tmp_path / "nope"]).errors] == [f"{tmp_path}/nope: no such file or directory"]


def test_recursive_walk_survives_a_link_loop(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text(doc("DestinationRule", "  host: d\n", "d"))
    (tmp_path / "sub" / "up").symlink_to(tmp_path)          # a loop back to the top
    (tmp_path / "self").symlink_to(tmp_path / "self")       # ELOOP: not a directory, skipped
    res = load_paths([tmp_path], recursive=True)
    assert res.errors == [] and [r.name for r in res.resources] == ["d"]
