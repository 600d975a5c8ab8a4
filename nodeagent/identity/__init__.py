"""Workload identity: SPIFFE IDs, the CA (embedded and as a service), the
certificate manager and the TLS contexts of the mTLS tunnel. See docs/identity.md."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from .ca import CADirectory, LocalCA
from .errors import (CAError, CAUnavailable, ForeignIdentityError, IdentityError, NoCertificate,
                     PeerRejected, SigningRefused)
from .manager import DEFAULT_LIFETIME, CAClient, CertificateManager, Health, ScopedCertificateSource
from .spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from .tls import TunnelTls


def create_manager(*, state_dir: str | os.PathLike | None = None, ca_url: str | None = None,
                   credential_dir: str | os.PathLike | None = None,
                   trust_domain: str = DEFAULT_TRUST_DOMAIN, lifetime: float = DEFAULT_LIFETIME,
                   clock: Callable[[], float] = time.time) -> CertificateManager:
    """The daemon's certificate manager.

    Local mode (no ``ca_url``): an embedded CA in ``<state_dir>/ca``, created on
    first run. Remote mode: ``HttpsCAClient(ca_url, credential_dir)``; the trust
    domain is the node credential's.
    """
    ca: CAClient
    if ca_url is None:
        if state_dir is None:
            raise CAError("local identity mode needs a state directory")
        ca_dir = Path(state_dir) / "ca"
        try:
            ca = LocalCA(CADirectory.open_or_init(ca_dir, trust_domain=trust_domain), clock=clock)
        except OSError as exc:
            raise CAError(f"cannot set up the embedded CA in {ca_dir}: {exc.strerror or exc}") from None
    else:
        from .client import HttpsCAClient
        if credential_dir is None:
            raise CAError("--ca-url needs the node credential directory (node.key, node.pem, ca-roots.pem)")
        ca = HttpsCAClient(ca_url, credential_dir)
        if ca.trust_domain != trust_domain:
            raise CAError(f"the node credential in {credential_dir} is for trust domain "
                          f"{ca.trust_domain}, but {trust_domain} is configured")
    return CertificateManager(ca, trust_domain=trust_domain, clock=clock, lifetime=lifetime)


__all__ = ["CADirectory", "LocalCA", "CAClient", "CertificateManager", "Health",
           "ScopedCertificateSource", "SpiffeId", "TunnelTls", "create_manager", "IdentityError",
           "CAError", "CAUnavailable", "SigningRefused", "NoCertificate", "ForeignIdentityError",
           "PeerRejected"]
