"""Load-balancer pickers over a cluster's endpoints (Envoy's algorithms).

One picker per cluster holds its counters. ``pick`` never returns an endpoint
whose id is in ``exclude`` (ejected ones, and ones a retry already tried);
returns None when nothing is left.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Collection, Sequence

if TYPE_CHECKING:
    from policy.cluster import ClusterEndpoint, LbPolicy


class Picker:
    def pick(self, endpoints: Sequence[ClusterEndpoint], hash_key: str | None,
             rand: random.Random, exclude: Collection[str] = ()) -> ClusterEndpoint | None:
        raise NotImplementedError

    def request_started(self, endpoint_id: str) -> None:
        """Active-request accounting (LEAST_REQUEST); a no-op for others."""

    def request_finished(self, endpoint_id: str) -> None:
        """Active-request accounting (LEAST_REQUEST); a no-op for others."""


class RoundRobinPicker(Picker): ...
class LeastRequestPicker(Picker): ...
class RandomPicker(Picker): ...
class RingHashPicker(Picker): ...


def make_picker(lb: LbPolicy) -> Picker:
    """ROUND_ROBIN (default), LEAST_REQUEST / LEAST_CONN, RANDOM, PASSTHROUGH
    (treated as RANDOM over the known endpoints), RING_HASH (consistentHash)."""
    raise NotImplementedError


def hash_key(lb: LbPolicy, headers, path: str, source_ip: str | None) -> str | None:
    """The consistent-hash key of a request per ``lb.hash`` (header value, cookie
    value, source IP or query-parameter value); None = hash not applicable."""
    raise NotImplementedError
