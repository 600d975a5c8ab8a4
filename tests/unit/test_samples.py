"""Istio's own sample YAML loads unchanged, and every enforced kind x API version loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from policy import model as m
from nodeagent.configfiles import load_file, load_paths
from policy.loader import load_text
from policy.snapshot import build_snapshot

REPO = Path(__file__).resolve().parents[2]


def _sample_files(samples_dir: Path) -> list[Path]:
    files = sorted(p for p in samples_dir.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) >= 30, f"expected the Istio sample corpus, found {len(files)} files"
    return files


def test_every_istio_sample_loads_without_errors(samples_dir):
    total = 0
    kinds = set()
    for f in _sample_files(samples_dir):
        res = load_file(f)
        assert res.errors == [], f"{f}: " + "\n".join(map(str, res.errors))
        assert res.resources or res.ignored, f"{f}: nothing loaded"
        total += len(res.resources)
        kinds |= {r.kind for r in res.resources}
        # each file builds a snapshot on its own
        build_snapshot(res.resources)
    assert total >= 60
    assert kinds == set(m.SPEC_KINDS)


def test_unenforced_istio_kinds_give_one_warning_per_file(samples_dir):
    res = load_file(samples_dir / "bookinfo-networking" / "bookinfo-gateway.yaml")
    assert res.errors == []
    assert [r.kind for r in res.resources] == ["VirtualService"]
    assert len(res.warnings) == 1
    w = str(res.warnings[0])
    assert "warning" in w and "Gateway default/bookinfo-gateway" in w and "not enforced" in w

    res = load_file(samples_dir / "more" / "service-entry-examples-with-sidecar-dr-tls-vs.yaml")
    assert [o.kind for o in res.ignored] == ["Sidecar"]
    assert sum("not enforced by nodeagent (ignored)" in str(w) for w in res.warnings) == 1


def test_unenforced_fields_in_the_samples_are_warned_once_per_file(samples_dir):
    """The samples that use fields nodeagent loads but does not apply still load (no error),
    with one warning per file naming file:line, object and field."""
    f = samples_dir / "bookinfo-networking" / "egress-rule-google-apis.yaml"
    res = load_file(f)
    assert res.errors == []
    # tls.mode SIMPLE is originated by the proxy (nodeagent/proxy/origination.py): no warning
    assert res.warnings == []
    # corsPolicy is applied by the proxy: no warning
    res = load_file(samples_dir / "more" / "virtual-service-cors-policy.yaml")
    assert res.errors == [] and [r.kind for r in res.resources] == ["ServiceEntry", "VirtualService"]
    assert res.warnings == []
    f = samples_dir / "more" / "service-entry-examples-with-sidecar-dr-tls-vs.yaml"
    # MUTUAL with files, sni and subjectAltNames: all enforced (TLS origination), no warning
    assert [str(w) for w in load_file(f).warnings if "(ignored)" not in str(w)] == []
    # and the shipped example uses only what is enforced
    assert load_paths([Path(__file__).resolve().parents[2] / "examples" / "shop"]).warnings == []


def test_sample_values_decoded(samples_dir):
    dr = load_file(samples_dir / "more" / "destination-rule-all-connectionpool-outlier-consistenthash.yaml")
    rule = next(r for r in dr.resources if r.kind == "DestinationRule").spec
    tp = rule.traffic_policy
    assert tp.connection_pool.tcp.max_connections == 99
    assert tp.connection_pool.tcp.connect_timeout == 6.0
    assert tp.connection_pool.http.http1_max_pending_requests == 14
    assert tp.outlier_detection.interval == pytest.approx(0.008)
    assert tp.outlier_detection.base_ejection_time == 60.0
    assert tp.outlier_detection.max_ejection_percent == 11
    assert tp.tls.mode == "DISABLE"
    ch = rule.subsets[1].traffic_policy.load_balancer.consistent_hash
    assert ch.http_cookie == m.HTTPCookie(name="Cookie", ttl=30.0)
    assert ch.minimum_ring_size == 42

    vs = load_file(samples_dir / "bookinfo-networking" / "virtual-service-reviews-80-20.yaml").resources[0].spec
    assert [(d.destination.subset, d.weight) for d in vs.http[0].route] == [("v1", 80), ("v2", 20)]

    abort = load_file(samples_dir / "bookinfo-networking" / "virtual-service-ratings-test-abort.yaml").resources[0]
    assert abort.namespace == "default"
    r0 = abort.spec.http[0]
    assert r0.match[0].headers["end-user"] == m.StringMatch("exact", "jason")
    assert r0.fault.abort.http_status == 500 and r0.fault.abort.percentage == 100.0

    gw = load_file(samples_dir / "bookinfo-networking" / "bookinfo-gateway.yaml").resources[0].spec
    assert gw.http[0].route[0].destination == m.Destination(host="productpage", port=9080)
    assert gw.http[0].match[1].uri == m.StringMatch("prefix", "/static")

    mirror = load_file(samples_dir / "more" / "virtual-service-mirror.yaml").resources[0].spec.http[0]
    assert mirror.mirror == m.Destination("httpbin", "v2") and mirror.mirror_percentage == 100.0

    se = load_file(samples_dir / "more" / "service-entry-static-weighted-locality.yaml").resources[0].spec
    assert [(e.address, e.locality, e.weight) for e in se.endpoints] == [
        ("3.3.3.3", "a", None), ("2.2.2.2", "a", 8), ("1.1.1.1", "b", 3)]

    ap = load_file(samples_dir / "more" / "authorization-policy-from-to-when.yaml").resources[0].spec
    assert ap.rules[0].from_[0].source.ip_blocks == ("10.0.0.1", "10.0.0.2")
    assert ap.rules[0].to[0].operation.ports == ("9001", "9002")
    assert ap.rules[0].when[1] == m.Condition("destination.ip", ("10.10.10.10", "192.168.10.0/24"))
    assert ap.action == "ALLOW" and ap.selector.match_labels == {"app": "httpbin", "version": "v1"}

    we = load_file(samples_dir / "more" / "workload-entry-vm.yaml").resources[0]
    assert we.annotations == {"istio.io/autoRegistrationGroup": "product-vm"}
    assert we.spec.service_account == "default" and we.spec.address == "1.2.3.4"


def test_samples_load_as_one_directory_reports_duplicates_across_files(samples_dir):
    # the bookinfo files are alternatives of each other: together they define
    # the same objects several times, which is an error in one apply
    res = load_paths([samples_dir / "bookinfo-networking"])
    assert res.errors and all("duplicate object" in e.message for e in res.errors)


# -- every kind x API version ---------------------------------------------------

MINIMAL_SPECS = {
    "VirtualService": "hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}",
    "DestinationRule": "host: reviews",
    "ServiceEntry": "hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: TLS}]",
    "WorkloadEntry": "address: 127.0.1.9",
    "AuthorizationPolicy": "action: DENY\n  rules: [{to: [{operation: {methods: [DELETE]}}]}]",
    "PeerAuthentication": "mtls: {mode: STRICT}",
}
TABLE = [(kind, version) for kind, (_g, versions, _c) in m.SPEC_KINDS.items() for version in versions]


def test_table_covers_all_kinds_and_versions():
    assert len(TABLE) == 4 * 3 + 2 * 2


@pytest.mark.parametrize("kind,version", TABLE, ids=[f"{k}-{v}" for k, v in TABLE])
def test_every_kind_and_version_loads(kind, version):
    group, _versions, cls = m.SPEC_KINDS[kind]
    text = (f"apiVersion: {group}/{version}\nkind: {kind}\nmetadata:\n  name: x\n  namespace: shop\n"
            f"spec:\n  {MINIMAL_SPECS[kind]}\n")
    res = load_text(text, "t.yaml")
    assert res.errors == [], res.errors
    (r,) = res.resources
    assert r.kind == kind and r.api_version == f"{group}/{version}"
    assert isinstance(r.spec, cls)
    assert r.key == (kind, "shop", "x") and r.ref == f"{kind} shop/x"
    assert r.source == m.SourceRef("t.yaml", 1)


UNENFORCED = [
    ("networking.istio.io/v1", "Gateway"), ("networking.istio.io/v1beta1", "Sidecar"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"), ("networking.istio.io/v1", "WorkloadGroup"),
    ("networking.istio.io/v1beta1", "ProxyConfig"), ("security.istio.io/v1", "RequestAuthentication"),
    ("telemetry.istio.io/v1", "Telemetry"), ("extensions.istio.io/v1alpha1", "WasmPlugin"),
    ("v1", "Service"), ("apps/v1", "Deployment"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
]


def test_unenforced_and_foreign_kinds_load_with_one_warning():
    docs = [f"apiVersion: {av}\nkind: {k}\nmetadata:\n  name: n{i}\nspec:\n  anything: [goes, here]\n"
            for i, (av, k) in enumerate(UNENFORCED)]
    res = load_text("---\n".join(docs), "mixed.yaml")
    assert res.errors == []
    assert res.resources == []
    assert [(o.api_version, o.kind) for o in res.ignored] == UNENFORCED
    assert len(res.warnings) == 1
    msg = str(res.warnings[0])
    for _av, k in UNENFORCED:
        assert f"{k} default/" in msg


def test_shop_example_is_the_embedded_default_and_valid():
    ex = REPO / "examples" / "shop"
    emb = REPO / "nodeagent" / "defaults"
    names = sorted(p.name for p in emb.glob("*.yaml"))
    assert names and sorted(p.name for p in ex.glob("*.yaml")) == names
    for n in names:
        assert (ex / n).read_bytes() == (emb / n).read_bytes()
    res = load_paths([ex])
    assert res.errors == [] and res.warnings == []
    assert {r.namespace for r in res.resources} == {"shop"}
    snap = build_snapshot(res.resources)
    catalog = snap.services["catalog.shop.svc.cluster.local"]
    assert catalog.ports[0] == m.ServicePort(80, "HTTP", "http")
    assert {(e.workload.name, e.labels["version"]) for e in catalog.endpoints} == {
        ("catalog-v1a", "v1"), ("catalog-v1b", "v1"), ("catalog-v2", "v2")}
    assert all(e.address.startswith("127.") for s in snap.services.values() for e in s.endpoints)
    vs = snap.virtual_service_for("catalog.shop.svc.cluster.local", "shop").spec
    assert vs.http[0].match[0].uri == m.StringMatch("prefix", "/newcatalog")
    assert vs.http[0].route[0].destination.subset == "v2" and vs.http[1].route[0].destination.subset == "v1"
    dr = snap.destination_rule_for("catalog.shop.svc.cluster.local", "shop").spec
    assert dr.traffic_policy.load_balancer.simple == "LEAST_CONN"
    od = dr.traffic_policy.outlier_detection
    assert (od.consecutive_errors, od.interval, od.base_ejection_time) == (5, 300.0, 900.0)
    pa = snap.peer_authentications[0]
    assert pa.namespace == "shop" and pa.spec.mtls.mode == "STRICT" and pa.spec.selector is None
    reviews_aps = snap.authorization_policies_for("shop", {"app": "reviews", "version": "v2"})
    assert [r.name for r in reviews_aps] == ["reviews-from-productpage"]
    assert reviews_aps[0].spec.rules[0].from_[0].source.principals == ("cluster.local/ns/shop/sa/bookinfo-productpage",)
