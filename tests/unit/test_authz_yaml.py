"""Authorization and peer authentication from real YAML: the project's loader and
snapshot, Istio's documented examples (tests/data/authz/) and Istio's own test data
(the shared istio-samples corpus)."""
from __future__ import annotations

from pathlib import Path

import pytest

from policy.authz import AuthorizationIndex, Connection, Request, compile_policies, evaluate
from nodeagent.configfiles import load_paths
from policy.peerauthn import DISABLE, PERMISSIVE, STRICT, PeerAuthenticationIndex, resolve_mtls
from policy.snapshot import build_snapshot

DATA = Path(__file__).resolve().parent.parent / "data" / "authz"
SLEEP_DEFAULT = "cluster.local/ns/default/sa/sleep"
DEV = "cluster.local/ns/dev/sa/client"
FOO = "cluster.local/ns/foo/sa/client"


def load(*paths):
    res = load_paths(paths)
    assert res.ok, "\n".join(str(e) for e in res.errors)
    return res.resources


@pytest.fixture(scope="module")
def index():
    return AuthorizationIndex(build_snapshot(load(DATA)))


def c(principal=FOO, port=8000, src_ip="10.0.0.5"):
    return Connection(source_principal=principal, source_ip=src_ip, destination_ip="10.0.1.1",
                      destination_port=port)


def r(method="GET", path="/", **kw):
    return Request(c(**kw), host="httpbin.foo", method=method, path=path)


HTTPBIN_V1 = {"app": "httpbin", "version": "v1"}
CASES = [
    # (id, namespace, labels, attrs, allowed, deciding policy)
    ("foo-allow-nothing", "foo", {"app": "web"}, r(), False, None),
    ("foo-plaintext-denied-by-require-mtls", "foo", {"app": "web"}, r(principal=None), False, "foo/require-mtls"),
    ("foo-admin-from-other-ns-denied", "foo", HTTPBIN_V1, r(path="/admin/x", principal=DEV), False,
     "foo/httpbin-deny"),
    ("foo-admin-from-foo-not-denied-but-nothing-allows", "foo", HTTPBIN_V1, r(path="/admin/x"), False, None),
    ("foo-jwt-reference-policy-fails-closed", "foo", {}, r(principal=SLEEP_DEFAULT), False, None),
    ("bar-no-jwt-sleep-get", "bar", {}, r(principal=SLEEP_DEFAULT), False, "bar/deny-all"),
    ("baz-allow-all", "baz", {}, r(principal=None), True, "baz/allow-all"),
    ("other-namespace-only-audit", "qux", {}, r(path="/admin"), True, None),
    ("tcp-echo-9001-allowed", "foo", {"app": "tcp-echo"}, c(port=9001), True, "foo/tcp-policy"),
    ("tcp-echo-9000-denied-by-http-only-deny", "foo", {"app": "tcp-echo"}, c(port=9000), False, "foo/tcp-deny-get"),
    ("tcp-echo-9002-not-allowed", "foo", {"app": "tcp-echo"}, c(port=9002), False, None),
    ("http-9000-post-allowed", "foo", {"app": "tcp-echo"}, r("POST", port=9000), True, "foo/tcp-policy"),
    ("http-9000-get-denied", "foo", {"app": "tcp-echo"}, r("GET", port=9000), False, "foo/tcp-deny-get"),
]


@pytest.mark.parametrize("ns,labels,attrs,allowed,policy", [x[1:] for x in CASES], ids=[x[0] for x in CASES])
def test_documented_examples(index, ns, labels, attrs, allowed, policy):
    v = evaluate(index.for_workload(ns, labels), attrs)
    assert (v.allowed, v.policy) == (allowed, policy), v.reason


def test_audit_from_root_namespace_is_reported(index):
    v = evaluate(index.for_workload("qux", {}), r(path="/admin"))
    assert v.audited == ("istio-system/audit-admin",)


def test_no_jwt_variant_allows_sleep_in_a_namespace_without_deny_all():
    res = [x for x in load(DATA / "reference-httpbin.yaml") if x.name == "httpbin-no-jwt"]
    ps = compile_policies(res)
    assert evaluate(ps, r(principal=SLEEP_DEFAULT)).allowed
    assert evaluate(ps, r(principal=DEV)).allowed
    assert not evaluate(ps, r("POST", principal=DEV)).allowed
    assert not evaluate(ps, r(principal=FOO)).allowed


def test_policy_source_points_at_the_yaml(index):
    by_name = {p.name: p for p in index.for_workload("foo", {"app": "tcp-echo"}).policies}
    assert by_name["foo/tcp-policy"].source == f"{DATA / 'tcp-echo.yaml'}:2"
    assert by_name["foo/allow-nothing"].source.startswith(f"{DATA / 'mesh-policies.yaml'}:")


# Istio's own test data ------------------------------------------------------


def test_istio_deny_and_allow_testdata(samples_dir):
    ps = compile_policies(load(samples_dir / "more" / "authorization-policy-deny-and-allow.yaml"))
    assert evaluate(ps, r(principal="deny")).policy == "foo/httpbin-deny"
    assert evaluate(ps, r(principal="allow")).allowed
    assert not evaluate(ps, r(principal=FOO)).allowed


def test_istio_custom_testdata_fails_closed(samples_dir):
    ps = compile_policies(load(samples_dir / "more" / "authorization-policy-custom-provider.yaml"))
    v = evaluate(ps, r(path="/httpbin2"))
    assert (v.allowed, v.policy) == (False, "foo/httpbin-2")
    assert v.reason.startswith("CUSTOM provider default not supported: denied")
    assert evaluate(ps, r(path="/other")).allowed
    # TCP: the path is HTTP-only, dropped from a CUSTOM rule -> the rule matches -> denied
    assert not evaluate(ps, c()).allowed


def test_istio_single_policy_testdata(samples_dir):
    """Istio's builder testdata: every rule needs request principals (JWT) -> never matches."""
    ps = compile_policies(load(samples_dir / "more" / "authorization-policy-from-to-when.yaml"))
    assert len(ps.allow) == 1 and ps.allow[0].http_rules == () and ps.needs_l7 is False
    attrs = Request(Connection(source_principal="rule[0]-from[0]-principal[1]", source_ip="10.0.0.1",
                               destination_ip="10.10.10.10", destination_port=9001),
                    host="rule[0]-to[0]-host[1]", method="rule[0]-to[0]-method[1]",
                    path="rule[0]-to[0]-path[1]", headers={"x-header": "header"})
    v = evaluate(ps, attrs)
    assert (v.allowed, v.policy) == (False, None)
    assert any("requestPrincipals needs JWT validation" in n for n in ps.notes)


# PeerAuthentication ---------------------------------------------------------


def test_peer_authentication_reference_example():
    snap = build_snapshot(load(DATA / "peer-authn-finance.yaml"))
    idx = PeerAuthenticationIndex(snap)
    assert idx.mode("foo", {"app": "finance"}) == STRICT
    assert idx.mode("foo", {"app": "finance"}, 8080) == DISABLE
    assert idx.mode("foo", {"app": "web"}) == PERMISSIVE
    assert idx.mode("bar", {}) == STRICT
    assert resolve_mtls(snap, "foo", {"app": "finance"}, 8080).policy == "foo/finance"


def test_peer_authentication_istio_testdata(samples_dir):
    res = load(samples_dir / "more" / "peer-authentication-strict.yaml",
               samples_dir / "more" / "peer-authentication-permissive-v1beta1.yaml")
    snap = build_snapshot(res)
    assert resolve_mtls(snap, "testns", {"app": "x"}).mode == STRICT
    assert resolve_mtls(snap, "default", {}).mode == PERMISSIVE
    assert resolve_mtls(snap, "elsewhere", {}).policy is None
