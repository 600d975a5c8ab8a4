"""AuthorizationPolicy verdicts: a table of Istio's documented behaviours.

Each row is (id, policies, attributes, allowed, deciding policy). Policies
are model objects built by the small helpers below; rows cite the Istio
document or test data they come from where there is one.
"""
from __future__ import annotations

import time

import pytest

from policy.authz import (
    RBAC_DENIED_BODY, RBAC_DENIED_STATUS, RBAC_RESPONSE_FLAG, AuthorizationIndex, Connection,
    InvalidPath, Request, compile_policies, evaluate, needs_l7, normalize_path, unsupported_field_warnings,
)
from policy.model import (
    AuthorizationPolicy, Condition, ExtensionProvider, Operation, PolicyTargetReference, Resource,
    Rule, RuleFrom, RuleTo, Source, SourceRef, WorkloadSelector,
)

# --------------------------------------------------------------------------
# builders


def ap(name, action="ALLOW", rules=(), ns="foo", provider=None, selector=None, target_refs=()):
    spec = AuthorizationPolicy(
        selector=WorkloadSelector(match_labels=selector) if selector else None,
        target_refs=tuple(target_refs), action=action,
        provider=ExtensionProvider(provider) if provider else None, rules=tuple(rules))
    return Resource("AuthorizationPolicy", "security.istio.io/v1", name, ns, {}, {}, spec,
                    SourceRef("policies.yaml", 1))


def rule(from_=(), to=(), when=()):
    return Rule(from_=tuple(from_), to=tuple(to), when=tuple(when))


def src(**kw):
    return RuleFrom(Source(**{k: tuple(v) for k, v in kw.items()}))


def op(**kw):
    return RuleTo(Operation(**{k: tuple(v) for k, v in kw.items()}))


def cond(key, values=(), not_values=()):
    return Condition(key, tuple(values), tuple(not_values))


SLEEP = "cluster.local/ns/foo/sa/sleep"
OTHER = "cluster.local/ns/bar/sa/other"
TEST_NS = "cluster.local/ns/test/sa/client"


def conn(principal=SLEEP, src_ip="10.0.0.5", dst_ip="10.0.1.1", port=8000, sni=None, remote_ip=None):
    return Connection(source_principal=principal, source_ip=src_ip, destination_ip=dst_ip,
                      destination_port=port, sni=sni, remote_ip=remote_ip)


def req(method="GET", path="/", host="httpbin.foo", headers=None, **conn_kw):
    return Request(conn(**conn_kw), host=host, method=method, path=path, headers=headers or {})


# Policies reused by several rows ------------------------------------------

ALLOW_NOTHING = ap("allow-nothing")                                   # spec: {}
DENY_ALL = ap("deny-all", "DENY", [rule()])                            # rules: [{}]
ALLOW_ALL = ap("allow-all", "ALLOW", [rule()])

# Istio reference example: GET /info* or POST /data from sleep or namespace test
HTTPBIN = ap("httpbin", "ALLOW", [rule(
    from_=[src(principals=[SLEEP]), src(namespaces=["test"])],
    to=[op(methods=["GET"], paths=["/info*"]), op(methods=["POST"], paths=["/data"])])])

# istio-samples/more/authorization-policy-deny-and-allow.yaml (principals "deny"/"allow")
DENY_AND_ALLOW = [ap("httpbin-deny", "DENY", [rule(from_=[src(principals=["deny"])])]),
                  ap("httpbin-allow", "ALLOW", [rule(from_=[src(principals=["allow"])])])]

# Istio TCP task: allow ports 9000, 9001 (tcp-echo)
TCP_POLICY = ap("tcp-policy", "ALLOW", [rule(to=[op(ports=["9000", "9001"])])])
# ... then "Update the policy to add an HTTP-only field named methods for port 9000"
TCP_POLICY_METHODS = ap("tcp-policy", "ALLOW", [rule(to=[op(methods=["GET"], ports=["9000"])])])
# ... and the DENY variant of the task
TCP_DENY_METHODS = ap("tcp-policy", "DENY", [rule(to=[op(methods=["GET"], ports=["9000"])])])

CASES = [
    # -- defaults, allow-nothing / deny-all / allow-all (Istio concepts page)
    ("no-policy-allows", [], req(), True, None),
    ("no-policy-allows-tcp", [], conn(), True, None),
    ("allow-nothing-denies", [ALLOW_NOTHING], req(), False, None),
    ("allow-nothing-denies-tcp", [ALLOW_NOTHING], conn(), False, None),
    ("deny-all-denies", [DENY_ALL], req(), False, "foo/deny-all"),
    ("deny-all-denies-plaintext", [DENY_ALL], req(principal=None), False, "foo/deny-all"),
    ("allow-all-allows", [ALLOW_ALL], req(principal=None), True, "foo/allow-all"),
    ("deny-all-beats-allow-all", [ALLOW_ALL, DENY_ALL], req(), False, "foo/deny-all"),
    ("empty-deny-policy-matches-nothing", [ap("d", "DENY")], req(), True, None),

    # -- the reference example
    ("ref-sleep-get-info", [HTTPBIN], req("GET", "/info/x"), True, "foo/httpbin"),
    ("ref-sleep-get-info-exact-prefix", [HTTPBIN], req("GET", "/info"), True, "foo/httpbin"),
    ("ref-sleep-post-data", [HTTPBIN], req("POST", "/data"), True, "foo/httpbin"),
    ("ref-sleep-post-info", [HTTPBIN], req("POST", "/info"), False, None),
    ("ref-sleep-get-data", [HTTPBIN], req("GET", "/data"), False, None),
    ("ref-ns-test-get-info", [HTTPBIN], req("GET", "/info", principal=TEST_NS), True, "foo/httpbin"),
    ("ref-other-ns-denied", [HTTPBIN], req("GET", "/info", principal=OTHER), False, None),
    ("ref-plaintext-denied", [HTTPBIN], req("GET", "/info", principal=None), False, None),
    ("ref-query-not-part-of-path", [HTTPBIN], req("POST", "/data?x=1"), True, "foo/httpbin"),

    # -- deny-and-allow sample (Istio testdata)
    ("sample-deny-principal", DENY_AND_ALLOW, req(principal="deny"), False, "foo/httpbin-deny"),
    ("sample-allow-principal", DENY_AND_ALLOW, req(principal="allow"), True, "foo/httpbin-allow"),
    ("sample-other-denied", DENY_AND_ALLOW, req(principal=SLEEP), False, None),

    # -- principals
    ("principal-star-needs-identity", [ap("a", rules=[rule(from_=[src(principals=["*"])])])],
     req(principal=None), False, None),
    ("principal-star-any-identity", [ap("a", rules=[rule(from_=[src(principals=["*"])])])],
     req(principal=OTHER), True, "foo/a"),
    ("principal-prefix", [ap("a", rules=[rule(from_=[src(principals=["cluster.local/ns/bar/*"])])])],
     req(principal=OTHER), True, "foo/a"),
    ("principal-suffix", [ap("a", rules=[rule(from_=[src(principals=["*/sa/sleep"])])])],
     req(principal=SLEEP), True, "foo/a"),
    ("principal-suffix-miss", [ap("a", rules=[rule(from_=[src(principals=["*/sa/sleep"])])])],
     req(principal=OTHER), False, None),
    ("spiffe-uri-accepted-as-peer", [ap("a", rules=[rule(from_=[src(principals=[SLEEP])])])],
     req(principal="spiffe://" + SLEEP), True, "foo/a"),

    # -- not-forms (exclusion matching)
    ("deny-not-principals-star-denies-plaintext",
     [ap("d", "DENY", [rule(from_=[src(not_principals=["*"])])])], req(principal=None), False, "foo/d"),
    ("deny-not-principals-star-lets-mtls",
     [ap("d", "DENY", [rule(from_=[src(not_principals=["*"])])])], req(), True, None),
    ("deny-not-namespaces-denies-foreign",
     [ap("d", "DENY", [rule(from_=[src(not_namespaces=["foo"])])])], req(principal=OTHER), False, "foo/d"),
    ("deny-not-namespaces-lets-own",
     [ap("d", "DENY", [rule(from_=[src(not_namespaces=["foo"])])])], req(), True, None),
    ("deny-not-namespaces-denies-plaintext",
     [ap("d", "DENY", [rule(from_=[src(not_namespaces=["foo"])])])], req(principal=None), False, "foo/d"),
    ("allow-not-methods", [ap("a", rules=[rule(to=[op(not_methods=["DELETE"])])])],
     req("DELETE"), False, None),
    ("allow-not-methods-other", [ap("a", rules=[rule(to=[op(not_methods=["DELETE"])])])],
     req("GET"), True, "foo/a"),
    ("deny-not-paths", [ap("d", "DENY", [rule(to=[op(not_paths=["/healthz"])])])],
     req(path="/healthz"), True, None),
    ("deny-not-paths-other", [ap("d", "DENY", [rule(to=[op(not_paths=["/healthz"])])])],
     req(path="/admin"), False, "foo/d"),
    ("deny-not-ipblocks", [ap("d", "DENY", [rule(from_=[src(not_ip_blocks=["10.0.0.0/8"])])])],
     req(src_ip="192.168.1.1"), False, "foo/d"),
    ("deny-not-ipblocks-inside", [ap("d", "DENY", [rule(from_=[src(not_ip_blocks=["10.0.0.0/8"])])])],
     req(src_ip="10.9.9.9"), True, None),

    # -- namespaces
    ("namespace-match", [ap("a", rules=[rule(from_=[src(namespaces=["foo"])])])], req(), True, "foo/a"),
    ("namespace-prefix", [ap("a", rules=[rule(from_=[src(namespaces=["ba*"])])])],
     req(principal=OTHER), True, "foo/a"),
    ("namespace-plaintext-has-none", [ap("a", rules=[rule(from_=[src(namespaces=["*"])])])],
     req(principal=None), False, None),

    # -- paths: prefix / suffix / presence / templates / normalization
    ("path-suffix", [ap("a", rules=[rule(to=[op(paths=["*.png"])])])], req(path="/img/a.png"), True, "foo/a"),
    ("path-suffix-miss", [ap("a", rules=[rule(to=[op(paths=["*.png"])])])], req(path="/img/a.jpg"),
     False, None),
    ("path-presence", [ap("a", rules=[rule(to=[op(paths=["*"])])])], req(path="/anything"), True, "foo/a"),
    ("path-case-sensitive", [ap("a", rules=[rule(to=[op(paths=["/Admin"])])])], req(path="/admin"),
     False, None),
    ("path-template-one-segment", [ap("a", rules=[rule(to=[op(paths=["/foo/{*}"])])])],
     req(path="/foo/bar"), True, "foo/a"),
    ("path-template-one-segment-not-two", [ap("a", rules=[rule(to=[op(paths=["/foo/{*}"])])])],
     req(path="/foo/bar/baz"), False, None),
    ("path-template-any", [ap("a", rules=[rule(to=[op(paths=["/foo/{*}/bar/{**}"])])])],
     req(path="/foo/buzz/bar/baz"), True, "foo/a"),
    ("path-dot-segments-normalized", [ap("d", "DENY", [rule(to=[op(paths=["/admin*"])])])],
     req(path="/public/../admin/users"), False, "foo/d"),
    ("path-encoded-letters-normalized", [ap("d", "DENY", [rule(to=[op(paths=["/admin*"])])])],
     req(path="/%61dmin"), False, "foo/d"),
    ("path-encoded-dot-segments-normalized", [ap("d", "DENY", [rule(to=[op(paths=["/admin*"])])])],
     req(path="/public/%2e%2e/admin"), False, "foo/d"),

    # -- methods, hosts
    ("method-exact", [ap("a", rules=[rule(to=[op(methods=["GET", "HEAD"])])])], req("HEAD"), True, "foo/a"),
    ("method-case-sensitive", [ap("a", rules=[rule(to=[op(methods=["GET"])])])], req("get"), False, None),
    ("host-case-insensitive", [ap("a", rules=[rule(to=[op(hosts=["HTTPBIN.foo"])])])],
     req(host="httpbin.FOO"), True, "foo/a"),
    ("host-port-not-stripped", [ap("a", rules=[rule(to=[op(hosts=["httpbin.foo"])])])],
     req(host="httpbin.foo:8000"), False, None),
    ("host-with-port-pattern", [ap("a", rules=[rule(to=[op(hosts=["httpbin.foo", "httpbin.foo:*"])])])],
     req(host="httpbin.foo:8000"), True, "foo/a"),
    ("host-suffix", [ap("a", rules=[rule(to=[op(hosts=["*.example.com"])])])],
     req(host="api.example.com"), True, "foo/a"),
    ("deny-not-hosts", [ap("d", "DENY", [rule(to=[op(not_hosts=["httpbin.foo"])])])],
     req(host="evil.com"), False, "foo/d"),

    # -- ports
    ("port-match", [ap("a", rules=[rule(to=[op(ports=["8000"])])])], req(port=8000), True, "foo/a"),
    ("port-miss", [ap("a", rules=[rule(to=[op(ports=["8000"])])])], req(port=9000), False, None),
    ("deny-not-ports", [ap("d", "DENY", [rule(to=[op(not_ports=["8000"])])])], conn(port=22), False, "foo/d"),

    # -- when
    ("when-header-exact", [ap("a", rules=[rule(when=[cond("request.headers[version]", ["v1", "v2"])])])],
     req(headers={"version": "v2"}), True, "foo/a"),
    ("when-header-missing", [ap("a", rules=[rule(when=[cond("request.headers[version]", ["v1"])])])],
     req(), False, None),
    ("when-header-name-case-insensitive",
     [ap("a", rules=[rule(when=[cond("request.headers[X-Token]", ["abc*"])])])],
     req(headers={"x-token": "abcdef"}), True, "foo/a"),
    ("when-header-presence", [ap("a", rules=[rule(when=[cond("request.headers[x-token]", ["*"])])])],
     req(headers={"x-token": ""}), True, "foo/a"),
    ("when-header-not-values", [ap("d", "DENY", [rule(when=[cond("request.headers[x-env]", (), ["prod"])])])],
     req(headers={"x-env": "prod"}), True, None),
    ("when-source-ip-cidr", [ap("a", rules=[rule(when=[cond("source.ip", ["10.0.0.0/24"])])])],
     conn(src_ip="10.0.0.77"), True, "foo/a"),
    ("when-remote-ip-xff", [ap("d", "DENY", [rule(when=[cond("remote.ip", ["203.0.113.7"])])])],
     conn(src_ip="10.0.0.2", remote_ip="203.0.113.7"), False, "foo/d"),
    ("when-source-namespace", [ap("a", rules=[rule(when=[cond("source.namespace", ["bar"])])])],
     conn(principal=OTHER), True, "foo/a"),
    ("when-source-principal", [ap("a", rules=[rule(when=[cond("source.principal", [SLEEP])])])],
     conn(), True, "foo/a"),
    ("when-destination-ip", [ap("a", rules=[rule(when=[cond("destination.ip", ["10.0.1.0/24"])])])],
     conn(dst_ip="10.0.1.9"), True, "foo/a"),
    ("when-destination-port", [ap("a", rules=[rule(when=[cond("destination.port", ["8000"])])])],
     conn(port=8001), False, None),
    ("when-connection-sni", [ap("a", rules=[rule(when=[cond("connection.sni", ["*.foo.svc"])])])],
     conn(sni="httpbin.foo.svc"), True, "foo/a"),

    # -- ipBlocks
    ("ipblocks-cidr", [ap("a", rules=[rule(from_=[src(ip_blocks=["192.168.0.0/16"])])])],
     conn(src_ip="192.168.4.4"), True, "foo/a"),
    ("ipblocks-single-ip", [ap("a", rules=[rule(from_=[src(ip_blocks=["10.0.0.5"])])])], conn(), True, "foo/a"),
    ("ipblocks-miss", [ap("a", rules=[rule(from_=[src(ip_blocks=["10.0.0.6"])])])], conn(), False, None),
    ("ipblocks-ipv6", [ap("a", rules=[rule(from_=[src(ip_blocks=["fd00::/8"])])])],
     conn(src_ip="fd00::1"), True, "foo/a"),
    ("remote-ipblocks-default-to-source", [ap("a", rules=[rule(from_=[src(remote_ip_blocks=["10.0.0.0/8"])])])],
     conn(), True, "foo/a"),

    # -- rule composition: AND across from/to/when, OR within
    ("and-from-to-both-needed", [ap("a", rules=[rule(from_=[src(principals=[SLEEP])],
                                                     to=[op(methods=["GET"])])])], req("POST"), False, None),
    ("and-within-source", [ap("a", rules=[rule(from_=[src(principals=[SLEEP], ip_blocks=["1.2.3.4"])])])],
     req(), False, None),
    ("or-across-rules", [ap("a", rules=[rule(to=[op(methods=["POST"])]), rule(to=[op(methods=["GET"])])])],
     req("GET"), True, "foo/a"),

    # -- DENY before ALLOW, AUDIT never decides
    ("deny-before-allow", [ap("a", rules=[rule()]), ap("d", "DENY", [rule(to=[op(paths=["/admin"])])])],
     req(path="/admin"), False, "foo/d"),
    ("audit-does-not-deny", [ap("au", "AUDIT", [rule()])], req(), True, None),
    ("audit-does-not-allow", [ap("au", "AUDIT", [rule()]), ALLOW_NOTHING], req(), False, None),

    # -- CUSTOM: no external authorizer, fail closed when it matches
    ("custom-match-denies", [ap("ext", "CUSTOM", [rule(to=[op(paths=["/httpbin1"])])], provider="default")],
     req(path="/httpbin1"), False, "foo/ext"),
    ("custom-no-match-passes", [ap("ext", "CUSTOM", [rule(to=[op(paths=["/httpbin1"])])], provider="default")],
     req(path="/other"), True, None),
    ("custom-before-allow", [ALLOW_ALL, ap("ext", "CUSTOM", [rule()], provider="opa")], req(), False, "foo/ext"),

    # -- TCP: HTTP-only fields (Istio TCP task + model.go checkError)
    ("tcp-ports-allowed", [TCP_POLICY], conn(port=9001), True, "foo/tcp-policy"),
    ("tcp-port-9002-denied", [TCP_POLICY], conn(port=9002), False, None),
    ("tcp-allow-with-methods-never-matches", [TCP_POLICY_METHODS], conn(port=9000), False, None),
    ("http-allow-with-methods-matches", [TCP_POLICY_METHODS], req("GET", port=9000), True, "foo/tcp-policy"),
    ("tcp-deny-with-methods-drops-field", [TCP_DENY_METHODS], conn(port=9000), False, "foo/tcp-policy"),
    ("tcp-deny-with-methods-keeps-ports", [TCP_DENY_METHODS], conn(port=9001), True, None),
    ("http-deny-with-methods-checks-method", [TCP_DENY_METHODS], req("POST", port=9000), True, None),
    ("tcp-deny-headers-only-denies-all",
     [ap("d", "DENY", [rule(when=[cond("request.headers[x]", ["y"])])])], conn(), False, "foo/d"),

    # -- JWT (no RequestAuthentication in nodeagent): fail closed
    ("jwt-allow-never-matches", [ap("a", rules=[rule(from_=[src(request_principals=["*"])])])],
     req(), False, None),
    ("jwt-deny-requires-token-denies", [ap("d", "DENY", [rule(from_=[src(not_request_principals=["*"])])])],
     req(), False, "foo/d"),
    ("jwt-deny-issuer-treated-as-match",
     [ap("d", "DENY", [rule(from_=[src(request_principals=["https://evil/*"])], to=[op(paths=["/x"])])])],
     req(path="/x"), False, "foo/d"),
    ("jwt-deny-keeps-other-fields",
     [ap("d", "DENY", [rule(from_=[src(request_principals=["https://evil/*"])], to=[op(paths=["/x"])])])],
     req(path="/y"), True, None),
    ("claims-allow-never-matches",
     [ap("a", rules=[rule(when=[cond("request.auth.claims[iss]", ["https://accounts.google.com"])])])],
     req(), False, None),
    ("envoy-filter-key-allow-never-matches",
     [ap("a", rules=[rule(when=[cond("experimental.envoy.filters.a.b[c]", ["d"])])])], req(), False, None),
    ("unknown-key-deny-matches", [ap("d", "DENY", [rule(when=[cond("no.such.key", ["x"])])])],
     req(), False, "foo/d"),
    ("invalid-cidr-allow-rule-dropped", [ap("a", rules=[rule(from_=[src(ip_blocks=["10.0.0.300"])])])],
     conn(), False, None),

    # -- serviceAccounts (Istio 1.24: "<ns>/<sa>" or "<sa>" in the policy's namespace)
    ("service-account-short", [ap("a", rules=[rule(from_=[src(service_accounts=["sleep"])])])],
     conn(), True, "foo/a"),
    ("service-account-qualified", [ap("a", rules=[rule(from_=[src(service_accounts=["bar/other"])])])],
     conn(principal=OTHER), True, "foo/a"),
    ("when-source-service-account", [ap("a", rules=[rule(when=[cond("source.serviceAccount", ["sleep"])])])],
     conn(), True, "foo/a"),
    ("service-account-other-ns", [ap("a", rules=[rule(from_=[src(service_accounts=["other"])])])],
     conn(principal=OTHER), False, None),

    # -- targetRef policies do not apply to workload traffic
    ("target-ref-ignored", [ap("gw", "DENY", [rule()], target_refs=[PolicyTargetReference(
        group="gateway.networking.k8s.io", kind="Gateway", name="waypoint")])], req(), True, None),
]


@pytest.mark.parametrize("policies,attrs,allowed,policy", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdict_table(policies, attrs, allowed, policy):
    v = evaluate(compile_policies(policies), attrs)
    assert (v.allowed, v.policy) == (allowed, policy), v.reason


def test_table_size():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------
# verdict details


def test_verdict_names_rule_and_reason():
    p = ap("multi", "DENY", [rule(to=[op(paths=["/a"])]), rule(to=[op(paths=["/b"])])])
    v = evaluate(compile_policies([p]), req(path="/b"))
    assert (v.allowed, v.policy, v.rule_index, v.action) == (False, "foo/multi", 1, "DENY")
    assert "foo/multi rules[1]" in v.reason


def test_custom_reason_is_explicit():
    p = ap("ext", "CUSTOM", [rule()], provider="my-opa")
    v = evaluate(compile_policies([p]), req())
    assert v.reason.startswith("CUSTOM provider my-opa not supported: denied")


def test_audit_matches_are_reported_separately():
    ps = compile_policies([ap("au", "AUDIT", [rule(to=[op(paths=["/secret*"])])]), ALLOW_ALL])
    hit = evaluate(ps, req(path="/secret/x"))
    miss = evaluate(ps, req(path="/public"))
    assert (hit.allowed, hit.policy, hit.audited) == (True, "foo/allow-all", ("foo/au",))
    assert (miss.allowed, miss.audited) == (True, ())


def test_default_reasons():
    assert "no ALLOW policy" in evaluate(compile_policies([]), conn()).reason
    assert "none matched" in evaluate(compile_policies([ALLOW_NOTHING]), conn()).reason


def test_denied_http_constants():
    assert (RBAC_DENIED_STATUS, RBAC_DENIED_BODY, RBAC_RESPONSE_FLAG) == (403, b"RBAC: access denied", "RBAC")


# --------------------------------------------------------------------------
# needs_l7, notes, skipped


def test_needs_l7_only_for_http_fields_in_enforcing_policies():
    assert not needs_l7(compile_policies([TCP_POLICY, DENY_ALL]))
    assert needs_l7(compile_policies([TCP_POLICY_METHODS]))
    assert needs_l7(compile_policies([ap("d", "DENY", [rule(when=[cond("request.headers[x]", ["y"])])])]))
    # AUDIT never changes a verdict, JWT fields are decided the same way at L4 and L7
    assert not needs_l7(compile_policies([ap("au", "AUDIT", [rule(to=[op(paths=["/x"])])])]))
    assert not needs_l7(compile_policies([ap("a", rules=[rule(from_=[src(request_principals=["*"])])])]))


def test_l4_verdict_equals_l7_verdict_when_no_l7_needed():
    policies = [TCP_POLICY, ap("d", "DENY", [rule(from_=[src(namespaces=["bar"])])]),
                ap("a2", rules=[rule(from_=[src(request_principals=["*"])])])]
    ps = compile_policies(policies)
    assert not needs_l7(ps)
    for principal in (SLEEP, OTHER, None):
        for port in (9000, 9001, 9002):
            c = conn(principal=principal, port=port)
            r = Request(c, host="h", method="GET", path="/")
            assert evaluate(ps, c).allowed == evaluate(ps, r).allowed


def test_notes_explain_dropped_rules():
    ps = compile_policies([TCP_POLICY_METHODS, TCP_DENY_METHODS])
    text = "\n".join(ps.notes)
    assert "foo/tcp-policy rules[0] (TCP).to[0]: methods is HTTP-only" in text
    assert "ALLOW rule never matches" in text
    assert "ignored (a DENY/AUDIT/CUSTOM rule only gets wider)" in text
    assert ps.notes_for(http=True) == ()   # both compile fully for HTTP requests
    assert len(ps.notes_for(http=False)) == 2 and all("(TCP)" in n for n in ps.notes_for(http=False))


def test_target_ref_policies_are_listed_as_skipped():
    p = ap("wp", rules=[rule()], target_refs=[PolicyTargetReference(kind="Service", name="httpbin")])
    ps = compile_policies([p])
    assert ps.policies == () and ps.skipped and "foo/wp" in ps.skipped[0]


def test_trust_domain_aliases():
    p = ap("a", rules=[rule(from_=[src(principals=["cluster.local/ns/foo/sa/sleep"])])])
    ps = compile_policies([p], trust_domain="td1", trust_domain_aliases=("old-td",))
    assert evaluate(ps, conn(principal="td1/ns/foo/sa/sleep")).allowed
    assert evaluate(ps, conn(principal="old-td/ns/foo/sa/sleep")).allowed
    assert not evaluate(ps, conn(principal="other-td/ns/foo/sa/sleep")).allowed


def test_request_headers_pairs_are_joined():
    r = Request(conn(), method="GET", path="/", headers=[("X-A", "1"), ("x-a", "2")])
    assert r.headers == {"x-a": "1,2"}


@pytest.mark.parametrize("raw,norm", [
    ("/a/b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b"), ("/../a", "/a"), ("/a/b/..", "/a/"),
    ("/a?x=/../y", "/a"), ("/a#frag", "/a"), ("\\a\\..\\b", "/b"), ("/a/%2E%2e/b", "/b"), ("", "/"),
    ("/a.b/c..d", "/a.b/c..d"), ("/%61dmin", "/admin"), ("/%41%5a%30%2D%5f%7E", "/AZ0-_~"),
    # Istio's documented example: BASE keeps %2f encoded and does not merge slashes
    ("/some%2fdata/%61%62%63", "/some%2fdata/abc"), ("/a//b", "/a//b"), ("/%2541", "/%2541"),
])
def test_normalize_path(raw, norm):
    assert normalize_path(raw) == norm


def test_normalized_target_keeps_the_query_for_forwarding():
    assert normalize_path("/a/../b?x=/../y#f", keep_query=True) == "/b?x=/../y"
    r = Request(conn(), method="GET", path="/p/./%61?q=1")
    assert (r.path, r.target) == ("/p/a", "/p/a?q=1")


def test_nul_in_path_is_refused():
    with pytest.raises(InvalidPath, match="%00"):
        Request(conn(), method="GET", path="/a%00b")


def test_unsupported_field_warnings():
    allow = ap("a", rules=[rule(from_=[src(request_principals=["*"])],
                                when=[cond("request.auth.claims[iss]", ["x"])])]).spec
    msgs = unsupported_field_warnings(allow)
    assert msgs[0] == ("spec.rules[0].from[0].source.requestPrincipals",
                       "nodeagent does not validate JWTs (no RequestAuthentication); "
                       "in this ALLOW policy the rule never matches")
    assert msgs[1] == ("spec.rules[0].when[0].key",
                       "request.auth.claims[iss] needs JWT validation (RequestAuthentication), which nodeagent "
                       "does not implement; in this ALLOW policy the rule never matches")
    deny = ap("d", "DENY", [rule(from_=[src(not_request_principals=["*"])])]).spec
    assert "in this DENY policy the condition is treated as matching" in unsupported_field_warnings(deny)[0][1]
    custom = ap("c", "CUSTOM", [rule()], provider="opa").spec
    assert unsupported_field_warnings(custom) == [(
        "spec.action", "CUSTOM provider opa not supported: nodeagent has no external authorizer, "
                       "so requests matching a rule are denied")]
    assert unsupported_field_warnings(HTTPBIN.spec) == []


# --------------------------------------------------------------------------
# index over a snapshot, speed


class _FakeSnapshot:
    """Only the one method AuthorizationIndex reads; counts calls to prove caching."""

    def __init__(self, resources):
        self.resources = resources
        self.calls = 0

    def authorization_policies_for(self, namespace, labels):
        self.calls += 1
        return tuple(r for r in self.resources if r.namespace in ("istio-system", namespace)
                     and (r.spec.selector is None
                          or all(labels.get(k) == v for k, v in r.spec.selector.match_labels.items())))


def test_index_caches_per_workload():
    snap = _FakeSnapshot([HTTPBIN, ap("only-v2", "DENY", [rule()], selector={"version": "v2"})])
    idx = AuthorizationIndex(snap)
    v1 = idx.for_workload("foo", {"app": "httpbin", "version": "v1"})
    assert idx.for_workload("foo", {"version": "v1", "app": "httpbin"}) is v1
    assert snap.calls == 1
    v2 = idx.for_workload("foo", {"app": "httpbin", "version": "v2"})
    assert [p.name for p in v2.deny] == ["foo/only-v2"] and v1.deny == ()
    assert v2.allow[0] is v1.allow[0]  # each policy compiled once per snapshot


def test_evaluation_is_a_few_microseconds():
    ps = compile_policies([HTTPBIN, TCP_POLICY, DENY_AND_ALLOW[0],
                           ap("d2", "DENY", [rule(to=[op(paths=["/admin*"])], when=[cond("request.headers[x-env]", ["prod"])])]),
                           ap("au", "AUDIT", [rule(to=[op(paths=["/secret*"])])])])
    r = req("POST", "/data")
    n = 20000
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            evaluate(ps, r)
        best = min(best, (time.perf_counter() - t0) / n)
    print(f"evaluate: {best * 1e6:.2f} us per request (5 policies)")
    assert evaluate(ps, r).allowed
    assert best < 100e-6  # generous bound for a shared CI machine; typical is a few us
