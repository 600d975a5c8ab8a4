"""X.509 building blocks: ECDSA P-256 keys, SHA-256 signatures, SPIFFE URI SANs.

Pure functions (no file or network I/O); time is always passed in as ``now``
(seconds since the epoch) so tests can mint expired or not-yet-valid
certificates on purpose.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .spiffe import InvalidSpiffeId, SpiffeId

# Certificates start this much before "now" so a peer whose clock is slightly
# behind does not see them as not-yet-valid.
CLOCK_SKEW_ALLOWANCE = 60.0


class CertificateError(ValueError):
    """A certificate or CSR is malformed or does not meet this mesh's rules."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("private key is not an ECDSA key")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def cert_to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def der_to_pem(der: bytes) -> bytes:
    """The PEM of a DER certificate, as ``cert_to_pem`` writes it (64-column base64)."""
    body = base64.b64encode(der)
    lines = b"\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


# The agent runs on Debian's python3-cryptography (38.0.4, linked to the system OpenSSL that
# `ssl` already maps: ~6 MiB less Rss than PyPI's wheel, see docs/operations.md "Memory") and
# on newer releases alike. Three newer APIs have a fallback below, used only where the
# installed release lacks them: load_pem_x509_certificates (42), not_valid_*_utc (42) and
# verify_directly_issued_by (40).
_PEM_CERT = re.compile(rb"-----BEGIN (?:X509 )?CERTIFICATE-----\r?\n.*?-----END (?:X509 )?CERTIFICATE-----",
                       re.DOTALL)


def _load_pem_certificates(pem: bytes) -> list[x509.Certificate]:
    """x509.load_pem_x509_certificates for releases without it: every CERTIFICATE block, in
    order; ValueError when there is none or one does not parse."""
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError("Unable to load PEM file. No certificates found")
    return [x509.load_pem_x509_certificate(block) for block in blocks]


_load_pem_x509_certificates = getattr(x509, "load_pem_x509_certificates", _load_pem_certificates)


def load_certs(pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(_load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate list: {exc}") from None
    return certs


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """Parse a serial written in hex (``0x`` prefix and ``:`` separators allowed)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise CertificateError(f"serial {text!r} is not a hexadecimal number") from None
    if value <= 0:
        raise CertificateError(f"serial {text!r} must be positive")
    return value


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _time(seconds: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(int(seconds), tz=_dt.timezone.utc)


_HAS_UTC = hasattr(x509.Certificate, "not_valid_before_utc")


def not_before_utc(cert: x509.Certificate) -> _dt.datetime:
    """Start of validity, an aware UTC datetime."""
    if _HAS_UTC:
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)


def not_after_utc(cert: x509.Certificate) -> _dt.datetime:
    """End of validity, an aware UTC datetime."""
    if _HAS_UTC:
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)


def not_before(cert: x509.Certificate) -> float:
    return not_before_utc(cert).timestamp()


def not_after(cert: x509.Certificate) -> float:
    return not_after_utc(cert).timestamp()


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The certificate's single SPIFFE URI SAN; raise CertificateError otherwise."""
    uris = [u for u in uri_sans(cert) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise CertificateError(
            f"certificate must carry exactly one spiffe:// URI SAN, found {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise CertificateError(str(exc)) from None


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.trust_domain)]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its self-signature and key type (ECDSA P-256)."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CertificateError("CSR signature does not verify (the request was altered or "
                               "not signed by the key it carries)")
    public = csr.public_key()
    if not (isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)):
        raise CertificateError("CSR key must be ECDSA P-256")
    return csr


def make_root(key: ec.EllipticCurvePrivateKey, trust_domain: str, *, now: float,
              lifetime: float, generation: int) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"nodeagent root {generation}"),
    ])
    public = key.public_key()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_time(now - CLOCK_SKEW_ALLOWANCE))
            .not_valid_after(_time(now + lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256()))


@dataclass(frozen=True, slots=True)
class LeafRequest:
    """What the CA decided to put into a leaf certificate."""

    identity: SpiffeId | None  # None for the CA's own serving certificate
    public_key: ec.EllipticCurvePublicKey
    not_before: float
    not_after: float
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


def sign_leaf(request: LeafRequest, issuer: x509.Certificate,
              issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """Sign a leaf for ``request`` (client + server usage)."""
    sans: list[x509.GeneralName] = []
    if request.identity is not None:
        sans.append(x509.UniformResourceIdentifier(request.identity.uri))
    sans += [x509.DNSName(d) for d in request.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in request.ip_addresses]
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder()
            .subject_name(x509.Name(issuer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)))
            .issuer_name(issuer.subject)
            .public_key(request.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_time(request.not_before))
            .not_valid_after(_time(request.not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(issuer_key, hashes.SHA256()))


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key signed ``cert`` (names and signature both match)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        if _HAS_VERIFY_ISSUED:
            cert.verify_directly_issued_by(issuer)
        else:
            _verify_signature(cert, issuer.public_key())
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


_HAS_VERIFY_ISSUED = hasattr(x509.Certificate, "verify_directly_issued_by")


def _verify_signature(cert: x509.Certificate, key) -> None:
    """The signature check of Certificate.verify_directly_issued_by, for releases without it:
    InvalidSignature when ``key`` did not sign ``cert``, TypeError for a key type it does not
    handle (as cryptography's own)."""
    algorithm = cert.signature_hash_algorithm
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        # PKCS#1 v1.5 only: a release without verify_directly_issued_by cannot tell the
        # RSA-PSS parameters of a certificate, so a PSS-signed one is refused (InvalidSignature).
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    else:
        raise TypeError(f"unsupported issuer key type {type(key).__name__}")


def public_keys_equal(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)
