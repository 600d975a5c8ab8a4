"""Envoy's consecutive-error outlier detection as a pure state machine.

One ``OutlierDetector`` per cluster. The proxy reports every upstream result
with ``record_result``, calls ``sweep`` at ``next_sweep`` (the Envoy
``interval`` timer), and excludes ``ejected(now)`` when picking endpoints.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Effective settings (Istio's translation applied; see docs/traffic.md)."""
    consecutive_5xx: int            # 0 = disabled
    consecutive_gateway: int        # 0 = disabled
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin: int = 0   # only with split_external_local_origin_errors


def outlier_policy_from(od) -> OutlierPolicy | None:
    """Translate a DestinationRule ``OutlierDetection`` (None -> None)."""
    raise NotImplementedError


@dataclass(frozen=True, slots=True)
class EjectionEvent:
    endpoint_id: str
    reason: str          # "consecutive_5xx" | "consecutive_gateway" | "consecutive_local_origin"
    at: float
    until: float         # earliest readmission; the real one is the first sweep at/after it
    times_ejected: int


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy, now: float = 0.0) -> None:
        """``now`` starts the sweep timer: ``next_sweep = now + interval``."""
        raise NotImplementedError

    next_sweep: float

    def set_endpoints(self, endpoint_ids, now: float) -> None:
        """Tell the detector the cluster's current endpoints (the denominator of
        maxEjectionPercent / minHealthPercent); state of removed ones is dropped."""
        raise NotImplementedError

    def record_result(self, endpoint_id: str, status: int | None, now: float,
                      connect_failure: bool = False) -> EjectionEvent | None:
        """One upstream outcome: an HTTP status, or ``status=None`` for a locally
        originated failure (connect failure, reset, timeout)."""
        raise NotImplementedError

    def sweep(self, now: float) -> list[str]:
        """The interval timer: readmit hosts whose ejection time is up, decay the
        ejection multiplier of healthy ones. Returns the readmitted ids."""
        raise NotImplementedError

    def is_ejected(self, endpoint_id: str) -> bool:
        raise NotImplementedError

    def ejected(self) -> frozenset[str]:
        """Ids to exclude from load balancing; empty when the healthy share is
        below minHealthPercent (Envoy's panic mode: use every host)."""
        raise NotImplementedError

    def available(self, endpoint_ids) -> tuple[str, ...]:
        raise NotImplementedError

    def snapshot_state(self, now: float) -> dict[str, dict]:
        """Per endpoint: ejected, until, times_ejected, consecutive counters."""
        raise NotImplementedError
