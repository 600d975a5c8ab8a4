"""policy.cluster: the effective DestinationRule tls as TLS origination settings (Istio's
precedence: host level, its portLevelSettings entry, the subset, the subset's port entry),
and nodeagent.proxy.origination's context cache and SAN matching (no sockets)."""
from __future__ import annotations

import os
import ssl

import pytest

from policy.cluster import ClusterKey, cluster_policy
from policy.loader import load_text
from policy.snapshot import build_snapshot
from nodeagent.proxy import origination
from tests.integration.tls_upstream import TestCA

CONFIG = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 9000, name: grpc, protocol: GRPC}
  endpoints:
  - {address: 127.0.0.1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: shop}
spec:
  host: api.example.com
  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: /host.pem}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, sni: port.example.com}
    - port: {number: 9000}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, subjectAltNames: [a.example.com]}
      portLevelSettings:
      - port: {number: 443}
        tls: {mode: DISABLE}
  - name: v2
    labels: {version: v2}
"""


@pytest.fixture(scope="module")
def snap():
    res = load_text(CONFIG, "api.yaml")
    assert res.errors == []
    return build_snapshot(res.resources)


def o(snap, subset, port):
    return cluster_policy(snap, ClusterKey("api.example.com", subset, port), "shop").origination


def test_host_level_with_the_host_as_default_sni(snap):
    t = o(snap, None, 80)
    assert (t.mode, t.ca_certificates, t.sni, t.field) == ("SIMPLE", "/host.pem", "api.example.com",
                                                          "spec.trafficPolicy.tls")
    assert t.ref == "DestinationRule shop/api" and t.source == "api.yaml:15"


def test_port_level_entry_replaces_the_host_level_tls(snap):
    t = o(snap, None, 443)
    assert (t.ca_certificates, t.sni, t.field) == (None, "port.example.com",
                                                   "spec.trafficPolicy.portLevelSettings[0].tls")
    # an entry without tls resets tls to the default (external service: plaintext)
    assert o(snap, None, 9000) is None
    assert cluster_policy(snap, ClusterKey("api.example.com", None, 9000), "shop").tls_mode == "DISABLE"


def test_subset_overrides_and_its_port_entry_wins(snap):
    t = o(snap, "v1", 80)
    assert (t.mode, t.client_certificate, t.private_key, t.subject_alt_names, t.field) == (
        "MUTUAL", "/c.pem", "/k.pem", ("a.example.com",), "spec.subsets[0].trafficPolicy.tls")
    assert o(snap, "v1", 443) is None  # the subset's port entry: DISABLE
    assert o(snap, "v2", 80).field == "spec.trafficPolicy.tls"  # a subset without trafficPolicy inherits


def test_contexts_are_built_once_and_rebuilt_when_a_file_changes(tmp_path, snap):
    ca = TestCA(tmp_path, "unit")
    other = TestCA(tmp_path, "unit2")
    t = o(snap, None, 80)
    import dataclasses
    t = dataclasses.replace(t, ca_certificates=str(ca.cert_file))
    first = origination.contexts_for(t, ("http/1.1",))
    assert origination.contexts_for(t, ("http/1.1",)) is first
    assert first.get(("http/1.1",)) is first.get(("http/1.1",))
    os.replace(other.cert_file, ca.cert_file)
    st = os.stat(ca.cert_file)
    os.utime(ca.cert_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = origination.contexts_for(t, ("http/1.1",))
    assert second is not first


def test_unreadable_and_unparsable_files_name_the_field_and_file(tmp_path, snap):
    import dataclasses
    t = dataclasses.replace(o(snap, None, 80), ca_certificates=str(tmp_path / "missing.pem"))
    with pytest.raises(origination.ConfigFileError) as info:
        origination.contexts_for(t)
    msg = str(info.value)
    assert msg.startswith("api.yaml:15: DestinationRule shop/api: spec.trafficPolicy.tls.caCertificates: cannot read")
    assert "missing.pem" in msg
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    t = dataclasses.replace(t, ca_certificates=str(tmp_path / "junk.pem"))
    with pytest.raises(origination.ConfigFileError) as info:
        origination.contexts_for(t)
    assert "caCertificates" in str(info.value) and "junk.pem holds no usable PEM CA certificate" in str(info.value)
    m = dataclasses.replace(o(snap, "v1", 80), client_certificate=str(tmp_path / "junk.pem"),
                            private_key=str(tmp_path / "junk.pem"), ca_certificates=None)
    with pytest.raises(origination.ConfigFileError) as info:
        origination.build_context(m)
    assert "spec.subsets[0].trafficPolicy.tls.clientCertificate" in str(info.value)


def test_san_matching_as_envoy_exact_matchers():
    cert = {"subjectAltName": (("DNS", "*.example.com"), ("URI", "spiffe://td/ns/a/sa/b"), ("IP Address", "10.0.0.1"))}
    assert origination.san_matches(cert, ("api.example.com",))
    assert not origination.san_matches(cert, ("a.b.example.com",))
    assert not origination.san_matches(cert, ("example.com",))
    assert origination.san_matches(cert, ("nope", "spiffe://td/ns/a/sa/b"))
    assert origination.san_matches(cert, ("10.0.0.1",))
    assert not origination.san_matches(cert, ("10.0.0.2", "spiffe://td/ns/a/sa/c"))
    assert not origination.san_matches({}, ("api.example.com",))


def test_insecure_skip_verify_context_verifies_nothing(snap):
    import dataclasses
    t = dataclasses.replace(o(snap, None, 80), insecure_skip_verify=True, ca_certificates="/does/not/matter")
    ctx = origination.build_context(t, ("h2",))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


WILDCARD = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wiki, namespace: shop}
spec:
  hosts: ["*.wikipedia.org"]
  location: MESH_EXTERNAL
  resolution: NONE
  ports:
  - {number: 443, name: https, protocol: HTTPS}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wiki, namespace: shop}
spec:
  host: "*.wikipedia.org"
  trafficPolicy:
    tls: {mode: SIMPLE}
  subsets:
  - name: named
    labels: {v: "1"}
    trafficPolicy:
      tls: {mode: SIMPLE, sni: en.wikipedia.org}
"""


def test_a_wildcard_host_without_sni_or_sans_is_warned_and_fails_closed():
    """No server name to check: a chain check alone would accept any certificate the CA
    issued, so the connection fails (503 UF) rather than going out unverified."""
    import asyncio

    loaded = load_text(WILDCARD, "wiki.yaml")
    assert loaded.ok, loaded.errors
    warned = [str(w) for w in loaded.warnings if "wildcard" in str(w)]
    assert len(warned) == 1 and "spec.trafficPolicy.tls" in warned[0] and "wiki.yaml:" in warned[0]
    snapshot = build_snapshot(loaded.resources)
    origin = cluster_policy(snapshot, ClusterKey("*.wikipedia.org", None, 443), "shop").origination
    assert origin is not None and origin.sni is None

    class Base:
        calls = 0

        async def connect(self, *args):
            Base.calls += 1
            raise AssertionError("no TCP connection may be opened")

    key = ClusterKey("*.wikipedia.org", None, 443)
    conn = origination._originating(origin, Base(), None, None, key)
    assert conn.error and "wildcard" in conn.error and "sni" in conn.error
    with pytest.raises(OSError):
        asyncio.run(conn.connect(lambda: None, "198.51.100.7", 443, 1.0))
    assert Base.calls == 0
    # with an sni (the subset), the name is checked and nothing is refused up front
    named = cluster_policy(snapshot, ClusterKey("*.wikipedia.org", "named", 443), "shop").origination
    assert named.sni == "en.wikipedia.org"
    assert origination._originating(named, Base(), None, None, ClusterKey("*.wikipedia.org", "named", 443)).error is None


def test_ca_crl_is_part_of_the_settings_and_checked_for_the_whole_chain(tmp_path, snap):
    import dataclasses
    ca = TestCA(tmp_path, "crlunit")
    leaf, _ = ca.issue("leaf", dns=["api.example.com"])
    crl = ca.crl([leaf])
    t = dataclasses.replace(o(snap, None, 80), ca_certificates=str(ca.cert_file), ca_crl=str(crl))
    assert t.settings() != dataclasses.replace(t, ca_crl=None).settings()  # another context, not a shared one
    ctx = origination.build_context(t)
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN == ssl.VERIFY_CRL_CHECK_CHAIN
    assert ctx.cert_store_stats()["crl"] == 1
    plain = origination.build_context(dataclasses.replace(t, ca_crl=None))
    assert plain.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF == 0
    # insecureSkipVerify verifies nothing: the list is not even read
    skip = dataclasses.replace(t, insecure_skip_verify=True, ca_crl=str(tmp_path / "missing-crl.pem"))
    assert origination.build_context(skip).verify_mode == ssl.CERT_NONE


def test_an_unreadable_or_wrong_ca_crl_file_names_the_field_and_file(tmp_path, snap):
    import dataclasses
    ca = TestCA(tmp_path, "crlbad")
    t = dataclasses.replace(o(snap, None, 80), ca_certificates=str(ca.cert_file),
                            ca_crl=str(tmp_path / "missing-crl.pem"))
    with pytest.raises(origination.ConfigFileError) as info:
        origination.contexts_for(t)
    assert str(info.value).startswith("api.yaml:15: DestinationRule shop/api: spec.trafficPolicy.tls.caCrl: "
                                      "cannot read")
    # a CA certificate is not a revocation list
    t = dataclasses.replace(t, ca_crl=str(ca.cert_file))
    with pytest.raises(origination.ConfigFileError) as info:
        origination.contexts_for(t)
    assert f"tls.caCrl: {ca.cert_file} holds no PEM certificate revocation list" in str(info.value)
    (tmp_path / "broken-crl.pem").write_text("-----BEGIN X509 CRL-----\nnot base64 at all\n-----END X509 CRL-----\n")
    t = dataclasses.replace(t, ca_crl=str(tmp_path / "broken-crl.pem"))
    with pytest.raises(origination.ConfigFileError) as info:
        origination.contexts_for(t)
    assert "broken-crl.pem is not a usable PEM certificate revocation list" in str(info.value)
