"""Effective per-cluster policy: a DestinationRule merged the way Istio merges it.

A cluster is (service host, subset, port). Everything here is pure and cached
per snapshot, so the proxy may call it per request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policy.outlier import OutlierPolicy
    from policy.snapshot import ConfigSnapshot, Endpoint


@dataclass(frozen=True, slots=True)
class ClusterKey:
    host: str            # service FQDN
    subset: str | None   # DestinationRule subset name, None = all endpoints
    port: int            # service port number


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """What a consistent-hash load balancer hashes on."""
    kind: str                  # "header" | "cookie" | "source_ip" | "query"
    name: str | None           # header / cookie / query-parameter name
    cookie_path: str | None = None
    cookie_ttl: float | None = None


@dataclass(frozen=True, slots=True)
class LbPolicy:
    kind: str                  # "ROUND_ROBIN" | "LEAST_REQUEST" | "RANDOM" | "PASSTHROUGH" | "RING_HASH"
    hash: HashPolicy | None = None
    minimum_ring_size: int = 1024


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    """Istio defaults apply to every field the DestinationRule leaves out."""
    key: ClusterKey
    lb: LbPolicy
    max_connections: int           # tcp.maxConnections (default 2^32-1)
    max_pending_requests: int      # http.http1MaxPendingRequests (default 2^32-1)
    max_requests: int              # http.http2MaxRequests (default 2^32-1)
    max_requests_per_connection: int  # 0 = unlimited
    max_retries: int               # concurrent retries (default 2^32-1)
    connect_timeout: float         # seconds, default 10
    idle_timeout: float            # seconds, default 3600
    outlier: OutlierPolicy | None
    tls_mode: str                  # "ISTIO_MUTUAL" | "DISABLE" | "SIMPLE" | "MUTUAL"
    sni: str | None
    subject_alt_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClusterEndpoint:
    """One endpoint of one cluster, with the port already resolved."""
    id: str              # "address:port", the key of LB and outlier state
    address: str
    port: int
    weight: int
    labels: object       # Mapping[str, str]
    endpoint: Endpoint   # the snapshot's endpoint


def cluster_policy(snapshot: ConfigSnapshot, key: ClusterKey,
                   source_namespace: str | None) -> ClusterPolicy:
    """The DestinationRule for ``key.host`` seen from ``source_namespace``:
    host-level traffic policy, then the subset's (replacing whole sections), then
    portLevelSettings for ``key.port`` (subset's port settings over the host's)."""
    raise NotImplementedError


def cluster_endpoints(snapshot: ConfigSnapshot, key: ClusterKey,
                      source_namespace: str | None = None) -> tuple[ClusterEndpoint, ...]:
    """Endpoints of the service selected by the subset's labels (all when no
    subset), with the target port for ``key.port`` resolved. Unknown subset -> ()."""
    raise NotImplementedError
