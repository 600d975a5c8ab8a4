"""X.509 building blocks: ECDSA P-256 keys, SHA-256 signatures, SPIFFE URI SANs.

Pure functions (no file or network I/O); time is always passed in as ``now``
(seconds since the epoch) so tests can mint expired or not-yet-valid
certificates on purpose.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
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


def load_certs(pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(x509.load_pem_x509_certificates(pem))
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


def not_before(cert: x509.Certificate) -> float:
    return cert.not_valid_before_utc.timestamp()


def not_after(cert: x509.Certificate) -> float:
    return cert.not_valid_after_utc.timestamp()


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
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def public_keys_equal(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)
