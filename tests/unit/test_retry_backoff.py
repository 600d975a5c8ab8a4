"""policy.retry.backoff_delay: Envoy's fully jittered exponential retry back-off, and
Istio's ``retries.backoff`` (Envoy's base_interval; max_interval 10x)."""
from __future__ import annotations

import random

import pytest

from policy.model import HTTPRetry
from policy.retry import DEFAULT_RETRY_POLICY, backoff_delay, retry_policy_from


class Fixed:
    """A random source whose random() is always ``x`` (what backoff_delay reads)."""

    def __init__(self, x: float) -> None:
        self.x = x

    def random(self) -> float:
        return self.x


@pytest.mark.parametrize("retry_no, x, expected", [
    (1, 0.0, 0.0),
    (1, 0.5, 0.0125),           # [0, 25 ms)
    (1, 0.999, 0.024975),
    (2, 0.5, 0.0375),           # [0, 75 ms)
    (3, 0.5, 0.0875),           # [0, 175 ms)
    (3, 0.999, 0.174825),
    (4, 0.5, 0.1875),           # window 375 ms, below the cap at this draw
    (4, 0.9, 0.25),             # capped at max 250 ms
    (10, 0.999, 0.25),
    (200, 0.999, 0.25),         # no overflow far out
])
def test_default_backoff_windows(retry_no, x, expected):
    assert backoff_delay(DEFAULT_RETRY_POLICY, retry_no, Fixed(x)) == pytest.approx(expected)


def test_draws_stay_in_their_window_and_under_the_cap():
    rand = random.Random(7)
    for retry_no in range(1, 8):
        window = 0.025 * (2 ** retry_no - 1)
        draws = [backoff_delay(DEFAULT_RETRY_POLICY, retry_no, rand) for _ in range(2000)]
        assert all(0.0 <= d <= min(window, 0.25) for d in draws)
        if window <= 0.25:
            # full jitter: the draws spread over the window (mean about half of it)
            assert 0.45 * window < sum(draws) / len(draws) < 0.55 * window
        else:
            # beyond the cap, the share of draws past it lands exactly on it
            capped = sum(d == 0.25 for d in draws) / len(draws)
            assert abs(capped - (1 - 0.25 / window)) < 0.05


def test_istio_backoff_is_the_base_interval_and_caps_at_ten_times():
    p = retry_policy_from(HTTPRetry(attempts=3, backoff=0.1))
    assert (p.backoff_base, p.backoff_max) == (0.1, pytest.approx(1.0))
    assert backoff_delay(p, 1, Fixed(0.5)) == pytest.approx(0.05)
    assert backoff_delay(p, 3, Fixed(0.5)) == pytest.approx(0.35)
    assert backoff_delay(p, 5, Fixed(0.9)) == pytest.approx(1.0)


def test_without_backoff_the_envoy_defaults_apply():
    p = retry_policy_from(HTTPRetry(attempts=3))
    assert (p.backoff_base, p.backoff_max) == (0.025, 0.25)
    assert (DEFAULT_RETRY_POLICY.backoff_base, DEFAULT_RETRY_POLICY.backoff_max) == (0.025, 0.25)


def test_retry_numbers_start_at_one():
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(DEFAULT_RETRY_POLICY, 0, Fixed(0.5))
