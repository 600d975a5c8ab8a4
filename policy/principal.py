"""SPIFFE identities and Istio principals.

An identity is the URI in a workload certificate:
``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``. Istio's
AuthorizationPolicy names the same identity without the scheme, as a
*principal*: ``<trust-domain>/ns/<namespace>/sa/<service-account>``.

This module owns the one parser of the ``spiffe://<td>/<path>`` form
(strip_spiffe_scheme, split_principal, split_spiffe_id, workload_names) and
the one formatting of a principal (workload_path, format_principal,
spiffe_uri). Policy matching is lenient on top of them (any non-blank
segment, case-insensitive scheme); nodeagent.identity.spiffe layers the
issuer's strict name and trust-domain checks and node identities on the same
functions.

Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "SPIFFE_PREFIX", "DEFAULT_TRUST_DOMAIN", "SpiffeId", "PrincipalError",
    "strip_spiffe_scheme", "split_principal", "split_spiffe_id", "workload_names",
    "workload_path", "format_principal", "spiffe_uri",
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
        return spiffe_uri(self.principal)

    @property
    def principal(self) -> str:
        return format_principal(self.trust_domain, self.namespace, self.service_account)

    def __str__(self) -> str:
        return self.uri


# --- the shared parser and formatter (no validation of names here) -----------

def strip_spiffe_scheme(uri: str) -> str | None:
    """``spiffe://td/path`` -> ``td/path``; None if ``uri`` has another scheme.

    The scheme compares case-insensitively (RFC 3986).
    """
    if uri[:len(SPIFFE_PREFIX)].lower() != SPIFFE_PREFIX:
        return None
    return uri[len(SPIFFE_PREFIX):]


def split_principal(principal: str) -> tuple[str, list[str]]:
    """``td/a/b/c`` -> ``("td", ["a", "b", "c"])``: the trust domain and the
    path segments, as written (``"td"`` and ``"td/"`` have no segments)."""
    trust_domain, _, path = principal.partition("/")
    return trust_domain, (path.split("/") if path else [])


def _without_scheme(uri: str) -> str:
    rest = strip_spiffe_scheme(uri)
    if rest is None:
        raise PrincipalError(f"{uri!r} is not a SPIFFE ID (must start with {SPIFFE_PREFIX})")
    return rest


def split_spiffe_id(uri: str) -> tuple[str, list[str]]:
    """``spiffe://td/a/b`` -> ``("td", ["a", "b"])``; PrincipalError without the scheme."""
    return split_principal(_without_scheme(uri))


def workload_names(segments: list[str]) -> tuple[str, str] | None:
    """``["ns", NS, "sa", SA]`` -> ``(NS, SA)``; None for any other path shape."""
    if len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa":
        return segments[1], segments[3]
    return None


def workload_path(namespace: str, service_account: str) -> str:
    """The path of a workload identity: ``/ns/<namespace>/sa/<service-account>``."""
    return f"/ns/{namespace}/sa/{service_account}"


def format_principal(trust_domain: str, namespace: str, service_account: str) -> str:
    """``td/ns/<namespace>/sa/<service-account>``, the principal Istio policies name."""
    return f"{trust_domain}{workload_path(namespace, service_account)}"


def spiffe_uri(principal: str) -> str:
    """``td/path`` -> ``spiffe://td/path``."""
    return f"{SPIFFE_PREFIX}{principal}"


# --- lenient parsing for policy matching -------------------------------------

def _valid_segment(s: str) -> bool:
    return bool(s) and "/" not in s and not any(c.isspace() for c in s)


def parse_principal(principal: str) -> SpiffeId:
    """``td/ns/x/sa/y`` -> SpiffeId; raises PrincipalError with the reason."""
    td, segments = split_principal(principal)
    names = workload_names(segments)
    if names is None:
        raise PrincipalError(
            f"{principal!r} is not a principal of the form <trust-domain>/ns/<namespace>/sa/<service-account>")
    ns, sa = names
    for what, value in (("trust domain", td), ("namespace", ns), ("service account", sa)):
        if not _valid_segment(value):
            raise PrincipalError(f"{principal!r}: empty or invalid {what}")
    return SpiffeId(td, ns, sa)


def parse_spiffe_id(uri: str) -> SpiffeId:
    """``spiffe://td/ns/x/sa/y`` -> SpiffeId; the scheme is case-insensitive (RFC 3986)."""
    return parse_principal(_without_scheme(uri))


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
    rest = strip_spiffe_scheme(uri_or_principal)
    return parse_principal(uri_or_principal if rest is None else rest).principal


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
