"""Properties of the verdict that must hold for any policies (hypothesis, bounded)."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.authz import Connection, Request, compile_policies, evaluate, needs_l7
from policy.model import (
    AuthorizationPolicy, Condition, Operation, Resource, Rule, RuleFrom, RuleTo, Source, SourceRef,
)

PRINCIPALS = ["cluster.local/ns/foo/sa/a", "cluster.local/ns/bar/sa/b", None]
L4_SOURCE = st.fixed_dictionaries({}, optional={
    "principals": st.lists(st.sampled_from(["cluster.local/ns/foo/sa/a", "*", "cluster.local/ns/bar/*"]),
                           min_size=1, max_size=2),
    "not_principals": st.lists(st.sampled_from(["*", "cluster.local/ns/foo/sa/a"]), min_size=1, max_size=2),
    "namespaces": st.lists(st.sampled_from(["foo", "bar", "*"]), min_size=1, max_size=2),
    "not_namespaces": st.lists(st.sampled_from(["foo", "bar"]), min_size=1, max_size=2),
    "ip_blocks": st.lists(st.sampled_from(["10.0.0.0/8", "192.168.1.1"]), min_size=1, max_size=2),
    "request_principals": st.lists(st.sampled_from(["*", "iss/sub"]), min_size=1, max_size=1),
})
OPERATION = st.fixed_dictionaries({}, optional={
    "ports": st.lists(st.sampled_from(["80", "9000"]), min_size=1, max_size=2),
    "not_ports": st.lists(st.sampled_from(["22"]), min_size=1, max_size=1),
    "methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2),
    "paths": st.lists(st.sampled_from(["/a*", "/b", "*"]), min_size=1, max_size=2),
    "not_hosts": st.lists(st.sampled_from(["h", "*.x"]), min_size=1, max_size=1),
})
CONDITION = st.builds(lambda k, v, neg: Condition(k, () if neg else tuple(v), tuple(v) if neg else ()),
                      st.sampled_from(["source.namespace", "destination.port", "request.headers[x]",
                                       "request.auth.claims[iss]"]),
                      st.lists(st.sampled_from(["foo", "80", "y"]), min_size=1, max_size=2), st.booleans())
RULE = st.builds(
    lambda f, t, w: Rule(from_=tuple(RuleFrom(Source(**{k: tuple(v) for k, v in s.items()})) for s in f),
                         to=tuple(RuleTo(Operation(**{k: tuple(v) for k, v in o.items()})) for o in t),
                         when=tuple(w)),
    st.lists(L4_SOURCE, max_size=2), st.lists(OPERATION, max_size=2), st.lists(CONDITION, max_size=2))


def policy(i: int, action: str, rules) -> Resource:
    return Resource("AuthorizationPolicy", "security.istio.io/v1", f"p{i}", "foo", {}, {},
                    AuthorizationPolicy(action=action, rules=tuple(rules)), SourceRef("gen.yaml", i + 1))


POLICIES = st.lists(st.tuples(st.sampled_from(["ALLOW", "DENY", "CUSTOM"]), st.lists(RULE, max_size=3)),
                    max_size=4).map(lambda ps: [policy(i, a, r) for i, (a, r) in enumerate(ps)])
ATTRS = st.builds(
    lambda p, ip, port, m, path, hdr: Request(
        Connection(source_principal=p, source_ip=ip, destination_ip="10.1.1.1", destination_port=port),
        host="h", method=m, path=path, headers={"x": hdr} if hdr else {}),
    st.sampled_from(PRINCIPALS), st.sampled_from(["10.0.0.1", "192.168.1.1", "172.16.0.1"]),
    st.sampled_from([80, 9000, 22]), st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from(["/a/b", "/b", "/c"]), st.sampled_from(["", "y", "z"]))

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(POLICIES, st.lists(RULE, max_size=3), ATTRS)
def test_audit_never_changes_the_verdict(policies, audit_rules, attrs):
    base = evaluate(compile_policies(policies), attrs)
    with_audit = evaluate(compile_policies(policies + [policy(99, "AUDIT", audit_rules)]), attrs)
    assert (base.allowed, base.policy, base.rule_index) == \
           (with_audit.allowed, with_audit.policy, with_audit.rule_index)


@SETTINGS
@given(POLICIES, ATTRS)
def test_deny_all_always_wins(policies, attrs):
    for a in (attrs, attrs.connection):
        v = evaluate(compile_policies(policies + [policy(99, "DENY", [Rule()])]), a)
        assert not v.allowed and v.action in ("DENY", "CUSTOM")


@SETTINGS
@given(POLICIES, ATTRS)
def test_connect_time_verdict_equals_per_request_verdict_when_no_l7_needed(policies, attrs):
    ps = compile_policies(policies)
    if not needs_l7(ps):
        assert evaluate(ps, attrs.connection).allowed == evaluate(ps, attrs).allowed


@SETTINGS
@given(POLICIES, ATTRS)
def test_adding_a_deny_policy_only_takes_access_away(policies, attrs):
    ps = compile_policies(policies)
    before = evaluate(ps, attrs).allowed
    extra_deny = [policy(98, "DENY", [Rule(to=(RuleTo(Operation(methods=("PUT",))),))])]
    after = evaluate(compile_policies(policies + extra_deny), attrs).allowed
    assert not (after and not before)
