"""SPIFFE IDs: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Workload identities follow Istio's layout; node agents authenticate to the CA
service as ``spiffe://<trust-domain>/node/<name>``. Pure: no I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"

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
        """Parse ``spiffe://td/ns/NS/sa/SA`` or ``spiffe://td/node/NAME``."""
        if not isinstance(uri, str) or not uri.startswith("spiffe://"):
            raise InvalidSpiffeId(f"{uri!r} is not a SPIFFE ID (must start with spiffe://)")
        rest = uri[len("spiffe://"):]
        trust_domain, _, path = rest.partition("/")
        parts = path.split("/") if path else []
        if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
            return cls(trust_domain, namespace=parts[1], service_account=parts[3])
        if len(parts) == 2 and parts[0] == "node":
            return cls(trust_domain, node=parts[1])
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
        return f"/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def principal(self) -> str:
        """Istio's principal string used in AuthorizationPolicy: ``td/ns/NS/sa/SA``."""
        return f"{self.trust_domain}{self.path}"

    def __str__(self) -> str:
        return self.uri
