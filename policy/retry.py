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
  ``retriable-status-codes``), ``perTryTimeout`` when given.
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

_LOCAL_ERRORS = frozenset({"connect-failure", "refused-stream", "reset", "timeout"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Effective retry policy of one route.

    ``attempts`` is the number of RETRIES after the first try (Istio's
    ``HTTPRetry.attempts`` becomes Envoy's ``num_retries``), so a request is
    tried at most ``attempts + 1`` times. ``retry_on`` holds Envoy retry-on
    tokens; ``retriable_status_codes`` the codes that ``retriable-status-codes``
    (and bare codes written in Istio's ``retryOn``) make retriable.
    """
    attempts: int
    per_try_timeout: float | None
    retry_on: frozenset[str]
    retriable_status_codes: frozenset[int]


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
    return RetryPolicy(attempts=retries.attempts, per_try_timeout=per_try,
                       retry_on=retry_on, retriable_status_codes=codes)


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
