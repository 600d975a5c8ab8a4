"""Envoy's consecutive-error outlier detection as a pure state machine.

One ``OutlierDetector`` per cluster. The proxy reports every upstream result
with ``record_result``, calls ``sweep`` when ``now >= next_sweep`` (Envoy's
``interval`` timer), and excludes ``ejected()`` when picking endpoints.

Mirrors Envoy's ``outlier_detection_impl.cc`` (consecutive algorithms only;
Istio disables the success-rate ones):

- a 5xx response bumps the consecutive-5xx counter; 502/503/504 also bump the
  consecutive-gateway counter (another 5xx resets the gateway counter); any
  other status resets both;
- a locally originated failure maps to an HTTP code (connect failure/reset ->
  503, timeout -> 504) unless ``split_external_local_origin_errors``, where it
  bumps its own counter instead;
- a counter reaching its threshold ejects the host at once if no host is
  ejected yet, else only if ``100 * (ejected + 1) / hosts <= max_ejection_percent``;
  the counter is reset either way. "At least one host can always be ejected"
  is Envoy's behaviour up to 1.26 (Istio <= 1.18) and Envoy's
  ``always_eject_one_host``; Envoy >= 1.27 without that flag (what current
  Istio generates) is strict, so 10% of fewer than 10 hosts ejects nobody.
  ``OutlierPolicy.always_eject_one_host=False`` selects the strict rule;
- the ejection lasts ``min(base * backoff, max_ejection_time)`` where backoff
  grows by one per ejection (while ``backoff * base < max + base``) and shrinks
  by one per sweep the host spends un-ejected; only a sweep readmits, so the
  real ejection ends at the first sweep at or after that time;
- below ``min_health_percent`` healthy hosts the ejections are ignored (Envoy's
  panic threshold, which Istio sets from ``minHealthPercent``).
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_EJECTION_TIME = 300.0


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Effective settings (Istio's translation applied; see docs/traffic.md)."""
    consecutive_5xx: int            # 0 = disabled
    consecutive_gateway: int        # 0 = disabled
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0
    split_external_local_origin_errors: bool = False
    consecutive_local_origin: int = 0   # only with split_external_local_origin_errors
    always_eject_one_host: bool = True  # False: Envoy >= 1.27's strict max_ejection_percent


def outlier_policy_from(od) -> OutlierPolicy | None:
    """Translate a DestinationRule ``OutlierDetection`` (None -> None) as Istio
    (``applyOutlierDetection``) and Envoy's defaults do:

    - ``consecutive5xxErrors`` absent -> Envoy's default 5, enforced; 0 disables;
    - ``consecutiveGatewayErrors`` absent -> off (Envoy enforces it at 0%);
    - legacy ``consecutiveErrors: N`` -> gateway errors N and 5xx off, unless the
      explicit fields are also given (they win);
    - ``interval`` 10s, ``baseEjectionTime`` 30s; ``maxEjectionPercent`` 10 when
      absent or 0; ``minHealthPercent`` 0 (no panic);
    - Envoy's ``max_ejection_time``: 300s, or ``baseEjectionTime`` if larger;
    - ``consecutiveLocalOriginFailures`` 5 when split is on and it is absent/0.
    """
    if od is None:
        return None
    c5xx = 5
    gateway = 0
    if od.consecutive_errors:
        gateway = od.consecutive_errors
        c5xx = 0
    if od.consecutive_5xx_errors is not None:
        c5xx = od.consecutive_5xx_errors
    if od.consecutive_gateway_errors is not None:
        gateway = od.consecutive_gateway_errors
    base = od.base_ejection_time if od.base_ejection_time else 30.0
    split = bool(od.split_external_local_origin_errors)
    return OutlierPolicy(
        consecutive_5xx=c5xx,
        consecutive_gateway=gateway,
        interval=od.interval if od.interval else 10.0,
        base_ejection_time=base,
        max_ejection_time=max(DEFAULT_MAX_EJECTION_TIME, base),
        max_ejection_percent=float(min(100, od.max_ejection_percent)) if od.max_ejection_percent else 10.0,
        min_health_percent=float(od.min_health_percent or 0),
        split_external_local_origin_errors=split,
        consecutive_local_origin=(od.consecutive_local_origin_failures or 5) if split else 0,
    )


@dataclass(frozen=True, slots=True)
class EjectionEvent:
    endpoint_id: str
    reason: str          # "consecutive_5xx" | "consecutive_gateway" | "consecutive_local_origin"
    at: float
    until: float         # earliest readmission; the real one is the first sweep at/after it
    times_ejected: int   # total ejections of this host so far (Envoy's num_ejections)


class _HostState:
    __slots__ = ("c5xx", "cgw", "clocal", "ejected_at", "backoff", "times_ejected")

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.clocal = 0
        self.ejected_at: float | None = None
        self.backoff = 0
        self.times_ejected = 0


_LOCAL_FAILURE_STATUS = {"connect-failure": 503, "reset": 503, "refused-stream": 503, "timeout": 504}


class OutlierDetector:
    """Per-cluster state. Unknown endpoint ids are added on first report; call
    ``set_endpoints`` whenever the cluster's endpoint set changes."""

    __slots__ = ("policy", "next_sweep", "_hosts", "_ejected")

    def __init__(self, policy: OutlierPolicy, now: float = 0.0, endpoint_ids=()) -> None:
        """``now`` starts the sweep timer: ``next_sweep = now + interval``."""
        self.policy = policy
        self.next_sweep = now + policy.interval
        self._hosts: dict[str, _HostState] = {i: _HostState() for i in endpoint_ids}
        self._ejected: frozenset[str] = frozenset()

    def set_endpoints(self, endpoint_ids) -> None:
        """Tell the detector the cluster's current endpoints (the denominator of
        maxEjectionPercent / minHealthPercent); state of removed ones is dropped."""
        ids = set(endpoint_ids)
        hosts = self._hosts
        for gone in [i for i in hosts if i not in ids]:
            del hosts[gone]
        for i in ids:
            if i not in hosts:
                hosts[i] = _HostState()
        self._ejected = frozenset(i for i in self._ejected if i in ids)

    def record_result(self, endpoint_id: str, status: int | None, now: float,
                      local_failure: str | None = None,
                      connect_failure: bool = False) -> EjectionEvent | None:
        """One upstream outcome: an HTTP status, or ``status=None`` with
        ``local_failure`` "connect-failure" | "reset" | "refused-stream" |
        "timeout" for a locally originated failure (None means "reset";
        ``connect_failure=True`` is short for ``local_failure="connect-failure"``)."""
        if connect_failure and local_failure is None:
            local_failure = "connect-failure"
        h = self._hosts.get(endpoint_id)
        if h is None:
            h = self._hosts[endpoint_id] = _HostState()
        p = self.policy
        if status is None:
            code = _LOCAL_FAILURE_STATUS.get(local_failure or "reset")
            if code is None:
                raise ValueError(f"unknown local failure {local_failure!r}; expected one of "
                                 f"{sorted(_LOCAL_FAILURE_STATUS)}")
            if p.split_external_local_origin_errors:
                h.clocal += 1
                if h.clocal == p.consecutive_local_origin and h.ejected_at is None:
                    h.clocal = 0
                    return self._eject(endpoint_id, h, "consecutive_local_origin", now)
                return None
            status = code
        elif p.split_external_local_origin_errors:
            h.clocal = 0      # the connection worked
        if 500 <= status <= 599:
            event = None
            if status in (502, 503, 504):
                h.cgw += 1
                if h.cgw == p.consecutive_gateway and h.ejected_at is None:
                    h.cgw = 0
                    event = self._eject(endpoint_id, h, "consecutive_gateway", now)
            else:
                h.cgw = 0
            h.c5xx += 1
            if h.c5xx == p.consecutive_5xx and h.ejected_at is None:
                h.c5xx = 0
                event = self._eject(endpoint_id, h, "consecutive_5xx", now) or event
            return event
        h.c5xx = 0
        h.cgw = 0
        return None

    def _eject(self, endpoint_id: str, h: _HostState, reason: str, now: float) -> EjectionEvent | None:
        # The counter was reset by the caller whether or not the cap allows the
        # ejection (as Envoy's onConsecutiveErrorWorker does).
        p = self.policy
        ejected = len(self._ejected)
        if not (p.always_eject_one_host and ejected == 0) \
                and 100.0 * (ejected + 1) / len(self._hosts) > p.max_ejection_percent:
            return None
        h.ejected_at = now
        h.times_ejected += 1
        if h.backoff * p.base_ejection_time < p.max_ejection_time + p.base_ejection_time:
            h.backoff += 1
        self._ejected = self._ejected | {endpoint_id}
        return EjectionEvent(endpoint_id, reason, now, now + self._duration(h), h.times_ejected)

    def _duration(self, h: _HostState) -> float:
        p = self.policy
        return min(p.base_ejection_time * h.backoff, p.max_ejection_time)

    def sweep(self, now: float) -> list[str]:
        """The interval timer: readmit hosts whose ejection time is up, decay the
        ejection multiplier of healthy ones. Returns the readmitted ids and
        re-arms ``next_sweep = now + interval``."""
        readmitted: list[str] = []
        for endpoint_id, h in self._hosts.items():
            if h.ejected_at is None:
                if h.backoff:
                    h.backoff -= 1
            elif self._duration(h) <= now - h.ejected_at:
                h.ejected_at = None
                h.c5xx = 0
                h.cgw = 0
                readmitted.append(endpoint_id)
        if readmitted:
            self._ejected = self._ejected.difference(readmitted)
        self.next_sweep = now + self.policy.interval
        return readmitted

    def is_ejected(self, endpoint_id: str) -> bool:
        """Whether the host is marked ejected (regardless of panic mode)."""
        return endpoint_id in self._ejected

    def ejected(self) -> frozenset[str]:
        """Ids to exclude from load balancing; empty when the healthy share is
        below minHealthPercent (Envoy's panic mode: use every host)."""
        ej = self._ejected
        if ej and self.policy.min_health_percent > 0:
            total = len(self._hosts)
            if 100.0 * (total - len(ej)) / total < self.policy.min_health_percent:
                return frozenset()
        return ej

    def available(self, endpoint_ids) -> tuple[str, ...]:
        """``endpoint_ids`` minus the excluded ones (see ``ejected``)."""
        ej = self.ejected()
        return tuple(i for i in endpoint_ids if i not in ej)

    def snapshot_state(self, now: float) -> dict[str, dict]:
        """Per endpoint: ejected, until, times_ejected, multiplier, consecutive counters."""
        out: dict[str, dict] = {}
        for endpoint_id, h in self._hosts.items():
            ejected = h.ejected_at is not None
            out[endpoint_id] = {
                "ejected": ejected,
                "ejected_at": h.ejected_at,
                "until": (h.ejected_at + self._duration(h)) if ejected else None,
                "remaining": max(0.0, h.ejected_at + self._duration(h) - now) if ejected else 0.0,
                "times_ejected": h.times_ejected,
                "multiplier": h.backoff,
                "consecutive_5xx": h.c5xx,
                "consecutive_gateway": h.cgw,
                "consecutive_local_origin": h.clocal,
            }
        return out
