"""Load-balancer pickers: order, preference, distribution, consistent hashing."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.cluster import ClusterEndpoint, HashPolicy, LbPolicy
from policy.lb import (LeastRequestPicker, RandomPicker, RingHashPicker, RoundRobinPicker,
                       hash_key, make_picker, query_param)


def eps(*weights: int) -> tuple[ClusterEndpoint, ...]:
    return tuple(ClusterEndpoint(f"10.0.0.{i + 1}", 8080, w, {}) for i, w in enumerate(weights))


def ids(seq) -> list[str]:
    return [e.id for e in seq]


# -- make_picker -------------------------------------------------------------

@pytest.mark.parametrize("kind,cls", [
    ("ROUND_ROBIN", RoundRobinPicker), ("LEAST_REQUEST", LeastRequestPicker),
    ("LEAST_CONN", LeastRequestPicker), ("UNSPECIFIED", LeastRequestPicker),
    ("RANDOM", RandomPicker), ("PASSTHROUGH", RandomPicker), ("RING_HASH", RingHashPicker),
    ("MAGLEV", RingHashPicker),
])
def test_make_picker(kind, cls):
    assert type(make_picker(LbPolicy(kind))) is cls


def test_make_picker_unknown():
    with pytest.raises(ValueError, match="unknown load balancer"):
        make_picker(LbPolicy("FANCY"))


@pytest.mark.parametrize("picker", [RoundRobinPicker(), LeastRequestPicker(), RandomPicker(),
                                    RingHashPicker(16)])
def test_nothing_to_pick(picker):
    r = random.Random(0)
    assert picker.pick((), None, r) is None
    e = eps(1, 1)
    assert picker.pick(e, "k", r, exclude={e[0].id, e[1].id}) is None


@pytest.mark.parametrize("picker", [RoundRobinPicker(), LeastRequestPicker(), RandomPicker(),
                                    RingHashPicker(64)])
def test_exclude_is_never_returned(picker):
    r = random.Random(1)
    e = eps(1, 1, 1, 1)
    excluded = {e[1].id, e[3].id}
    for i in range(200):
        assert picker.pick(e, f"key{i}", r, exclude=excluded).id not in excluded


# -- round robin ---------------------------------------------------------------

def test_round_robin_order_and_skip():
    p = RoundRobinPicker()
    e = eps(1, 1, 1)
    r = random.Random(0)
    assert ids(p.pick(e, None, r) for _ in range(6)) == ids(e + e)
    got = [p.pick(e, None, r, exclude={e[1].id}).id for _ in range(4)]
    assert got == [e[0].id, e[2].id, e[0].id, e[2].id]


def test_weighted_round_robin_shares_and_interleaves():
    p = RoundRobinPicker()
    e = eps(3, 1)
    seq = [p.pick(e, None, random.Random(0)).id for _ in range(8)]
    assert Counter(seq) == {e[0].id: 6, e[1].id: 2}
    assert seq[:4].count(e[1].id) == 1          # not 3 a's then 1 b in a block of 6


# -- least request --------------------------------------------------------------

def test_least_request_prefers_fewer_active_requests():
    p = LeastRequestPicker()
    e = eps(1, 1)
    for _ in range(5):
        p.request_started(e[0].id)
    r = random.Random(3)
    counts = Counter(p.pick(e, None, r).id for _ in range(4000))
    # power of two choices: the busy one only wins when both samples are it (1/4)
    assert 0.70 < counts[e[1].id] / 4000 < 0.80


def test_least_request_accounting():
    p = LeastRequestPicker()
    p.request_started("a")
    p.request_started("a")
    p.request_finished("a")
    assert p.active == {"a": 1}
    p.request_finished("a")
    p.request_finished("a")          # never negative
    assert p.active == {}


def test_weighted_least_request_uses_weight_over_active():
    p = LeastRequestPicker()
    e = eps(2, 1)
    for _ in range(3):
        p.request_started(e[0].id)   # effective weights: 2/4 and 1/1
    r = random.Random(5)
    counts = Counter(p.pick(e, None, r).id for _ in range(6000))
    assert abs(counts[e[1].id] / 6000 - 2 / 3) < 0.03


# -- random -------------------------------------------------------------------------

def test_random_is_uniform_for_equal_weights():
    p = RandomPicker()
    e = eps(1, 1, 1, 1)
    r = random.Random(7)
    counts = Counter(p.pick(e, None, r).id for _ in range(8000))
    assert all(abs(c / 8000 - 0.25) < 0.03 for c in counts.values())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=5))
def test_random_respects_endpoint_weights(weights):
    p = RandomPicker()
    e = eps(*weights)
    r = random.Random(",".join(map(str, weights)))    # deterministic per example
    n = 4000
    counts = Counter(p.pick(e, None, r).id for _ in range(n))
    total = sum(weights)
    for ep, w in zip(e, weights):
        assert abs(counts[ep.id] / n - w / total) < 0.05


# -- ring hash ------------------------------------------------------------------------

def test_ring_has_at_least_minimum_size_and_weights():
    p = RingHashPicker(1024)
    e = eps(1, 3)
    p.pick(e, "x", random.Random(0))
    owners = Counter(e[i].id for i in p._owners)
    assert sum(owners.values()) >= 1024
    assert abs(owners[e[1].id] / owners[e[0].id] - 3) < 0.05


def test_same_key_same_endpoint_and_keys_spread():
    p = RingHashPicker(1024)
    e = eps(1, 1, 1, 1)
    r = random.Random(0)
    first = {f"user{i}": p.pick(e, f"user{i}", r).id for i in range(400)}
    assert all(p.pick(e, k, r).id == v for k, v in first.items())
    spread = Counter(first.values())
    assert len(spread) == 4 and min(spread.values()) > 50


def test_ring_is_shared_between_pickers_with_the_same_endpoints():
    a, b = RingHashPicker(128), RingHashPicker(128)
    r = random.Random(0)
    a.pick(eps(1, 1, 2), "k", r)
    b.pick(eps(1, 1, 2), "k", r)          # equal content, another tuple
    assert a._hashes is b._hashes


def test_huge_rings_are_scaled_down(monkeypatch):
    import policy.lb as lb
    monkeypatch.setattr(lb, "MAX_RING_POINTS", 1000)
    monkeypatch.setattr(lb, "_RING_CACHE", {})
    p = RingHashPicker(1024)
    e = eps(1, 1, 1, 1)
    p.pick(e, "k", random.Random(0))
    assert len(p._hashes) == 1000
    assert Counter(p._owners) == {0: 250, 1: 250, 2: 250, 3: 250}


def test_ring_is_the_same_when_built_again():
    import policy.lb as lb
    e = eps(1, 1, 1)
    r = random.Random(0)
    a = RingHashPicker(256)
    first = [a.pick(e, f"k{i}", r).id for i in range(200)]
    lb._RING_CACHE.clear()                  # rebuild from scratch: hashes are deterministic
    b = RingHashPicker(256)
    assert [b.pick(e, f"k{i}", r).id for i in range(200)] == first
    assert a._hashes is not b._hashes and a._hashes == b._hashes


def test_no_key_picks_a_random_point():
    p = RingHashPicker(256)
    e = eps(1, 1, 1)
    r = random.Random(11)
    assert len({p.pick(e, None, r).id for _ in range(100)}) == 3


def test_excluded_key_moves_to_next_and_back():
    p = RingHashPicker(512)
    e = eps(1, 1, 1)
    r = random.Random(0)
    home = p.pick(e, "session-42", r)
    other = p.pick(e, "session-42", r, exclude={home.id})
    assert other.id != home.id
    assert p.pick(e, "session-42", r).id == home.id


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=2, max_value=8), st.data())
def test_removing_an_endpoint_moves_only_its_keys(n, data):
    e = eps(*([1] * n))
    gone = data.draw(st.integers(0, n - 1))
    keys = [f"key-{i}" for i in range(300)]
    r = random.Random(0)
    before = RingHashPicker(256)
    after = RingHashPicker(256)
    smaller = e[:gone] + e[gone + 1:]
    for k in keys:
        b = before.pick(e, k, r).id
        a = after.pick(smaller, k, r).id
        if b != e[gone].id:
            assert a == b


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=2, max_value=8))
def test_adding_an_endpoint_moves_about_one_in_n_plus_one(n):
    e = eps(*([1] * (n + 1)))
    keys = [f"k{i}" for i in range(2000)]
    r = random.Random(0)
    before, after = RingHashPicker(1024), RingHashPicker(1024)
    moved = 0
    for k in keys:
        b = before.pick(e[:n], k, r).id
        a = after.pick(e, k, r).id
        if a != b:
            assert a == e[n].id          # keys only move to the new endpoint
            moved += 1
    assert abs(moved / len(keys) - 1 / (n + 1)) < 0.06


# -- hash keys per key type -----------------------------------------------------------

def test_hash_key_header():
    lb = LbPolicy("RING_HASH", HashPolicy("header", "x-user"))
    assert hash_key(lb, {"x-user": "alice"}, "/", "1.2.3.4") == "alice"
    assert hash_key(lb, {}, "/", "1.2.3.4") is None


def test_hash_key_cookie():
    lb = LbPolicy("RING_HASH", HashPolicy("cookie", "session"))
    assert hash_key(lb, {"cookie": "a=1; session=xyz; b=2"}, "/", None) == "xyz"
    assert hash_key(lb, {"cookie": "a=1"}, "/", None) is None
    assert hash_key(lb, {}, "/", None) is None


def test_hash_key_source_ip():
    lb = LbPolicy("RING_HASH", HashPolicy("source_ip", None))
    assert hash_key(lb, {}, "/", "10.1.2.3") == "10.1.2.3"


def test_hash_key_query_parameter():
    lb = LbPolicy("RING_HASH", HashPolicy("query", "user"))
    assert hash_key(lb, {}, "/p?x=1&user=bob%20b&user=eve", None) == "bob b"
    assert hash_key(lb, {}, "/p?x=1", None) is None
    assert hash_key(lb, {}, "/p", None) is None


def test_hash_key_without_hash_policy():
    assert hash_key(LbPolicy("ROUND_ROBIN"), {"x": "y"}, "/", "1.1.1.1") is None


def test_query_param_ignores_fragment():
    assert query_param("/p?a=1#frag", "a") == "1"


def test_hash_key_drives_the_ring_per_key_type():
    e = eps(1, 1, 1, 1)
    r = random.Random(0)
    for hp, headers, path, ip in [
        (HashPolicy("header", "x-user"), {"x-user": "u1"}, "/", None),
        (HashPolicy("cookie", "sid"), {"cookie": "sid=s1"}, "/", None),
        (HashPolicy("source_ip", None), {}, "/", "10.9.9.9"),
        (HashPolicy("query", "u"), {}, "/?u=q1", None),
    ]:
        lb = LbPolicy("RING_HASH", hp, 256)
        p = make_picker(lb)
        k = hash_key(lb, headers, path, ip)
        assert len({p.pick(e, k, r).id for _ in range(50)}) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=30), st.integers(1, 6))
def test_any_key_maps_to_one_endpoint_and_fresh_pickers_agree(keys, n):
    e = eps(*([1] * n))
    r = random.Random(0)
    a, b = RingHashPicker(64), RingHashPicker(64)
    for k in keys:
        first = a.pick(e, k, r).id
        assert a.pick(e, k, r).id == first == b.pick(e, k, r).id
        assert b.pick(eps(*([1] * n)), k, r).id == first      # another tuple, same endpoints


def test_least_request_without_exclusions_draws_as_uniform_twice():
    """The inlined no-exclusion path of LeastRequestPicker.pick makes the same two draws as
    two _uniform calls: same seed, same pick (active counts break the tie the same way)."""
    from policy.lb import _uniform
    endpoints = eps(1, 1, 1, 1, 1)
    picker = LeastRequestPicker()
    for i, e in enumerate(endpoints):
        for _ in range(i % 3):
            picker.request_started(e.id)
    for seed in range(200):
        r1, r2 = random.Random(seed), random.Random(seed)
        got = picker.pick(endpoints, None, r1, frozenset())
        a, b = _uniform(endpoints, frozenset(), r2), _uniform(endpoints, frozenset(), r2)
        want = b if picker.active.get(b.id, 0) < picker.active.get(a.id, 0) else a
        assert got is want
        assert r1.random() == r2.random()  # the same number of draws
