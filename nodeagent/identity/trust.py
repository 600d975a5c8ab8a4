"""Data exchanged between the CA and the agents: issued certificates, the
trust bundle and the revocation list. Pure; JSON/PEM codecs included."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cryptography import x509

from . import certs
from .errors import CAError
from .spiffe import SpiffeId


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A signed leaf and the root that signed it."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def identity(self) -> SpiffeId:
        return certs.spiffe_id_of(self.certificate)

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_before(self) -> float:
        return certs.not_before(self.certificate)

    @property
    def not_after(self) -> float:
        return certs.not_after(self.certificate)


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots every agent trusts. The root that signs new leaves comes first;
    during a root rotation there are two."""

    roots: tuple[x509.Certificate, ...]
    version: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.roots:
            raise CAError("trust bundle is empty")
        object.__setattr__(self, "version", hashlib.sha256(self.pem).hexdigest()[:16])

    @property
    def pem(self) -> bytes:
        return certs.certs_to_pem(self.roots)

    @classmethod
    def from_pem(cls, pem: bytes) -> "TrustBundle":
        try:
            return cls(certs.load_certs(pem))
        except certs.CertificateError as exc:
            raise CAError(f"trust bundle: {exc}") from None

    def issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        for root in self.roots:
            if certs.issued_by(cert, root):
                return root
        return None


@dataclass(frozen=True, slots=True)
class RevocationList:
    """Revoked certificate serials and revoked identities (URIs), with a version
    that grows on every change so agents can tell news from repeats."""

    version: int = 0
    serials: frozenset[int] = frozenset()
    identities: frozenset[str] = frozenset()

    def revoked_reason(self, cert: x509.Certificate) -> str | None:
        if cert.serial_number in self.serials:
            return f"certificate serial {certs.serial_hex(cert.serial_number)} is revoked"
        for uri in certs.uri_sans(cert):
            if uri in self.identities:
                return f"identity {uri} is revoked"
        return None

    def to_json(self) -> dict:
        return {"version": self.version,
                "serials": sorted(certs.serial_hex(s) for s in self.serials),
                "identities": sorted(self.identities)}

    @classmethod
    def from_json(cls, data: object, where: str = "revocation list") -> "RevocationList":
        try:
            if not isinstance(data, dict):
                raise TypeError("must be a JSON object")
            version = data.get("version", 0)
            if not isinstance(version, int) or version < 0:
                raise TypeError("version must be a non-negative integer")
            serials = frozenset(certs.parse_serial(s) for s in data.get("serials", []))
            identities = frozenset(SpiffeId.parse(u).uri for u in data.get("identities", []))
        except (TypeError, ValueError) as exc:
            raise CAError(f"{where}: {exc}") from None
        return cls(version, serials, identities)

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "revocation list") -> "RevocationList":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise CAError(f"{where}: not JSON ({exc})") from None
        return cls.from_json(data, where)
