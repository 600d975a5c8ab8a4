"""Duration bounds: protobuf's google.protobuf.Duration range, exact nanoseconds."""
from __future__ import annotations

import pytest

from policy.duration import MAX_DURATION_SECONDS, DurationError, parse_duration


def test_maximum_is_protobufs():
    assert MAX_DURATION_SECONDS == 315_576_000_000
    assert parse_duration("315576000000s") == 315576000000.0
    assert parse_duration("87660000h") == 315576000000.0
    assert parse_duration("315575999999.999999999s") == pytest.approx(315576000000.0)


@pytest.mark.parametrize("text", [
    "315576000000.000000001s",        # the nanosecond part takes it over the maximum
    "315576000001s", "87660000h1ns", "5259600001m",
    "99999999999999999999999999h",
    "9" * 5000 + "s",                 # more digits than Python's int() takes: still a clean error
    "0." + "0" * 5000 + "1s" + "9" * 30 + "h",
])
def test_above_maximum(text):
    with pytest.raises(DurationError) as ei:
        parse_duration(text)
    assert "too large" in str(ei.value) and "315576000000s" in str(ei.value)


def test_below_minimum_when_negative_allowed():
    assert parse_duration("-315576000000s", allow_negative=True) == -315576000000.0
    with pytest.raises(DurationError) as ei:
        parse_duration("-315576000001s", allow_negative=True)
    assert "too large" in str(ei.value)


def test_exact_nanoseconds():
    assert parse_duration("1.000000001s") == 1.000000001
    assert parse_duration("0.1s2ms") == pytest.approx(0.102)
    # digits below a nanosecond are dropped (as Go's time.ParseDuration does), not rounded up
    assert parse_duration("0.9999999999ns") == 0.0
    assert parse_duration("1." + "9" * 40 + "ns") == 1e-9
    assert parse_duration("00000000000000000000000000001s") == 1.0
