"""Retry policy translation (Istio) and retry decisions (Envoy retry_on)."""
from __future__ import annotations

import pytest

from policy.model import HTTPRetry
from policy.retry import DEFAULT_RETRY_POLICY, RetryPolicy, parse_retry_on, retry_policy_from, should_retry


def policy(retry_on: str, attempts: int = 3, codes=()) -> RetryPolicy:
    names, parsed = parse_retry_on(retry_on.split(","))
    return RetryPolicy(attempts, None, names, parsed | frozenset(codes))


def test_no_retries_field_gives_istio_default():
    p = retry_policy_from(None)
    assert p == DEFAULT_RETRY_POLICY
    assert p.attempts == 2 and p.retriable_status_codes == {503}
    assert p.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled",
                          "retriable-status-codes"}


def test_zero_attempts_disables_retries():
    assert retry_policy_from(HTTPRetry(attempts=0)) is None
    assert not should_retry(None, 1, 503)


def test_user_fields_replace_the_default():
    p = retry_policy_from(HTTPRetry(attempts=3, per_try_timeout=2.0, retry_on=("gateway-error", "connect-failure")))
    assert p == RetryPolicy(3, 2.0, frozenset({"gateway-error", "connect-failure"}), frozenset())


def test_attempts_only_keeps_default_retry_on():
    p = retry_policy_from(HTTPRetry(attempts=5))
    assert p.attempts == 5 and p.retry_on == DEFAULT_RETRY_POLICY.retry_on
    assert p.retriable_status_codes == {503}


def test_bare_status_codes_imply_retriable_status_codes():
    p = retry_policy_from(HTTPRetry(attempts=2, retry_on=("503", "429", "reset")))
    assert p.retry_on == {"reset", "retriable-status-codes"}
    assert p.retriable_status_codes == {503, 429}
    assert should_retry(p, 1, 429)
    assert not should_retry(p, 1, 500)


def test_attempts_count_retries_not_tries():
    p = policy("5xx", attempts=2)
    assert should_retry(p, 1, 500) and should_retry(p, 2, 500)
    assert not should_retry(p, 3, 500)


@pytest.mark.parametrize("retry_on,status,error,expected", [
    ("5xx", 500, None, True),
    ("5xx", 503, None, True),
    ("5xx", 404, None, False),
    ("5xx", None, "reset", True),
    ("5xx", None, "connect-failure", True),
    ("5xx", None, "timeout", True),
    ("gateway-error", 502, None, True),
    ("gateway-error", 504, None, True),
    ("gateway-error", 500, None, False),
    ("gateway-error", None, "reset", True),
    ("reset", None, "timeout", True),
    ("reset", 503, None, False),
    ("connect-failure", None, "connect-failure", True),
    ("connect-failure", None, "reset", False),
    ("connect-failure", None, "timeout", False),
    ("connect-failure", 503, None, False),
    ("refused-stream", None, "refused-stream", True),
    ("refused-stream", None, "reset", False),
    ("reset-before-request", None, "connect-failure", True),
    ("retriable-4xx", 409, None, True),
    ("retriable-4xx", 404, None, False),
    ("retriable-status-codes", 503, None, False),   # no codes given
    ("503", 503, None, True),
])
def test_retry_on_tokens(retry_on, status, error, expected):
    assert should_retry(policy(retry_on), 1, status, error) is expected


@pytest.mark.parametrize("retry_on,grpc,expected", [
    ("unavailable", 14, True), ("cancelled", 1, True), ("deadline-exceeded", 4, True),
    ("resource-exhausted", 8, True), ("internal", 13, True), ("unavailable", 4, False),
])
def test_grpc_status_tokens(retry_on, grpc, expected):
    assert should_retry(policy(retry_on), 1, 200, grpc_status=grpc) is expected


def test_default_policy_behaviour():
    p = DEFAULT_RETRY_POLICY
    assert should_retry(p, 1, 503)
    assert not should_retry(p, 1, 500)
    assert should_retry(p, 1, None, "connect-failure")
    assert not should_retry(p, 1, None, "reset")
    assert not should_retry(p, 1, None, "timeout")
    assert should_retry(p, 2, 200, grpc_status=14)
    assert not should_retry(p, 3, 503)


def test_unknown_error_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown upstream error"):
        should_retry(policy("5xx"), 1, None, "exploded")
