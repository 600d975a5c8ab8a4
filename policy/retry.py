"""Retry decisions for one upstream request, as Istio configures Envoy.

Pure: the proxy asks ``should_retry`` after each failed attempt and, on True,
picks another endpoint (the picker's ``exclude`` holds the ones tried).
"""
from __future__ import annotations

from dataclasses import dataclass


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


def retry_policy_from(retries) -> RetryPolicy | None:
    """Convert a VirtualService ``HTTPRetry`` (or None) as Istio does.

    None -> Istio's default policy (2 retries on connect-failure, refused-stream,
    unavailable, cancelled, retriable-status-codes=503); ``attempts: 0`` -> None
    (retries disabled); otherwise the default with the user's fields replacing it.
    """
    raise NotImplementedError


def should_retry(policy: RetryPolicy | None, attempt_no: int, status: int | None,
                 error: str | None = None, grpc_status: int | None = None) -> bool:
    """Whether attempt number ``attempt_no`` (1 = the first try) may be retried.

    ``status`` is the upstream response status (None when there was no response);
    ``error`` is "connect-failure", "refused-stream", "reset" or "timeout" (the
    per-try timeout) when there was no response; ``grpc_status`` the numeric
    ``grpc-status`` of the response headers/trailers if any.
    """
    raise NotImplementedError
