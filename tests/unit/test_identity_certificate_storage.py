"""WorkloadCertificate keeps DER and the few values connections read, not parsed
cryptography objects (their parsed form and cached extensions cost ~4 KiB each per identity,
docs/operations.md "Memory"); what it hands out is the same as before."""
from __future__ import annotations

import asyncio
import ssl

import pytest
from cryptography import x509

from nodeagent.identity import certs
from nodeagent.identity.ca import CADirectory, LocalCA
from nodeagent.identity.manager import CertificateManager, WorkloadCertificate
from nodeagent.identity.spiffe import SpiffeId
from nodeagent.identity.tls import build_context
from nodeagent.identity.trust import TrustBundle

T0 = 1_800_000_000.0
WEB = SpiffeId.workload("shop", "web")


@pytest.fixture
def issued(tmp_path):
    directory = CADirectory.init(tmp_path / "ca", now=T0 - 3600)
    key = certs.generate_key()
    result = LocalCA(directory, clock=lambda: T0).sign_csr(certs.make_csr(key, WEB), WEB, 3600)
    return result, certs.key_to_pem(key)


def test_keeps_der_and_answers_as_the_parsed_certificate_would(issued):
    result, key_pem = issued
    cert = WorkloadCertificate(WEB, result.certificate, result.chain, key_pem)
    for name in WorkloadCertificate.__slots__:
        value = getattr(cert, name)
        assert not isinstance(value, x509.Certificate)
        assert not any(isinstance(item, x509.Certificate) for item in (value if isinstance(value, tuple) else ()))
    assert cert.serial == result.certificate.serial_number
    assert cert.not_before == certs.not_before(result.certificate) == T0 - certs.CLOCK_SKEW_ALLOWANCE
    assert cert.not_after == certs.not_after(result.certificate) == T0 + 3600
    assert cert.renew_at == T0 + (3600 - certs.CLOCK_SKEW_ALLOWANCE) / 2
    assert cert.certificate == result.certificate and cert.chain == result.chain
    assert cert.chain_pem == certs.certs_to_pem((result.certificate, *result.chain))
    assert certs.spiffe_id_of(cert.certificate) == WEB
    build_context(True, cert, TrustBundle(result.chain))  # OpenSSL takes the chain and the key


def test_is_immutable_compares_by_content_and_never_shows_the_key(issued):
    result, key_pem = issued
    cert = WorkloadCertificate(WEB, result.certificate, result.chain, key_pem)
    with pytest.raises(AttributeError):
        cert.serial = 1
    with pytest.raises(AttributeError):
        cert.extra = 1
    same = WorkloadCertificate(WEB, result.certificate, result.chain, key_pem)
    assert cert == same and hash(cert) == hash(same)
    assert cert != WorkloadCertificate(WEB, result.certificate, result.chain, certs.key_to_pem(certs.generate_key()))
    assert "PRIVATE" not in repr(cert) and certs.serial_hex(cert.serial) in repr(cert)


def test_the_manager_hands_out_der_backed_certificates(tmp_path):
    directory = CADirectory.init(tmp_path / "ca", now=T0 - 3600)
    manager = CertificateManager(LocalCA(directory, clock=lambda: T0), trust_domain="cluster.local",
                                 clock=lambda: T0)
    manager.add_workload(WEB)
    asyncio.run(manager.refresh())
    cert = manager.certificate(WEB)
    assert isinstance(cert.der, bytes) and ssl.DER_cert_to_PEM_cert(cert.der).encode().strip() in cert.chain_pem
    assert certs.issued_by(cert.certificate, manager.trust_bundle.roots[0])

