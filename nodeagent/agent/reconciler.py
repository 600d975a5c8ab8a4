"""The capture reconciler (after cilium's): desired state is the registry,
actual state is what the capture backend has applied.

One loop, an injected clock. Enrollment asks for an incremental step for one
workload; a failed step puts the workload in the retry set (backoff) and
schedules a full resync, which re-applies every enrolled workload (apply is
idempotent), removes what is applied but no longer enrolled and sweeps
leftovers. A periodic full resync repairs drift (rules deleted behind our
back). Health is OK, or Degraded with the reasons.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from nodeagent.agent.capture import Capture, CaptureError
from nodeagent.agent.registry import RetrySet
from nodeagent.agent.workload import WorkloadSpec

log = logging.getLogger("nodeagent.agent.reconciler")


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class Health:
    status: str  # "OK" | "Degraded"
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass(frozen=True, slots=True)
class StepResult:
    state: str  # "applied" | "pending" | "none" | "removed"
    error: str = ""


class Reconciler:
    def __init__(
        self,
        desired: Callable[[], Iterable[WorkloadSpec]],
        capture: Capture,
        clock: Clock,
        retry: RetrySet | None = None,
        resync_interval: float = 60.0,
        applied: Iterable[WorkloadSpec] = (),
    ) -> None:
        self._desired = desired
        self.capture = capture
        self.clock = clock
        self.retry = retry if retry is not None else RetrySet()
        self.resync_interval = resync_interval
        # What the backend holds, persisted by the agent: after a restart, capture
        # of workloads unenrolled while it was down is found here and removed.
        self.applied: dict[tuple[str, str], WorkloadSpec] = {s.key: s for s in applied}
        # The first step is a full resync: it adopts what the registry holds.
        self.next_full_resync = float("-inf")
        self.last_full_resync: float | None = None
        self.resync_errors: tuple[str, ...] = ()
        self._resync_failures = 0

    def _desired_map(self) -> dict[tuple[str, str], WorkloadSpec]:
        return {spec.key: spec for spec in self._desired()}

    # -- incremental -----------------------------------------------------

    def sync_one(self, key: tuple[str, str]) -> StepResult:
        """Bring one workload's capture to its desired state now."""
        spec = self._desired_map().get(key)
        now = self.clock.now()
        if spec is None:
            old = self.applied.get(key)
            self.retry.forget(key)
            if old is None:
                return StepResult("removed")
            try:
                self.capture.remove(old)
            except CaptureError as exc:
                # The rules of a workload that is gone: the full resync's sweep retries.
                self._resync_soon(now)
                log.warning("removing capture for %s failed: %s", old.ref, exc)
                return StepResult("removed", str(exc))
            self.applied.pop(key, None)
            return StepResult("removed")
        return self._apply(spec, now)

    def _apply(self, spec: WorkloadSpec, now: float) -> StepResult:
        try:
            self.capture.apply(spec)
        except CaptureError as exc:
            entry = self.retry.failed(spec.key, str(exc), now)
            self.next_full_resync = min(self.next_full_resync, entry.next_at)
            log.warning("capture for %s failed (attempt %d, retry in %.1fs): %s",
                        spec.ref, entry.attempts, entry.next_at - now, exc)
            return StepResult("pending", str(exc))
        self.retry.succeeded(spec.key)
        self.applied[spec.key] = spec
        return StepResult("none" if self.capture.mode == "none" else "applied")

    # -- full resync ---------------------------------------------------

    def full_resync(self) -> None:
        now = self.clock.now()
        desired = self._desired_map()
        errors: list[str] = []
        for key in list(self.retry_keys()):
            if key not in desired:
                self.retry.forget(key)
        for key, spec in sorted(desired.items()):
            if self._apply(spec, now).state == "pending":
                errors.append(f"apply {spec.ref}: {self.retry.get(key).last_error}")
        # Stale capture goes after the applies: a shared (host) table is rewritten
        # by the applies first, so removing never opens a gap for live workloads.
        for key in sorted(set(self.applied) - set(desired)):
            try:
                self.capture.remove(self.applied[key])
                del self.applied[key]
            except CaptureError as exc:
                errors.append(f"remove {self.applied[key].ref}: {exc}")
        try:
            for leftover in self.capture.sweep(desired.values()):
                log.info("swept leftover capture: %s", leftover)
        except CaptureError as exc:
            errors.append(f"sweep: {exc}")
        self.resync_errors = tuple(errors)
        self.last_full_resync = now
        if errors:
            self._resync_failures += 1
            delay = min(self.retry.cap, self.retry.base * 2 ** (self._resync_failures - 1))
            self.next_full_resync = now + delay
        else:
            self._resync_failures = 0
            self.next_full_resync = now + self.resync_interval

    def _resync_soon(self, now: float) -> None:
        delay = min(self.retry.cap, self.retry.base * 2 ** self._resync_failures)
        self.next_full_resync = min(self.next_full_resync, now + delay)

    def retry_keys(self) -> list[tuple[str, str]]:
        return [key for key, _ in self.retry.items()]

    # -- the loop's step -------------------------------------------------

    def applied_specs(self) -> list[WorkloadSpec]:
        return [self.applied[k] for k in sorted(self.applied)]

    def step(self) -> float:
        """Do what is due; return the clock time at which to step next."""
        now = self.clock.now()
        if now >= self.next_full_resync:
            self.full_resync()
        else:
            desired = self._desired_map()
            for key in self.retry.due(now):
                if key in desired:
                    self._apply(desired[key], now)
                else:
                    self.retry.forget(key)
        next_retry = self.retry.next_due()
        return self.next_full_resync if next_retry is None else min(self.next_full_resync, next_retry)

    def status_of(self, key: tuple[str, str]) -> StepResult:
        entry = self.retry.get(key)
        if entry is not None:
            return StepResult("pending", entry.last_error)
        if key in self.applied:
            return StepResult("none" if self.capture.mode == "none" else "applied")
        return StepResult("pending", "not applied yet")

    def health(self) -> Health:
        reasons = [
            f"capture pending for {self._ref(key)}: {entry.last_error} (attempt {entry.attempts})"
            for key, entry in self.retry.items()
        ]
        reasons.extend(e for e in self.resync_errors if not e.startswith("apply "))
        return Health("Degraded" if reasons else "OK", tuple(reasons))

    def _ref(self, key: tuple[str, str]) -> str:
        spec = self._desired_map().get(key)
        return spec.ref if spec else f"{key[0]} {key[1]}"
