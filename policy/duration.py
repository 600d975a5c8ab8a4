"""Istio/protobuf duration strings (``10ms``, ``1.5s``, ``5m``, ``1h30m``) -> float seconds.

Istio reads durations with Go's ``time.ParseDuration`` syntax: one or more
``<number><unit>`` with units ``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``;
the bare string ``0`` is also accepted. A number without a unit (``10``) is an
error, so is an unknown unit (``1x``). Negative values parse (``-1s``) but
``parse_duration(..., allow_negative=False)`` (the default) rejects them,
as every Istio duration field does.
"""
from __future__ import annotations

import re

__all__ = ["DurationError", "parse_duration", "format_duration"]

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
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
    total = 0.0
    while pos < len(body):
        m = _PART.match(body, pos)
        if not m:
            if _NUMBER_ONLY.fullmatch(s):
                raise DurationError(f'missing unit in duration "{text}" (write e.g. "{s}s" or "{s}ms")')
            raise DurationError(f'invalid duration "{text}": use a number with a unit '
                                f'ns, us, ms, s, m or h, e.g. "1.5s", "10ms", "1h"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise DurationError(f'invalid duration "{text}"')
    value = sign * total
    if value < 0 and not allow_negative:
        raise DurationError(f'duration must not be negative, got "{text}"')
    return value


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
