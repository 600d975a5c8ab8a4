"""The fallbacks certs.py uses on cryptography releases without load_pem_x509_certificates,
not_valid_*_utc and verify_directly_issued_by (Debian 12's 38.0.4) give the same answers as
those APIs; exercised here whatever release is installed."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from nodeagent.identity import certs

NOW = 1_800_000_000.0


def _cert(subject: str, key, issuer: str, issuer_key, algorithm=hashes.SHA256()) -> x509.Certificate:
    start = dt.datetime.fromtimestamp(NOW - 60, tz=dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(hours=1))
            .sign(issuer_key, algorithm))


@pytest.mark.parametrize("make_key,algorithm", [
    (lambda: ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
    (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), hashes.SHA256()),
    (lambda: ed25519.Ed25519PrivateKey.generate(), None),
], ids=["p256", "p384", "rsa", "ed25519"])
def test_signature_fallback_accepts_the_issuer_and_refuses_another_key(make_key, algorithm):
    issuer_key, other_key = make_key(), make_key()
    issuer = _cert("root", issuer_key, "root", issuer_key, algorithm)
    leaf = _cert("leaf", certs.generate_key(), "root", issuer_key, algorithm)
    certs._verify_signature(leaf, issuer.public_key())
    with pytest.raises(InvalidSignature):
        certs._verify_signature(leaf, other_key.public_key())
    assert certs.issued_by(leaf, issuer)
    impostor = _cert("root", other_key, "root", other_key, algorithm)
    assert not certs.issued_by(leaf, impostor)
    if hasattr(x509.Certificate, "verify_directly_issued_by"):   # the native answer agrees
        leaf.verify_directly_issued_by(issuer)
        with pytest.raises(InvalidSignature):
            leaf.verify_directly_issued_by(impostor)


def test_pem_list_fallback_matches_native_loading():
    key = certs.generate_key()
    a, b = _cert("a", key, "a", key), _cert("b", key, "a", key)
    pem = b"junk before\n" + certs.cert_to_pem(a) + b"# comment\n" + certs.cert_to_pem(b)
    loaded = certs._load_pem_certificates(pem)
    assert loaded == [a, b]
    if hasattr(x509, "load_pem_x509_certificates"):
        assert x509.load_pem_x509_certificates(pem) == loaded
    for bad in (b"", b"no pem here", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValueError):
            certs._load_pem_certificates(bad)
        with pytest.raises(certs.CertificateError):
            certs.load_certs(bad)


def test_validity_is_aware_utc():
    key = certs.generate_key()
    cert = _cert("a", key, "a", key)
    assert certs.not_before_utc(cert) == dt.datetime.fromtimestamp(NOW - 60, tz=dt.timezone.utc)
    assert certs.not_after(cert) - certs.not_before(cert) == 3600
    assert certs.not_after_utc(cert).tzinfo is not None
