"""Pure identity helpers: SPIFFE IDs, X.509 building blocks, revocation codec,
the peer-certificate check, retry backoff."""
from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from nodeagent.identity import certs
from nodeagent.identity.errors import CAError, PeerRejected
from nodeagent.identity.manager import backoff
from nodeagent.identity.spiffe import InvalidSpiffeId, SpiffeId
from nodeagent.identity.tls import verify_peer_certificate
from nodeagent.identity.trust import RevocationList, TrustBundle

NOW = 1_800_000_000.0
TD = "cluster.local"


def test_workload_id_round_trip():
    sid = SpiffeId.workload("bookinfo", "reviews")
    assert sid.uri == "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    assert sid.principal == "cluster.local/ns/bookinfo/sa/reviews"
    assert SpiffeId.parse(sid.uri) == sid
    assert sid.is_workload and sid.namespace == "bookinfo" and sid.service_account == "reviews"


def test_workload_ids_agree_with_policy_principals():
    from policy.principal import parse_spiffe_id, principal_of
    sid = SpiffeId.workload("bookinfo", "reviews", "example.org")
    assert parse_spiffe_id(sid.uri).principal == sid.principal == principal_of(sid.uri)
    assert str(parse_spiffe_id(sid.uri)) == sid.uri == str(sid)


@pytest.mark.parametrize("text,message", [
    ("SPIFFE://cluster.local/ns/a/sa/b",
     "'SPIFFE://cluster.local/ns/a/sa/b' is not a SPIFFE ID (must start with spiffe://)"),
    ("spiffe://Cluster.local/ns/a/sa/b",
     "trust domain 'Cluster.local' is not valid (lower-case letters, digits, '.', '-', '_')"),
    ("spiffe://td/ns/a_b/sa/c",
     "namespace 'a_b' is not a valid name (lower-case letters, digits, '-' and '.', "
     "starting and ending with a letter or digit)"),
    ("spiffe://td/ns/a/sa/b/",
     "'spiffe://td/ns/a/sa/b/': expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> "
     "or spiffe://<trust-domain>/node/<name>"),
])
def test_issuer_is_stricter_than_policy_with_its_own_messages(text, message):
    from policy.principal import PrincipalError, parse_spiffe_id
    with pytest.raises(InvalidSpiffeId) as err:
        SpiffeId.parse(text)
    assert str(err.value) == message
    if text.endswith("/"):
        with pytest.raises(PrincipalError):
            parse_spiffe_id(text)
    else:  # policy matching stays lenient about case and '_'
        assert parse_spiffe_id(text).principal == text.split("://", 1)[1]


def test_node_id_round_trip():
    sid = SpiffeId.parse("spiffe://example.org/node/worker-1")
    assert sid == SpiffeId.for_node("worker-1", "example.org")
    assert not sid.is_workload and sid.uri == "spiffe://example.org/node/worker-1"


@pytest.mark.parametrize("text", [
    "cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a", "spiffe://cluster.local/ns/a/sa/b/x",
    "spiffe://cluster.local/ns/A/sa/b", "spiffe:///ns/a/sa/b", "spiffe://Bad_TD!/ns/a/sa/b",
    "spiffe://cluster.local/node/", "spiffe://cluster.local/ns//sa/b",
])
def test_bad_ids_are_refused_with_a_reason(text):
    with pytest.raises(InvalidSpiffeId) as err:
        SpiffeId.parse(text)
    assert str(err.value)


@pytest.fixture(scope="module")
def root():
    key = certs.generate_key()
    return certs.make_root(key, TD, now=NOW, lifetime=10 * 86400, generation=1), key


def leaf(root, identity, *, not_before=NOW - 60, not_after=NOW + 3600):
    cert, key = root
    return certs.sign_leaf(certs.LeafRequest(identity, certs.generate_key().public_key(),
                                             not_before, not_after), cert, key)


def test_leaf_has_one_spiffe_san_ecdsa_sha256(root):
    sid = SpiffeId.workload("ns", "sa")
    cert = leaf(root, sid)
    assert certs.spiffe_id_of(cert) == sid
    assert certs.uri_sans(cert) == [sid.uri]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.public_key().curve.name == "secp256r1"
    assert certs.issued_by(cert, root[0])
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False


def test_csr_signature_and_key_type_are_checked():
    key = certs.generate_key()
    pem = certs.make_csr(key, SpiffeId.workload("ns", "sa"))
    assert certs.load_csr(pem).is_signature_valid
    # One bit of the signature flipped: must be refused.
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(der)
    tampered[-5] ^= 0x01
    with pytest.raises(certs.CertificateError, match="signature"):
        certs.load_csr(x509.load_der_x509_csr(bytes(tampered)).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(certs.CertificateError, match="not a PEM"):
        certs.load_csr(b"hello")


def test_csr_with_rsa_key_is_refused():
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()))
    with pytest.raises(certs.CertificateError, match="P-256"):
        certs.load_csr(csr.public_bytes(serialization.Encoding.PEM))


def test_serial_parsing():
    assert certs.parse_serial("0x1F") == 31
    assert certs.parse_serial("1f:00") == 0x1F00
    assert certs.parse_serial(certs.serial_hex(123456789)) == 123456789
    for bad in ("xyz", "0", ""):
        with pytest.raises(certs.CertificateError):
            certs.parse_serial(bad)


def test_revocation_list_json_round_trip_and_errors():
    rl = RevocationList(3, frozenset({0xABC}), frozenset({"spiffe://cluster.local/ns/a/sa/b"}))
    assert RevocationList.from_json(rl.to_json()) == rl
    with pytest.raises(CAError, match="revocations.json"):
        RevocationList.from_json({"version": -1}, "revocations.json")
    with pytest.raises(CAError, match="not JSON"):
        RevocationList.from_bytes(b"{", "x")


def test_trust_bundle_round_trip_and_issuer(root):
    other = certs.make_root(certs.generate_key(), TD, now=NOW, lifetime=86400, generation=2)
    bundle = TrustBundle((root[0], other))
    assert TrustBundle.from_pem(bundle.pem).version == bundle.version
    assert bundle.issuer_of(leaf(root, SpiffeId.workload("a", "b"))) == root[0]
    assert TrustBundle((other,)).issuer_of(leaf(root, SpiffeId.workload("a", "b"))) is None
    assert TrustBundle((other,)).version != bundle.version


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def test_peer_check_accepts_valid_and_refuses_each_problem(root):
    sid = SpiffeId.workload("ns", "sa")
    good = leaf(root, sid)
    ok = dict(trust_domain=TD, revocations=RevocationList(), now=NOW)
    assert verify_peer_certificate(der(good), **ok) == sid
    cases = [
        (None, ok, "no certificate"),
        (der(leaf(root, SpiffeId.workload("ns", "sa", "evil.org"))), ok, "outside the trust domain"),
        (der(leaf(root, SpiffeId.for_node("n1"))), ok, "not a workload"),
        (der(good), dict(ok, now=NOW + 3600), "expired"),
        (der(good), dict(ok, now=NOW - 61), "not valid before"),
        (der(good), dict(ok, revocations=RevocationList(1, frozenset({good.serial_number}))), "serial"),
        (der(good), dict(ok, revocations=RevocationList(1, identities=frozenset({sid.uri}))),
         "identity spiffe://cluster.local/ns/ns/sa/sa is revoked"),
        (der(good), dict(ok, expected=SpiffeId.workload("ns", "other")), "expected"),
    ]
    for data, kwargs, message in cases:
        with pytest.raises(PeerRejected, match=message):
            verify_peer_certificate(data, **kwargs)


def test_peer_without_spiffe_san_is_refused(root):
    cert = certs.sign_leaf(certs.LeafRequest(None, certs.generate_key().public_key(), NOW - 60, NOW + 60,
                                             dns_names=("localhost",)), *root)
    with pytest.raises(PeerRejected, match="exactly one spiffe"):
        verify_peer_certificate(der(cert), trust_domain=TD, revocations=RevocationList(), now=NOW)


def test_backoff_doubles_from_60s_and_caps_at_10_min():
    assert [backoff(n) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


def test_validity_comes_from_the_request_not_the_wall_clock(root):
    cert = leaf(root, SpiffeId.workload("a", "b"), not_before=NOW, not_after=NOW + 10)
    assert certs.not_before(cert) == NOW and certs.not_after(cert) == NOW + 10
