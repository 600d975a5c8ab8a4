"""SPIFFE IDs and principals."""
from __future__ import annotations

import pytest

from policy.principal import (
    PrincipalError, SpiffeId, expand_trust_domain_aliases, namespace_of_principal, parse_principal,
    parse_spiffe_id, principal_of, same_trust_domain, trust_domain_of,
)


def test_parse_and_format_round_trip():
    sid = parse_spiffe_id("spiffe://cluster.local/ns/foo/sa/sleep")
    assert sid == SpiffeId("cluster.local", "foo", "sleep")
    assert sid.uri == "spiffe://cluster.local/ns/foo/sa/sleep" == str(sid)
    assert sid.principal == "cluster.local/ns/foo/sa/sleep"
    assert parse_principal(sid.principal) == sid


def test_scheme_is_case_insensitive():
    assert parse_spiffe_id("SPIFFE://td/ns/a/sa/b").principal == "td/ns/a/sa/b"


@pytest.mark.parametrize("bad", [
    "cluster.local/ns/foo", "cluster.local/ns/foo/sa/", "cluster.local/namespace/foo/sa/x",
    "td/ns/foo/sa/x/extra", "/ns/foo/sa/x", "td/ns/f o/sa/x", "",
])
def test_malformed_principals_are_refused_with_a_reason(bad):
    with pytest.raises(PrincipalError, match="principal|invalid|empty"):
        parse_principal(bad)


def test_not_a_spiffe_uri():
    with pytest.raises(PrincipalError, match="must start with spiffe://"):
        parse_spiffe_id("https://td/ns/a/sa/b")


def test_principal_of_accepts_both_forms():
    assert principal_of("spiffe://td/ns/a/sa/b") == "td/ns/a/sa/b" == principal_of("td/ns/a/sa/b")


def test_namespace_comes_only_from_an_identity():
    assert namespace_of_principal("cluster.local/ns/foo/sa/x") == "foo"
    assert namespace_of_principal(None) is None
    assert namespace_of_principal("not-a-principal") is None


def test_trust_domain_helpers():
    assert trust_domain_of("example.org/ns/a/sa/b") == "example.org"
    assert same_trust_domain("Example.ORG", "example.org")
    assert not same_trust_domain("a.org", "b.org")


@pytest.mark.parametrize("principals,expected", [
    (["cluster.local/ns/a/sa/b"], ("td1/ns/a/sa/b", "old/ns/a/sa/b", "cluster.local/ns/a/sa/b")),
    (["old/ns/a/sa/b"], ("td1/ns/a/sa/b", "old/ns/a/sa/b")),
    (["foreign/ns/a/sa/b"], ("foreign/ns/a/sa/b",)),
    (["*", "*/sa/b"], ("*", "*/sa/b")),
])
def test_expand_trust_domain_aliases(principals, expected):
    assert expand_trust_domain_aliases(principals, "td1", ("old",)) == expected


def test_expand_without_aliases_keeps_cluster_local_meaning_local():
    assert expand_trust_domain_aliases(["cluster.local/ns/a/sa/b"], "cluster.local") == \
        ("cluster.local/ns/a/sa/b",)
