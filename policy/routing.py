"""HTTP route selection: a VirtualService applied to one request, as Envoy does.

``plan_request`` is called by the proxy per request. Everything static is
compiled once per (snapshot, host, source namespace) and cached; per request
only the match walk, the weighted pick and the fault/mirror rolls happen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from policy.cluster import ClusterKey
from policy.retry import RetryPolicy

if TYPE_CHECKING:
    from policy.snapshot import ConfigSnapshot, Service, WorkloadRef


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What routing needs of one HTTP request."""
    method: str
    scheme: str                    # "http" | "https"
    authority: str                 # Host header / :authority, as received
    path: str                      # path incl. ?query, as received
    headers: Mapping[str, str]     # lower-case name -> value
    port: int                      # destination service port
    source: WorkloadRef | None     # the calling workload (sourceLabels, sourceNamespace)
    source_ip: str | None = None   # for consistentHash useSourceIp


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Envoy header manipulation: remove, then set (replace), then add (append)."""
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: dict[str, str]) -> None:
        """Apply to a lower-case-keyed dict in place (``add`` joins with ", ")."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """One route destination, its weight and its merged header ops."""
    cluster: ClusterKey
    weight: int
    request_headers: HeaderOps
    response_headers: HeaderOps


class RoutePlan:
    """The result of routing one request (attributes only, built per request)."""
    __slots__ = ("service", "service_port", "route_name", "destinations", "cluster",
                 "path", "authority", "request_headers", "response_headers",
                 "timeout", "retry", "fault_delay", "fault_abort", "fault_grpc_status",
                 "mirrors", "virtual_service")
    service: Service
    service_port: int
    route_name: str | None
    destinations: tuple[WeightedCluster, ...]
    cluster: ClusterKey            # the picked destination's cluster
    path: str                      # after rewrite
    authority: str                 # after rewrite
    request_headers: HeaderOps     # route-level + picked destination's, merged
    response_headers: HeaderOps
    timeout: float | None          # None = no timeout (Istio's default for HTTP)
    retry: RetryPolicy | None      # None = retries disabled
    fault_delay: float | None      # seconds, already rolled against its percentage
    fault_abort: int | None        # HTTP status, already rolled
    fault_grpc_status: str | None  # gRPC abort, already rolled
    mirrors: tuple[ClusterKey, ...]   # already rolled against their percentages
    virtual_service: str | None    # "namespace/name" of the VS used, None = default route


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the request locally."""
    status: int
    response_flags: str            # "NR" no route, "" for redirect / direct response
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def plan_request(snapshot: ConfigSnapshot, req: RequestAttrs,
                 rand: random.Random) -> RoutePlan | Reject:
    """Resolve the service from ``req.authority`` then route (see plan_for_service).
    Unknown host -> Reject(404, "NR")."""
    raise NotImplementedError


def plan_for_service(snapshot: ConfigSnapshot, service: Service, service_port: int,
                     req: RequestAttrs, rand: random.Random) -> RoutePlan | Reject:
    """Route a request already known to target ``service:service_port``.
    No VirtualService -> the default route to the service itself; a VS where
    no rule matches -> Reject(404, "NR")."""
    raise NotImplementedError
