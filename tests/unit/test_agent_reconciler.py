"""The capture reconciler: incremental steps, retry with backoff, full resync, health.

The capture backend here is an in-memory table of applied rules that can be
told to fail for a target (the kernel-backed adapters are tested in the
redirect/bpf suites); the clock is pinned.
"""
from __future__ import annotations

from nodeagent.agent.capture import CaptureError
from nodeagent.agent.reconciler import Reconciler
from nodeagent.agent.registry import Registry, RetrySet
from nodeagent.agent.workload import spec_from_json


class PinnedClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


class TableCapture:
    mode = "nftables"

    def __init__(self) -> None:
        self.rules: dict[tuple[str, str], str] = {}
        self.failing: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def apply(self, spec):
        self.calls.append(("apply", spec.target))
        if spec.target in self.failing:
            raise CaptureError(f"netns {spec.target}: No such file or directory")
        self.rules[spec.key] = spec.name

    def remove(self, spec):
        self.calls.append(("remove", spec.target))
        self.rules.pop(spec.key, None)

    def sweep(self, keep):
        keys = {s.key for s in keep}
        gone = sorted(k for k in self.rules if k not in keys)
        for k in gone:
            del self.rules[k]
        return [f"{k[0]} {k[1]}" for k in gone]


def spec(name, ip):
    return spec_from_json({"kind": "netns", "target": f"pod-{name}", "name": name, "namespace": "shop",
                           "service_account": name, "ips": [ip]})


def make():
    reg, cap, clock = Registry(), TableCapture(), PinnedClock()
    rec = Reconciler(lambda: list(reg), cap, clock, RetrySet(base=1.0, cap=4.0), resync_interval=60.0)
    return reg, cap, clock, rec


def test_first_step_adopts_the_registry_and_sweeps_leftovers():
    reg, cap, clock, rec = make()
    reg.enroll(spec("web", "10.250.0.2"))
    cap.rules[("netns", "pod-stale")] = "stale"  # left by a previous run
    wake = rec.step()
    assert cap.rules == {("netns", "pod-web"): "web"}
    assert rec.health().ok
    assert wake == clock.t + 60.0


def test_incremental_apply_and_remove():
    reg, cap, clock, rec = make()
    rec.step()
    reg.enroll(spec("web", "10.250.0.2"))
    assert rec.sync_one(("netns", "pod-web")).state == "applied"
    assert ("netns", "pod-web") in cap.rules
    reg.unenroll("netns", "pod-web")
    assert rec.sync_one(("netns", "pod-web")).state == "removed"
    assert cap.rules == {}


def test_failed_capture_is_retried_with_backoff_then_health_recovers():
    reg, cap, clock, rec = make()
    rec.step()
    reg.enroll(spec("web", "10.250.0.2"))
    cap.failing.add("pod-web")
    result = rec.sync_one(("netns", "pod-web"))
    assert result.state == "pending" and "No such file" in result.error
    health = rec.health()
    assert health.status == "Degraded"
    assert "capture pending for shop/web (netns pod-web)" in health.reasons[0]
    # Not due yet: nothing happens before the backoff.
    wake = rec.step()
    assert wake == clock.t + 1.0
    calls = len(cap.calls)
    clock.t += 0.5
    rec.step()
    assert len(cap.calls) == calls
    # Due: a full resync (the incremental step failed) that fails again -> backoff doubles.
    clock.t += 0.5
    rec.step()
    assert rec.retry.get(("netns", "pod-web")).attempts == 2
    assert rec.retry.get(("netns", "pod-web")).next_at == clock.t + 2.0
    # The netns appears; the next due step applies and health is OK again.
    cap.failing.clear()
    clock.t += 2.0
    rec.step()
    assert ("netns", "pod-web") in cap.rules
    assert rec.health().ok and len(rec.retry) == 0
    assert rec.status_of(("netns", "pod-web")).state == "applied"


def test_unenrolled_workload_leaves_the_retry_set():
    reg, cap, clock, rec = make()
    rec.step()
    reg.enroll(spec("web", "10.250.0.2"))
    cap.failing.add("pod-web")
    rec.sync_one(("netns", "pod-web"))
    reg.unenroll("netns", "pod-web")
    rec.sync_one(("netns", "pod-web"))
    assert len(rec.retry) == 0 and rec.health().ok


def test_periodic_resync_repairs_drift():
    reg, cap, clock, rec = make()
    reg.enroll(spec("web", "10.250.0.2"))
    rec.step()
    cap.rules.clear()  # someone flushed the rules
    clock.t += 59.0
    rec.step()
    assert cap.rules == {}
    clock.t += 1.0
    rec.step()
    assert cap.rules == {("netns", "pod-web"): "web"}


def test_one_failing_workload_does_not_block_the_others():
    reg, cap, clock, rec = make()
    reg.enroll(spec("web", "10.250.0.2"))
    reg.enroll(spec("db", "10.250.0.3"))
    cap.failing.add("pod-db")
    rec.step()
    assert cap.rules == {("netns", "pod-web"): "web"}
    assert rec.status_of(("netns", "pod-db")).state == "pending"
    assert rec.health().status == "Degraded"
