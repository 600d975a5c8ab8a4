"""Outlier detection state machine (Envoy semantics) with a fake clock."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.model import OutlierDetection
from policy.outlier import EjectionEvent, OutlierDetector, OutlierPolicy, outlier_policy_from


def detector(n: int = 1, **kw) -> tuple[OutlierDetector, list[str]]:
    ids = [f"10.0.0.{i + 1}:80" for i in range(n)]
    kw.setdefault("consecutive_5xx", 5)
    kw.setdefault("consecutive_gateway", 0)
    kw.setdefault("max_ejection_percent", 100.0)
    return OutlierDetector(OutlierPolicy(**kw), now=0.0, endpoint_ids=ids), ids


# -- Istio translation and defaults ------------------------------------------

def test_absent_outlier_detection_means_none():
    assert outlier_policy_from(None) is None


def test_istio_defaults_when_fields_absent():
    p = outlier_policy_from(OutlierDetection())
    assert p == OutlierPolicy(consecutive_5xx=5, consecutive_gateway=0, interval=10.0,
                              base_ejection_time=30.0, max_ejection_time=300.0,
                              max_ejection_percent=10.0, min_health_percent=0.0)


def test_legacy_consecutive_errors_counts_gateway_errors_only():
    p = outlier_policy_from(OutlierDetection(consecutive_errors=7))
    assert (p.consecutive_gateway, p.consecutive_5xx) == (7, 0)


def test_explicit_fields_override_legacy_consecutive_errors():
    p = outlier_policy_from(OutlierDetection(consecutive_errors=7, consecutive_5xx_errors=3))
    assert (p.consecutive_gateway, p.consecutive_5xx) == (7, 3)
    p = outlier_policy_from(OutlierDetection(consecutive_errors=7, consecutive_gateway_errors=2))
    assert (p.consecutive_gateway, p.consecutive_5xx) == (2, 0)


def test_zero_disables_and_zero_max_ejection_percent_means_default():
    p = outlier_policy_from(OutlierDetection(consecutive_5xx_errors=0, max_ejection_percent=0))
    assert p.consecutive_5xx == 0
    assert p.max_ejection_percent == 10.0


def test_max_ejection_time_is_300s_or_base_if_larger():
    assert outlier_policy_from(OutlierDetection(base_ejection_time=60)).max_ejection_time == 300.0
    assert outlier_policy_from(OutlierDetection(base_ejection_time=900)).max_ejection_time == 900.0


def test_split_local_origin_default_threshold():
    p = outlier_policy_from(OutlierDetection(split_external_local_origin_errors=True))
    assert p.split_external_local_origin_errors and p.consecutive_local_origin == 5
    p = outlier_policy_from(OutlierDetection(split_external_local_origin_errors=True,
                                             consecutive_local_origin_failures=2))
    assert p.consecutive_local_origin == 2


# -- counting ----------------------------------------------------------------

def test_ejects_exactly_at_the_count():
    d, (a,) = detector(consecutive_5xx=3)
    assert d.record_result(a, 500, 1.0) is None
    assert d.record_result(a, 502, 2.0) is None
    ev = d.record_result(a, 503, 3.0)
    assert ev == EjectionEvent(a, "consecutive_5xx", 3.0, 33.0, 1)
    assert d.is_ejected(a) and d.ejected() == {a}


def test_success_resets_the_consecutive_count():
    d, (a,) = detector(consecutive_5xx=3)
    for status in (500, 500, 200, 500, 500, 404):
        assert d.record_result(a, status, 1.0) is None
    assert not d.is_ejected(a)
    assert d.snapshot_state(1.0)[a]["consecutive_5xx"] == 0


def test_gateway_errors_only_count_502_503_504():
    d, (a,) = detector(consecutive_5xx=0, consecutive_gateway=3)
    for status in (503, 504, 500):      # 500 is a 5xx but not a gateway error: resets
        assert d.record_result(a, status, 1.0) is None
    assert d.record_result(a, 502, 2.0) is None
    assert d.record_result(a, 503, 2.0) is None
    ev = d.record_result(a, 504, 2.0)
    assert ev is not None and ev.reason == "consecutive_gateway"


def test_local_failures_map_to_gateway_errors_without_split():
    d, (a,) = detector(consecutive_5xx=0, consecutive_gateway=3)
    d.record_result(a, None, 1.0, "connect-failure")
    d.record_result(a, None, 1.0, "timeout")
    ev = d.record_result(a, None, 1.0, "reset")
    assert ev is not None and ev.reason == "consecutive_gateway"


def test_connect_failure_shorthand():
    d, (a,) = detector(consecutive_5xx=0, consecutive_gateway=2, split_external_local_origin_errors=True,
                       consecutive_local_origin=2)
    assert d.record_result(a, None, 1.0, connect_failure=True) is None
    ev = d.record_result(a, None, 1.0, connect_failure=True)
    assert ev is not None and ev.reason == "consecutive_local_origin"


def test_split_counts_local_failures_separately():
    d, (a,) = detector(consecutive_5xx=2, split_external_local_origin_errors=True,
                       consecutive_local_origin=3)
    d.record_result(a, None, 1.0, "connect-failure")
    d.record_result(a, None, 1.0, "connect-failure")
    assert d.snapshot_state(1.0)[a]["consecutive_5xx"] == 0
    d.record_result(a, 200, 1.0)          # the connection worked: local counter resets
    d.record_result(a, None, 1.0, "timeout")
    d.record_result(a, None, 1.0, "timeout")
    ev = d.record_result(a, None, 1.0, "timeout")
    assert ev is not None and ev.reason == "consecutive_local_origin"


def test_unknown_local_failure_is_an_error():
    d, (a,) = detector()
    with pytest.raises(ValueError, match="unknown local failure"):
        d.record_result(a, None, 1.0, "bogus")


# -- timing: multiplier, sweeps ---------------------------------------------

def eject(d, a, now, n=5, status=503):
    ev = None
    for _ in range(n):
        ev = d.record_result(a, status, now) or ev
    return ev


def test_readmission_only_at_a_sweep_after_the_ejection_time():
    d, (a,) = detector(interval=10.0, base_ejection_time=30.0)
    assert eject(d, a, 5.0).until == 35.0
    assert d.sweep(10.0) == [] and d.sweep(20.0) == [] and d.sweep(30.0) == []
    assert d.is_ejected(a)
    assert d.sweep(40.0) == [a]           # first sweep at/after 35
    assert not d.is_ejected(a)
    assert d.next_sweep == 50.0


def test_ejection_time_grows_with_the_multiplier_and_is_capped():
    d, (a,) = detector(interval=1.0, base_ejection_time=100.0, max_ejection_time=300.0)
    durations = []
    now = 0.0
    for _ in range(5):
        ev = eject(d, a, now)
        durations.append(ev.until - ev.at)
        now = ev.until
        assert d.sweep(now) == [a]        # no healthy sweep in between: no decay
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0]
    assert d.snapshot_state(now)[a]["times_ejected"] == 5


def test_multiplier_decays_one_step_per_healthy_sweep():
    d, (a,) = detector(interval=1.0, base_ejection_time=10.0)
    for _ in range(3):
        ev = eject(d, a, 0.0)
        assert d.sweep(ev.until) == [a]
    assert d.snapshot_state(0)[a]["multiplier"] == 3
    d.sweep(100.0)
    d.sweep(101.0)
    assert d.snapshot_state(0)[a]["multiplier"] == 1
    ev = eject(d, a, 200.0)
    assert ev.until - ev.at == 20.0       # multiplier back to 2


def test_readmission_resets_counters():
    d, (a,) = detector(consecutive_5xx=3, interval=1.0, base_ejection_time=1.0)
    eject(d, a, 0.0, n=3)
    d.record_result(a, 500, 0.5)          # counted while ejected
    d.sweep(1.0)
    assert d.snapshot_state(1.0)[a]["consecutive_5xx"] == 0


# -- maxEjectionPercent / minHealthPercent ----------------------------------

def test_max_ejection_percent_caps_ejections():
    d, ids = detector(4, max_ejection_percent=50.0)
    assert eject(d, ids[0], 1.0) is not None
    assert eject(d, ids[1], 1.0) is not None
    assert eject(d, ids[2], 1.0) is None          # 3/4 = 75% > 50%
    assert d.ejected() == {ids[0], ids[1]}


def test_at_least_one_host_can_always_be_ejected():
    d, ids = detector(3, max_ejection_percent=10.0)
    assert eject(d, ids[0], 1.0) is not None
    assert eject(d, ids[1], 1.0) is None


def test_strict_max_ejection_percent_ejects_nobody_below_ten_hosts():
    # Envoy >= 1.27 without always_eject_one_host: 100 * (ejected + 1) / hosts <= max
    d, ids = detector(9, max_ejection_percent=10.0, always_eject_one_host=False)
    assert eject(d, ids[0], 1.0) is None
    d, ids = detector(10, max_ejection_percent=10.0, always_eject_one_host=False)
    assert eject(d, ids[0], 1.0) is not None
    assert eject(d, ids[1], 1.0) is None


def test_max_ejection_percent_applies_after_the_first_ejection():
    d, ids = detector(20, max_ejection_percent=10.0)
    assert eject(d, ids[0], 1.0) is not None
    assert eject(d, ids[1], 1.0) is not None        # 2/20 = 10%
    assert eject(d, ids[2], 1.0) is None


def test_min_health_percent_ignores_ejections_below_it():
    d, ids = detector(4, min_health_percent=50.0)
    eject(d, ids[0], 1.0)
    eject(d, ids[1], 1.0)
    assert d.ejected() == {ids[0], ids[1]}        # 50% healthy: not below
    eject(d, ids[2], 1.0)
    assert d.is_ejected(ids[2])
    assert d.ejected() == frozenset()             # 25% < 50%: panic, use all
    assert d.available(ids) == tuple(ids)


def test_all_ejected_without_min_health_leaves_nothing_available():
    d, ids = detector(2)
    eject(d, ids[0], 1.0)
    eject(d, ids[1], 1.0)
    assert d.available(ids) == ()


def test_set_endpoints_drops_state_of_removed_hosts():
    d, ids = detector(3)
    eject(d, ids[0], 1.0)
    d.set_endpoints(ids[1:] + ["10.0.0.9:80"])
    assert d.ejected() == frozenset()
    assert set(d.snapshot_state(1.0)) == {ids[1], ids[2], "10.0.0.9:80"}


# -- the seed catalog rule ---------------------------------------------------

def test_catalog_rule_consecutive_errors_5_interval_5m_base_15m():
    p = outlier_policy_from(OutlierDetection(consecutive_errors=5, interval=300.0,
                                             base_ejection_time=900.0, max_ejection_percent=100))
    d = OutlierDetector(p, now=0.0, endpoint_ids=["10.1.0.1:8080"])
    a = "10.1.0.1:8080"
    now = 12.0
    for i in range(4):
        assert d.record_result(a, 503, now + i) is None
    ev = d.record_result(a, 503, now + 4)
    assert ev is not None and ev.at == 16.0 and ev.until == 916.0
    assert d.available([a]) == ()
    # receives nothing for 15 minutes: sweeps at 300, 600, 900 keep it out
    for t in (300.0, 600.0, 900.0):
        assert d.next_sweep == t
        assert d.sweep(t) == []
        assert d.available([a]) == ()
    # readmitted at the first sweep after 15 minutes
    assert d.next_sweep == 1200.0
    assert d.sweep(1200.0) == [a]
    assert d.available([a]) == (a,)


def test_catalog_rule_500s_do_not_count_as_gateway_errors():
    p = outlier_policy_from(OutlierDetection(consecutive_errors=5, interval=300.0,
                                             base_ejection_time=900.0, max_ejection_percent=100))
    d = OutlierDetector(p, endpoint_ids=["a"])
    for i in range(20):
        assert d.record_result("a", 500, float(i)) is None


# -- properties ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    pct=st.sampled_from([10.0, 25.0, 50.0, 100.0]),
    events=st.lists(st.tuples(st.integers(0, 11), st.sampled_from([200, 404, 500, 502, 503, 504, None]),
                              st.floats(min_value=0.0, max_value=5.0)), max_size=120),
)
def test_ejections_never_exceed_the_cap_and_all_return(n, pct, events):
    d, ids = detector(n, consecutive_5xx=2, consecutive_gateway=2, max_ejection_percent=pct,
                      interval=1.0, base_ejection_time=2.0)
    cap = max(1, int(n * pct / 100 + 1e-9))
    now = 0.0
    for idx, status, dt in events:
        now += dt
        while d.next_sweep <= now:
            d.sweep(d.next_sweep)
        ev = d.record_result(ids[idx % n], status, now)
        if ev is not None:
            assert ev.until > ev.at and d.is_ejected(ev.endpoint_id)
        assert len(d.ejected()) <= cap
    # with no more failures, everyone is back once the longest ejection (300s cap) has passed
    d.sweep(now + 301.0)
    assert d.ejected() == frozenset()
