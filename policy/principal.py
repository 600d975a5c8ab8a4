"""SPIFFE identities and Istio principals.

An identity is the URI in a workload certificate:
``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``. Istio's
AuthorizationPolicy names the same identity without the scheme, as a
*principal*: ``<trust-domain>/ns/<namespace>/sa/<service-account>``.

Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "SPIFFE_PREFIX", "DEFAULT_TRUST_DOMAIN", "SpiffeId", "PrincipalError",
    "parse_spiffe_id", "parse_principal", "try_parse_principal", "principal_of",
    "namespace_of_principal", "trust_domain_of", "same_trust_domain",
    "expand_trust_domain_aliases",
]

SPIFFE_PREFIX = "spiffe://"
# Istio treats "cluster.local" in a policy as "the local trust domain" (and its aliases).
DEFAULT_TRUST_DOMAIN = "cluster.local"


class PrincipalError(ValueError):
    """A SPIFFE ID or principal that is not ``<td>/ns/<ns>/sa/<sa>``."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SPIFFE_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def _valid_segment(s: str) -> bool:
    return bool(s) and "/" not in s and not any(c.isspace() for c in s)


def parse_principal(principal: str) -> SpiffeId:
    """``td/ns/x/sa/y`` -> SpiffeId; raises PrincipalError with the reason."""
    parts = principal.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise PrincipalError(
            f"{principal!r} is not a principal of the form <trust-domain>/ns/<namespace>/sa/<service-account>")
    td, _, ns, _, sa = parts
    for what, value in (("trust domain", td), ("namespace", ns), ("service account", sa)):
        if not _valid_segment(value):
            raise PrincipalError(f"{principal!r}: empty or invalid {what}")
    return SpiffeId(td, ns, sa)


def parse_spiffe_id(uri: str) -> SpiffeId:
    """``spiffe://td/ns/x/sa/y`` -> SpiffeId; the scheme is case-insensitive (RFC 3986)."""
    if uri[:len(SPIFFE_PREFIX)].lower() != SPIFFE_PREFIX:
        raise PrincipalError(f"{uri!r} is not a SPIFFE ID (must start with {SPIFFE_PREFIX})")
    return parse_principal(uri[len(SPIFFE_PREFIX):])


@lru_cache(maxsize=4096)
def try_parse_principal(principal: str | None) -> SpiffeId | None:
    """Like parse_principal, but None for None or a malformed principal (cached: hot path)."""
    if not principal:
        return None
    try:
        return parse_principal(principal)
    except PrincipalError:
        return None


def principal_of(uri_or_principal: str) -> str:
    """The principal form of a SPIFFE ID, accepting either form."""
    if uri_or_principal[:len(SPIFFE_PREFIX)].lower() == SPIFFE_PREFIX:
        return parse_spiffe_id(uri_or_principal).principal
    return parse_principal(uri_or_principal).principal


def namespace_of_principal(principal: str | None) -> str | None:
    """Istio derives ``source.namespace`` from the peer identity: None without one."""
    sid = try_parse_principal(principal)
    return sid.namespace if sid else None


def trust_domain_of(principal: str) -> str:
    return parse_principal(principal).trust_domain


def same_trust_domain(a: str, b: str) -> bool:
    """Trust domains compare case-insensitively (they are DNS-like names)."""
    return a.lower() == b.lower()


def expand_trust_domain_aliases(principals: tuple[str, ...] | list[str], trust_domain: str,
                                aliases: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """Istio's trust-domain migration for policy principals.

    A principal whose trust domain is the local one, one of its aliases, or
    ``cluster.local`` (Istio's name for "the local trust domain") stands for
    the same identity in every one of those domains, so it is expanded to all
    of them. Patterns that do not name a trust domain (``*``, ``*suffix``) and
    principals of foreign trust domains are kept as written.
    """
    domains = [trust_domain.lower()] + [a.lower() for a in aliases if a.lower() != trust_domain.lower()]
    out: list[str] = []
    for p in principals:
        if p.startswith("*") or "/" not in p:
            out.append(p)
            continue
        td, rest = p.split("/", 1)
        if td.lower() in domains or td.lower() == DEFAULT_TRUST_DOMAIN:
            for d in domains:
                out.append(f"{d}/{rest}")
            if td.lower() not in domains:
                out.append(p)
        else:
            out.append(p)
    seen: set[str] = set()
    return tuple(x for x in out if not (x in seen or seen.add(x)))
