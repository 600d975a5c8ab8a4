"""Load-balancer pickers over a cluster's endpoints (Envoy's algorithms).

One picker per cluster holds its counters. ``pick`` never returns an endpoint
whose id is in ``exclude`` (ejected ones, and ones a retry already tried);
it returns None when nothing is left (the proxy answers 503 "UH").

Pass the same endpoints tuple (``cluster_endpoints`` caches it per snapshot)
on every call: per-tuple work (weights, the hash ring) is redone only when the
tuple object changes.
"""
from __future__ import annotations

import bisect
import hashlib
import random
from typing import TYPE_CHECKING, Collection, Mapping, Sequence
from urllib.parse import unquote

if TYPE_CHECKING:
    from policy.cluster import ClusterEndpoint, LbPolicy



def hash64(data: str) -> int:
    """Stable 64-bit hash (the same on every node and run, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class Picker:
    """Base class; subclasses implement ``pick``."""

    __slots__ = ()

    def pick(self, endpoints: Sequence[ClusterEndpoint], hash_key: str | None,
             rand: random.Random, exclude: Collection[str] = ()) -> ClusterEndpoint | None:
        raise NotImplementedError

    def request_started(self, endpoint_id: str) -> None:
        """Active-request accounting (LEAST_REQUEST); a no-op for others."""

    def request_finished(self, endpoint_id: str) -> None:
        """Active-request accounting (LEAST_REQUEST); a no-op for others."""


def _allowed(endpoints, exclude) -> list:
    return [e for e in endpoints if e.id not in exclude]


def _uniform(endpoints, exclude, rand: random.Random):
    """A uniform pick among the endpoints not excluded: rejection sampling
    first (cheap when few are excluded), then the filtered list."""
    n = len(endpoints)
    if not n:
        return None
    for _ in range(4):
        e = endpoints[int(rand.random() * n)]
        if e.id not in exclude:
            return e
    cands = _allowed(endpoints, exclude)
    return cands[int(rand.random() * len(cands))] if cands else None


def _equal_weights(endpoints) -> bool:
    if not endpoints:
        return True
    w = endpoints[0].weight
    return all(e.weight == w for e in endpoints)


def _weighted_choice(cands, weights, rand: random.Random):
    total = 0
    cum = []
    for w in weights:
        total += w
        cum.append(total)
    if total <= 0:
        return cands[int(rand.random() * len(cands))]
    return cands[bisect.bisect_right(cum, rand.random() * total)]


class RoundRobinPicker(Picker):
    """Equal weights: strict rotation. Unequal: smooth weighted round robin
    (each endpoint gets its weight's share, interleaved, deterministically)."""

    __slots__ = ("_eps", "_equal", "_next", "_current")

    def __init__(self) -> None:
        self._eps = None
        self._equal = True
        self._next = 0
        self._current: dict[str, float] = {}

    def _reset(self, endpoints) -> None:
        self._eps = endpoints
        self._equal = _equal_weights(endpoints)
        self._current = {}
        if self._next >= len(endpoints):
            self._next = 0

    def pick(self, endpoints, hash_key, rand, exclude=()):
        if endpoints is not self._eps:
            self._reset(endpoints)
        n = len(endpoints)
        if not n:
            return None
        if self._equal:
            i = self._next
            for _ in range(n):
                e = endpoints[i]
                i += 1
                if i == n:
                    i = 0
                if e.id not in exclude:
                    self._next = i
                    return e
            return None
        cands = _allowed(endpoints, exclude) if exclude else endpoints
        if not cands:
            return None
        cur = self._current
        total = 0
        best = None
        best_val = 0.0
        for e in cands:
            v = cur.get(e.id, 0.0) + e.weight
            cur[e.id] = v
            total += e.weight
            if best is None or v > best_val:
                best, best_val = e, v
        cur[best.id] = best_val - total
        return best


class LeastRequestPicker(Picker):
    """Envoy's LEAST_REQUEST. Equal weights: power of two choices (two random
    endpoints, the one with fewer active requests wins). Unequal weights: a
    weighted random pick with effective weight ``weight / (active + 1)``
    (Envoy's active_request_bias 1.0)."""

    __slots__ = ("active", "_eps", "_equal")

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self._eps = None
        self._equal = True

    def request_started(self, endpoint_id: str) -> None:
        self.active[endpoint_id] = self.active.get(endpoint_id, 0) + 1

    def request_finished(self, endpoint_id: str) -> None:
        n = self.active.get(endpoint_id, 0) - 1
        if n > 0:
            self.active[endpoint_id] = n
        else:
            self.active.pop(endpoint_id, None)

    def pick(self, endpoints, hash_key, rand, exclude=()):
        if endpoints is not self._eps:
            self._eps = endpoints
            self._equal = _equal_weights(endpoints)
        active = self.active
        if self._equal:
            n = len(endpoints)
            if n and not exclude:
                # _uniform twice, inlined for the common case (nothing excluded): the same draws
                a = endpoints[int(rand.random() * n)]
                b = endpoints[int(rand.random() * n)]
                return b if active.get(b.id, 0) < active.get(a.id, 0) else a
            a = _uniform(endpoints, exclude, rand)
            if a is None:
                return None
            b = _uniform(endpoints, exclude, rand)
            return b if active.get(b.id, 0) < active.get(a.id, 0) else a
        cands = _allowed(endpoints, exclude) if exclude else endpoints
        if not cands:
            return None
        return _weighted_choice(cands, [e.weight / (active.get(e.id, 0) + 1) for e in cands], rand)


class RandomPicker(Picker):
    """Uniform when weights are equal, else proportional to endpoint weight."""

    __slots__ = ("_eps", "_equal", "_cum")

    def __init__(self) -> None:
        self._eps = None
        self._equal = True
        self._cum: list[int] = []

    def pick(self, endpoints, hash_key, rand, exclude=()):
        if endpoints is not self._eps:
            self._eps = endpoints
            self._equal = _equal_weights(endpoints)
            total = 0
            self._cum = []
            for e in endpoints:
                total += e.weight
                self._cum.append(total)
        if self._equal:
            return _uniform(endpoints, exclude, rand)
        if exclude:
            cands = _allowed(endpoints, exclude)
            return _weighted_choice(cands, [e.weight for e in cands], rand) if cands else None
        if not endpoints:
            return None
        cum = self._cum
        return endpoints[bisect.bisect_right(cum, rand.random() * cum[-1])]


MAX_RING_POINTS = 1 << 18   # beyond this the points per endpoint are scaled down
_RING_CACHE: dict = {}       # (endpoint ids and weights, points per weight) -> ring, shared
_RING_CACHE_SIZE = 32


def _ring(ids: tuple[tuple[str, int], ...], per_weight: int) -> tuple[list[int], list[int]]:
    """Sorted point hashes and, per point, the index of its endpoint in ``ids``."""
    key = (ids, per_weight)
    ring = _RING_CACHE.get(key)
    if ring is not None:
        return ring
    total = sum(max(w, 1) for _, w in ids) * per_weight
    scale = min(1.0, MAX_RING_POINTS / total) if total else 1.0
    points: list[tuple[int, int]] = []
    for idx, (endpoint_id, w) in enumerate(ids):
        count = max(1, int(max(w, 1) * per_weight * scale))
        base = endpoint_id.encode()
        block = 0
        while count > 0:
            digest = hashlib.blake2b(base + b"_%d" % block, digest_size=64).digest()
            for j in range(0, min(count, 8) * 8, 8):
                points.append((int.from_bytes(digest[j:j + 8], "big"), idx))
            count -= 8
            block += 1
    points.sort()
    ring = ([p[0] for p in points], [p[1] for p in points])
    if len(_RING_CACHE) >= _RING_CACHE_SIZE:
        del _RING_CACHE[next(iter(_RING_CACHE))]
    _RING_CACHE[key] = ring
    return ring


class RingHashPicker(Picker):
    """Consistent hashing on a 64-bit ring (Ketama-style, as Envoy's ring hash).

    Each endpoint owns ``minimum_ring_size`` points per unit of weight, so the
    ring always has at least that many points. Unlike Envoy, which rescales
    every endpoint's share of a fixed-size ring when the set changes, an
    endpoint's points depend only on its own id and weight: removing an
    endpoint moves only the keys that were on it, adding one moves about
    1/(N+1) of the keys (all of them to the new endpoint). A key maps to the
    first point clockwise of its hash; excluded endpoints are skipped by walking
    on. No key -> a random point (as Envoy). Rings are shared between pickers
    with the same endpoints (e.g. one per source namespace, or across
    snapshots); beyond ``MAX_RING_POINTS`` points they are scaled down, which
    gives up that stability for very large clusters."""

    __slots__ = ("minimum_ring_size", "_eps", "_hashes", "_owners")

    def __init__(self, minimum_ring_size: int = 1024) -> None:
        self.minimum_ring_size = max(1, minimum_ring_size)
        self._eps = None
        self._hashes: list[int] = []
        self._owners: list[int] = []

    def pick(self, endpoints, hash_key, rand, exclude=()):
        if endpoints is not self._eps:
            self._eps = endpoints
            self._hashes, self._owners = _ring(tuple((e.id, e.weight) for e in endpoints),
                                               self.minimum_ring_size)
        hashes = self._hashes
        n = len(hashes)
        if not n:
            return None
        h = hash64(hash_key) if hash_key is not None else rand.getrandbits(64)
        i = bisect.bisect_left(hashes, h)
        owners = self._owners
        if not exclude:
            return endpoints[owners[i if i < n else 0]]
        for _ in range(n):
            if i >= n:
                i = 0
            e = endpoints[owners[i]]
            if e.id not in exclude:
                return e
            i += 1
        return None


def make_picker(lb: LbPolicy) -> Picker:
    """LEAST_REQUEST (Istio's default, also for LEAST_CONN and UNSPECIFIED),
    ROUND_ROBIN, RANDOM, PASSTHROUGH (treated as RANDOM over the known
    endpoints), RING_HASH (consistentHash; Maglev is served by the ring too)."""
    kind = lb.kind
    if kind == "ROUND_ROBIN":
        return RoundRobinPicker()
    if kind in ("RANDOM", "PASSTHROUGH"):
        return RandomPicker()
    if kind in ("RING_HASH", "MAGLEV"):
        return RingHashPicker(lb.minimum_ring_size)
    if kind in ("LEAST_REQUEST", "LEAST_CONN", "UNSPECIFIED"):
        return LeastRequestPicker()
    raise ValueError(f"unknown load balancer {kind!r}")


def _cookie_value(cookie_header: str, name: str) -> str | None:
    for part in cookie_header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"')
    return None


def query_param(path: str, name: str) -> str | None:
    """First value of query parameter ``name`` in ``path`` (percent-decoded), or None."""
    _, sep, query = path.partition("?")
    if not sep:
        return None
    query = query.partition("#")[0]
    for part in query.split("&"):
        k, _, v = part.partition("=")
        if unquote(k) == name:
            return unquote(v)
    return None


def hash_key(lb: LbPolicy, headers: Mapping[str, str], path: str,
             source_ip: str | None) -> str | None:
    """The consistent-hash key of a request per ``lb.hash`` (header value, cookie
    value, source IP or query-parameter value); None = no key (random point)."""
    hp = lb.hash
    if hp is None:
        return None
    kind = hp.kind
    if kind == "header":
        return headers.get(hp.name)
    if kind == "source_ip":
        return source_ip
    if kind == "cookie":
        c = headers.get("cookie")
        return _cookie_value(c, hp.name) if c else None
    if kind == "query":
        return query_param(path, hp.name)
    raise ValueError(f"unknown hash policy {kind!r}")


def _address(addr) -> str:
    """Envoy's ``Address::asString`` of an (ip, port) pair: ``ip:port``, ``[ip6]:port``."""
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def generated_cookie_value(remote, local) -> str:
    """The value Envoy gives a cookie it generates for ``consistentHash.httpCookie`` with
    a ``ttl`` when the request has none: 16 hex digits of a hash of the downstream
    connection's remote and local addresses (``(ip, port)`` pairs), so every request
    of one connection gets the same value (Envoy's router ``addDownstreamSetCookie``;
    Envoy hashes with xxHash64, here with ``hash64``). The value is also the request's
    hash key, so the endpoint it picks is the one later requests carrying it reach."""
    return "%016x" % hash64(_address(remote) + _address(local))


def set_cookie_value(name: str, value: str, path: str | None, ttl: float | None) -> str:
    """The ``Set-Cookie`` header value Envoy sends for a generated hash cookie
    (``Http::Utility::makeSetCookieValue``): ``name="value"``, ``; Max-Age=N`` (whole
    seconds) unless the ttl is 0 (a session cookie), ``; Path=p`` when a path is set,
    and ``; HttpOnly``. Envoy adds no ``Expires``."""
    out = f'{name}="{value}"'
    seconds = int(ttl or 0)
    if seconds:
        out += f"; Max-Age={seconds}"
    if path:
        out += f"; Path={path}"
    return out + "; HttpOnly"


def cookie_to_generate(hp, headers: Mapping[str, str]) -> bool:
    """Whether a request must get a generated hash cookie: the hash policy is a cookie
    with a ``ttl`` (0 included: a session cookie) and the request carries no non-empty
    cookie of that name. Without a ``ttl`` nothing is generated and a request without
    the cookie is hashed on a random point (Envoy: no hash)."""
    if hp is None or hp.kind != "cookie" or hp.cookie_ttl is None:
        return False
    c = headers.get("cookie")
    return not (c and _cookie_value(c, hp.name))
