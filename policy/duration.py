"""Istio/protobuf duration strings (``10ms``, ``1.5s``, ``5m``, ``1h30m``) -> float seconds.

Istio reads durations with Go's ``time.ParseDuration`` syntax: one or more
``<number><unit>`` with units ``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``;
the bare string ``0`` is also accepted. A number without a unit (``10``) is an
error, so is an unknown unit (``1x``). Negative values parse (``-1s``) but
``parse_duration(..., allow_negative=False)`` (the default) rejects them,
as every Istio duration field does.

Values are summed exactly in integer nanoseconds (digits below a nanosecond are
dropped, as Go does) and must fit protobuf's ``google.protobuf.Duration``, which
Istio's fields are: at most 315576000000 s (about 10000 years) either way.
"""
from __future__ import annotations

import re

__all__ = ["DurationError", "parse_duration", "format_duration", "MAX_DURATION_SECONDS"]

MAX_DURATION_SECONDS = 315_576_000_000          # google.protobuf.Duration's range
_MAX_NS = MAX_DURATION_SECONDS * 1_000_000_000
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
          "m": 60_000_000_000, "h": 3_600_000_000_000}   # nanoseconds
_PART = re.compile(r"(\d*)(?:\.(\d*))?(ns|us|µs|μs|ms|s|m|h)")
_NUMBER_ONLY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


class DurationError(ValueError):
    pass


def parse_duration(text: str, allow_negative: bool = False) -> float:
    """Parse ``text`` into seconds; raises ``DurationError`` with a user-facing reason."""
    if not isinstance(text, str):
        raise DurationError(f'must be a duration string such as "10s" or "500ms", got {text!r}')
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    if not s:
        raise DurationError('must be a duration such as "10s" or "500ms", got an empty string')
    sign = 1.0
    body = s
    if body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    pos = 0
    total = 0           # nanoseconds, exact
    too_large = DurationError(f'duration "{text}" is too large: the maximum is {MAX_DURATION_SECONDS}s '
                              f'(about 10000 years)')
    while pos < len(body):
        m = _PART.match(body, pos)
        if not m or not (m.group(1) or m.group(2)):
            if _NUMBER_ONLY.fullmatch(s):
                raise DurationError(f'missing unit in duration "{text}" (write e.g. "{s}s" or "{s}ms")')
            raise DurationError(f'invalid duration "{text}": use a number with a unit '
                                f'ns, us, ms, s, m or h, e.g. "1.5s", "10ms", "1h"')
        whole = m.group(1).lstrip("0")
        if len(whole) > 24:     # more than any in-range value; also keeps int() within its digit limit
            raise too_large
        unit = _UNITS[m.group(3)]
        frac = (m.group(2) or "")[:13]      # 13 digits: below a nanosecond even in hours
        total += int(whole or "0") * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        if total > _MAX_NS:
            raise too_large
        pos = m.end()
    if pos == 0:
        raise DurationError(f'invalid duration "{text}"')
    if sign < 0 and total and not allow_negative:
        raise DurationError(f'duration must not be negative, got "{text}"')
    return sign * total / 1e9


def format_duration(seconds: float) -> str:
    """Shortest exact-ish Istio form: 0.5 -> "500ms", 300 -> "5m", 1.5 -> "1.5s"."""
    if seconds == 0:
        return "0s"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 1:
        return f"{seconds:g}s"
    ms = seconds * 1000
    if abs(ms - round(ms)) < 1e-9:
        return f"{int(round(ms))}ms"
    return f"{seconds:g}s"
