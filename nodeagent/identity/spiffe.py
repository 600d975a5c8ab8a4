"""SPIFFE IDs: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Workload identities follow Istio's layout; node agents authenticate to the CA
service as ``spiffe://<trust-domain>/node/<name>``. Pure: no I/O.

The ``spiffe://td/path`` form is split and the principal string
(``td/ns/NS/sa/SA``) is formatted by policy.principal, the one place for
both. This module layers what issuing needs on top: the exact lower-case
scheme, RFC 1123 trust domains and Kubernetes names (InvalidSpiffeId), and
node identities.

Two SpiffeId classes remain on purpose: policy.principal.SpiffeId is any
well-formed workload principal, as written in a policy or a peer's
certificate (upper case, ``_`` and long names included; always a namespace
and service account), while this one refuses at construction anything the
CA must not issue and may be a node. One class with both behaviours would
need a mode flag and would give policy code identities without a
namespace. A workload SpiffeId here and the policy one for its ``uri``
always have the same ``principal`` and ``uri``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from policy.principal import (
    DEFAULT_TRUST_DOMAIN, SPIFFE_PREFIX, format_principal, spiffe_uri, split_spiffe_id, workload_names,
    workload_path,
)

__all__ = ["DEFAULT_TRUST_DOMAIN", "InvalidSpiffeId", "SpiffeId", "check_name", "check_trust_domain"]

# RFC 1123 labels for trust domains and node names; Kubernetes names for ns/sa.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class InvalidSpiffeId(ValueError):
    """A string is not a SPIFFE ID this agent understands."""


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid Kubernetes-style name, else raise."""
    if not _NAME.match(value or ""):
        raise InvalidSpiffeId(
            f"{kind} {value!r} is not a valid name (lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit)")
    return value


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.match(value or ""):
        raise InvalidSpiffeId(
            f"trust domain {value!r} is not valid (lower-case letters, digits, '.', '-', '_')")
    return value


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload (``ns``/``sa``) or node (``node``) SPIFFE ID."""

    trust_domain: str
    namespace: str | None = None
    service_account: str | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if self.node is not None:
            if self.namespace is not None or self.service_account is not None:
                raise InvalidSpiffeId("a node identity has no namespace or service account")
            check_name("node name", self.node)
        else:
            check_name("namespace", self.namespace or "")
            check_name("service account", self.service_account or "")

    @classmethod
    def workload(cls, namespace: str, service_account: str,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN) -> "SpiffeId":
        return cls(trust_domain, namespace=namespace, service_account=service_account)

    @classmethod
    def for_node(cls, name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> "SpiffeId":
        return cls(trust_domain, node=name)

    @classmethod
    def parse(cls, uri: str) -> "SpiffeId":
        """Parse ``spiffe://td/ns/NS/sa/SA`` or ``spiffe://td/node/NAME``.

        Stricter than policy.principal.parse_spiffe_id: the scheme must be
        lower case, and names are checked by the constructor.
        """
        if not isinstance(uri, str) or not uri.startswith(SPIFFE_PREFIX):
            raise InvalidSpiffeId(f"{uri!r} is not a SPIFFE ID (must start with {SPIFFE_PREFIX})")
        trust_domain, segments = split_spiffe_id(uri)
        names = workload_names(segments)
        if names is not None:
            return cls(trust_domain, namespace=names[0], service_account=names[1])
        if len(segments) == 2 and segments[0] == "node":
            return cls(trust_domain, node=segments[1])
        raise InvalidSpiffeId(
            f"{uri!r}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> "
            "or spiffe://<trust-domain>/node/<name>")

    @property
    def is_workload(self) -> bool:
        return self.node is None

    @property
    def path(self) -> str:
        if self.node is not None:
            return f"/node/{self.node}"
        return workload_path(self.namespace, self.service_account)

    @property
    def uri(self) -> str:
        return spiffe_uri(self.principal)

    @property
    def principal(self) -> str:
        """Istio's principal string used in AuthorizationPolicy: ``td/ns/NS/sa/SA``
        (``td/node/NAME`` for a node, which no policy names)."""
        if self.node is not None:
            return f"{self.trust_domain}{self.path}"
        return format_principal(self.trust_domain, self.namespace, self.service_account)

    def __str__(self) -> str:
        return self.uri
