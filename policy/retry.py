"""Retry decisions for one upstream request, as Istio configures Envoy.

Pure: the proxy asks ``should_retry`` after each failed attempt and, on True,
picks another endpoint (the picker's ``exclude`` holds the ones tried, as
Istio's ``previous_hosts`` retry predicate does).

Istio's translation (pilot ``retry.ConvertPolicy``):

- no ``retries`` in the route -> the default policy: 2 retries on
  ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``
  with retriable status code 503;
- ``attempts: 0`` -> retries disabled;
- otherwise the default with ``attempts`` replaced, ``retryOn`` replaced when
  given (bare numbers in it are status codes and imply
  ``retriable-status-codes``), ``perTryTimeout`` when given, ``backoff`` as
  Envoy's ``retry_back_off.base_interval`` (its ``max_interval`` then defaults
  to 10 times that).

Between attempts Envoy waits a fully jittered exponential back-off
(``backoff_delay``): before retry N a uniform random time in
``[0, (2^N - 1) * base)``, at most ``max``; by default base 25 ms and max 250 ms
(0-25 ms before the first retry, 0-75 ms before the second, 0-175 ms before the
third, then up to 250 ms). The route ``timeout`` keeps running during the wait;
``perTryTimeout`` starts with each try.
"""
from __future__ import annotations

from dataclasses import dataclass

# gRPC status names Envoy accepts in retry_on, and their codes.
GRPC_RETRY_ON = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

DEFAULT_BACKOFF_BASE = 0.025  # Envoy's default retry back-off base interval (seconds)
DEFAULT_BACKOFF_MAX = 0.25    # Envoy's default max interval: 10 times the base

_LOCAL_ERRORS = frozenset({"connect-failure", "refused-stream", "reset", "timeout"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Effective retry policy of one route.

    ``attempts`` is the number of RETRIES after the first try (Istio's
    ``HTTPRetry.attempts`` becomes Envoy's ``num_retries``), so a request is
    tried at most ``attempts + 1`` times. ``retry_on`` holds Envoy retry-on
    tokens; ``retriable_status_codes`` the codes that ``retriable-status-codes``
    (and bare codes written in Istio's ``retryOn``) make retriable.
    ``backoff_base`` / ``backoff_max`` are the back-off's base and max intervals
    in seconds (``backoff_delay``).
    """
    attempts: int
    per_try_timeout: float | None
    retry_on: frozenset[str]
    retriable_status_codes: frozenset[int]
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_MAX


DEFAULT_RETRY_POLICY = RetryPolicy(
    attempts=2,
    per_try_timeout=None,
    retry_on=frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                        "retriable-status-codes"}),
    retriable_status_codes=frozenset({503}),
)


def parse_retry_on(tokens) -> tuple[frozenset[str], frozenset[int]]:
    """Split Istio ``retryOn`` tokens (already split on commas) into Envoy
    retry-on names and bare status codes; codes imply ``retriable-status-codes``."""
    names: set[str] = set()
    codes: set[int] = set()
    for raw in tokens:
        t = raw.strip()
        if not t:
            continue
        if t.isdigit():
            codes.add(int(t))
        else:
            names.add(t)
    if codes:
        names.add("retriable-status-codes")
    return frozenset(names), frozenset(codes)


def retry_policy_from(retries) -> RetryPolicy | None:
    """Convert a VirtualService ``HTTPRetry`` (or None) as Istio does.

    None -> Istio's default policy (2 retries on connect-failure, refused-stream,
    unavailable, cancelled, retriable-status-codes=503); ``attempts: 0`` -> None
    (retries disabled); otherwise the default with the user's fields replacing it.
    """
    if retries is None:
        return DEFAULT_RETRY_POLICY
    if not retries.attempts or retries.attempts <= 0:
        return None
    retry_on = DEFAULT_RETRY_POLICY.retry_on
    codes = DEFAULT_RETRY_POLICY.retriable_status_codes
    if retries.retry_on:
        retry_on, codes = parse_retry_on(retries.retry_on)
    per_try = retries.per_try_timeout if retries.per_try_timeout else None
    base, cap = DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX
    if retries.backoff:
        # Istio sets only Envoy's base_interval; Envoy's max_interval is then 10x it
        base = retries.backoff
        cap = 10.0 * base
    return RetryPolicy(attempts=retries.attempts, per_try_timeout=per_try,
                       retry_on=retry_on, retriable_status_codes=codes,
                       backoff_base=base, backoff_max=cap)


def backoff_delay(policy: RetryPolicy, retry_no: int, rand) -> float:
    """Seconds to wait before retry number ``retry_no`` (1 = the first retry, i.e. the
    second attempt): Envoy's fully jittered exponential back-off, a uniform draw in
    ``[0, (2^retry_no - 1) * base)`` capped at ``max``. ``rand`` is a
    ``random.Random`` (only ``random()`` is called, once)."""
    if retry_no < 1:
        raise ValueError(f"retry_no counts retries from 1, got {retry_no}")
    base = policy.backoff_base
    cap = policy.backoff_max
    # once the window passes the cap it stops growing (Envoy stops doubling there too)
    window = base * ((1 << min(retry_no, 62)) - 1)
    delay = rand.random() * window
    return delay if delay < cap else cap


def should_retry(policy: RetryPolicy | None, attempt_no: int, status: int | None,
                 error: str | None = None, grpc_status: int | None = None) -> bool:
    """Whether attempt number ``attempt_no`` (1 = the first try) may be retried.

    ``status`` is the upstream response status (None when there was no response);
    ``error`` is "connect-failure", "refused-stream", "reset" or "timeout" (the
    per-try timeout) when there was no response; ``grpc_status`` the numeric
    ``grpc-status`` of the response headers/trailers if any.

    Envoy semantics: ``5xx`` and ``gateway-error`` also retry every reset,
    connect failure and per-try timeout; ``reset`` retries resets, connect
    failures and timeouts; ``connect-failure`` only connect failures;
    ``refused-stream`` only REFUSED_STREAM resets; ``retriable-4xx`` is 409.
    The method does not matter (Envoy does not consider idempotency).
    """
    if policy is None or attempt_no > policy.attempts:
        return False
    on = policy.retry_on
    if status is None:
        if error is None:
            error = "reset"
        elif error not in _LOCAL_ERRORS:
            raise ValueError(f"unknown upstream error {error!r}; expected one of {sorted(_LOCAL_ERRORS)}")
        if "5xx" in on or "gateway-error" in on or "reset" in on:
            return True
        if error == "connect-failure":
            return "connect-failure" in on or "reset-before-request" in on
        if error == "refused-stream":
            return "refused-stream" in on or "reset-before-request" in on
        return False
    if 500 <= status <= 599:
        if "5xx" in on:
            return True
        if status in (502, 503, 504) and "gateway-error" in on:
            return True
    if status == 409 and "retriable-4xx" in on:
        return True
    if "retriable-status-codes" in on and status in policy.retriable_status_codes:
        return True
    if grpc_status is not None:
        for name, code in GRPC_RETRY_ON.items():
            if code == grpc_status and name in on:
                return True
    return False
