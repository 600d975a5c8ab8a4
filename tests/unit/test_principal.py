"""SPIFFE IDs and principals."""
from __future__ import annotations

import pytest

from policy.principal import (
    PrincipalError, SpiffeId, expand_trust_domain_aliases, format_principal, namespace_of_principal,
    parse_principal, parse_spiffe_id, principal_of, same_trust_domain, spiffe_uri, split_principal,
    split_spiffe_id, strip_spiffe_scheme, trust_domain_of, workload_names, workload_path,
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


def test_shared_split_keeps_every_segment_as_written():
    assert split_principal("td/ns/a/sa/b") == ("td", ["ns", "a", "sa", "b"])
    assert split_principal("td/node/n1") == ("td", ["node", "n1"])
    assert split_principal("td") == ("td", []) == split_principal("td/")
    assert split_principal("/ns//sa/B_1") == ("", ["ns", "", "sa", "B_1"])
    assert split_spiffe_id("SPIFFE://td/node/n1") == ("td", ["node", "n1"])
    with pytest.raises(PrincipalError, match="must start with spiffe://"):
        split_spiffe_id("td/node/n1")


def test_strip_scheme_and_workload_shape():
    assert strip_spiffe_scheme("Spiffe://td/x") == "td/x"
    assert strip_spiffe_scheme("td/x") is None and strip_spiffe_scheme("spiffe:/td") is None
    assert workload_names(["ns", "a", "sa", "b"]) == ("a", "b")
    for shape in (["ns", "a", "sa"], ["ns", "a", "sa", "b", ""], ["node", "n"], ["sa", "a", "ns", "b"], []):
        assert workload_names(shape) is None


def test_one_principal_format():
    assert workload_path("a", "b") == "/ns/a/sa/b"
    assert format_principal("td", "a", "b") == "td/ns/a/sa/b" == SpiffeId("td", "a", "b").principal
    assert spiffe_uri("td/ns/a/sa/b") == "spiffe://td/ns/a/sa/b" == SpiffeId("td", "a", "b").uri


def test_policy_stays_lenient_where_the_issuer_is_strict():
    # Names the CA would refuse still match in policies: peers of other meshes may carry them.
    sid = parse_spiffe_id("spiffe://Example.ORG/ns/Team_A/sa/" + "x" * 300)
    assert (sid.trust_domain, sid.namespace) == ("Example.ORG", "Team_A")
    with pytest.raises(PrincipalError, match="principal of the form"):
        parse_spiffe_id("spiffe://td/node/n1")
