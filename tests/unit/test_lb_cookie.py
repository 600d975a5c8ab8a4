"""policy.lb: the hash cookie Envoy generates for consistentHash.httpCookie with a ttl."""
from __future__ import annotations

import pytest

from policy.cluster import ClusterEndpoint, HashPolicy, LbPolicy
from policy.lb import (RingHashPicker, cookie_to_generate, generated_cookie_value, hash_key,
                       set_cookie_value)

COOKIE = HashPolicy("cookie", "user", "/shop", 3600.0)


@pytest.mark.parametrize("name, value, path, ttl, expected", [
    ("user", "00ab", "/shop", 3600.0, 'user="00ab"; Max-Age=3600; Path=/shop; HttpOnly'),
    ("user", "00ab", None, 90.5, 'user="00ab"; Max-Age=90; HttpOnly'),      # whole seconds
    ("user", "00ab", "", 60.0, 'user="00ab"; Max-Age=60; HttpOnly'),
    ("user", "00ab", "/", 0.0, 'user="00ab"; Path=/; HttpOnly'),            # ttl 0: a session cookie
    ("user", "00ab", None, 0.4, 'user="00ab"; HttpOnly'),                   # under a second: 0
])
def test_set_cookie_value(name, value, path, ttl, expected):
    assert set_cookie_value(name, value, path, ttl) == expected


@pytest.mark.parametrize("hp, headers, expected", [
    (COOKIE, {}, True),
    (COOKIE, {"cookie": "other=1"}, True),
    (COOKIE, {"cookie": "user="}, True),                      # empty value: Envoy generates one
    (COOKIE, {"cookie": "a=1; user=abc"}, False),
    (COOKIE, {"cookie": 'user="abc"'}, False),
    (HashPolicy("cookie", "user", None, 0.0), {}, True),      # ttl 0 (session cookie) generates too
    (HashPolicy("cookie", "user", None, None), {}, False),    # no ttl: nothing generated
    (HashPolicy("header", "x-user"), {}, False),
    (None, {}, False),
])
def test_cookie_to_generate(hp, headers, expected):
    assert cookie_to_generate(hp, headers) is expected


def test_generated_value_is_per_connection_and_stable():
    a = generated_cookie_value(("127.0.0.1", 40000), ("127.0.0.1", 15001))
    assert a == generated_cookie_value(("127.0.0.1", 40000), ("127.0.0.1", 15001))
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != generated_cookie_value(("127.0.0.1", 40001), ("127.0.0.1", 15001))
    assert a != generated_cookie_value(("127.0.0.1", 40000), ("127.0.0.2", 15001))
    assert len(generated_cookie_value(("::1", 40000), ("::1", 15001))) == 16


def test_the_generated_value_sent_back_reaches_the_same_endpoint():
    endpoints = tuple(ClusterEndpoint(f"10.0.0.{i}", 8080, 1, {}) for i in range(1, 6))
    lb = LbPolicy("RING_HASH", COOKIE, 64)
    picker = RingHashPicker(64)
    for port in range(40000, 40040):
        value = generated_cookie_value(("127.0.0.1", port), ("127.0.0.1", 15001))
        first = picker.pick(endpoints, value, None)          # the request that got the cookie
        header = set_cookie_value("user", value, "/shop", 3600.0).split(";")[0]   # what a browser returns
        later = picker.pick(endpoints, hash_key(lb, {"cookie": header}, "/", None), None)
        assert later is first
