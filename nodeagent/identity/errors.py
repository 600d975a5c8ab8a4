"""Errors of the identity subsystem. Messages are complete sentences a user can act on."""
from __future__ import annotations


class IdentityError(Exception):
    """Base class for identity errors."""


class CAError(IdentityError):
    """The CA could not do what was asked (bad request, broken CA directory, ...)."""


class SigningRefused(CAError):
    """The CA refuses to sign: the identity is not placed on the node, revoked, ...

    The CA service answers HTTP 403 with ``{"error": reason}``.
    """


class CAUnavailable(CAError):
    """The CA service could not be reached (network, TLS, timeout, 5xx)."""


class NoCertificate(IdentityError):
    """No usable certificate for a workload (not issued yet, or expired)."""


class ForeignIdentityError(IdentityError):
    """A caller asked for a certificate of an identity it does not serve."""


class PeerRejected(IdentityError):
    """The TLS peer's certificate is not acceptable (trust domain, expiry, revocation, ...)."""
