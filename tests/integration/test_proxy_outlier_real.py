"""DestinationRule ``outlierDetection`` variants through a real `nodeagent proxy`
in front of real upstream servers on loopback (policy/outlier.py is unit-tested;
here every decision is observed from the outside: which upstream received what).

Each service is its own cluster with its own outlier detector; servers are shared
between services and a request's service is told by its path prefix (``/SERVICE/n``),
so hits are counted per service. Load balancing is ROUND_ROBIN (a strict rotation)
so shares are exact, and the routes have ``retries: {attempts: 0}`` unless the
test is about Istio's default retries. ``interval`` is 0.1 s: the proxy's sweep
runs every ``SWEEP_TICK`` (0.25 s) and sweeps whenever the interval is up.

- ``consecutive5xxErrors: 3`` ejects after exactly three 500s;
- ``consecutiveGatewayErrors: 3`` (5xx off) never ejects on 500s, a 500 resets its
  count, three 502s / 503s / 504s in a row eject;
- a connect failure (nothing listens) counts as a 503: three eject, while Istio's
  default retries hide each failure from the client;
- ``maxEjectionPercent`` caps a second ejection (25% of 4 hosts: one; absent = 10%,
  at least one host; 50%: two);
- ``minHealthPercent`` is Envoy's panic threshold: below it (strictly) the ejected
  hosts get traffic again, at it or above they stay out;
- an ejection lasts ``baseEjectionTime x number of ejections`` and ends at the first
  sweep after that (never before); meanwhile a one-host cluster answers 503 ``UH``;
- an ejection survives an unrelated configuration change;
- an opaque TCP relay's connect failures eject too (then ``UH``, no connect attempt).
"""
from __future__ import annotations

import http.client
import socket
import time

import pytest

from nodeagent.proxy.runtime import SWEEP_TICK
from tests.integration.istio_yaml import FRONTEND, NS, fqdn, no_retries, service
from tests.integration.proxy_harness import ProxyProcess
from tests.integration.toggle_echo import Toggle
from tests.integration.upstream import UpstreamServer

BASE_GROW = 0.7  # baseEjectionTime of the "grow" service, seconds
PER_TRY = 0.3    # perTryTimeout of the "pertry" service, seconds
# How late a readmission may be seen after its ejection time is up: one sweep tick,
# plus the client's polling gap and a loaded machine's scheduling.
READMIT_LATE = SWEEP_TICK + 0.35



class ClosedPort:
    """An address where nothing listens (connection refused)."""

    def __init__(self, host: str) -> None:
        with socket.socket() as s:
            s.bind((host, 0))
            self.address = s.getsockname()


class Scripted(UpstreamServer):
    """Answers the statuses of ``script`` in order (one per request), then ``status``."""

    def __init__(self, name: str, host: str, script=()) -> None:
        super().__init__(name, host=host)
        self.script = list(script)

    async def _respond(self, req, parser, writer) -> bool:
        req.headers["x-status"] = str(self.script.pop(0) if self.script else self.status)
        return await super()._respond(req, parser, writer)


# --- config -------------------------------------------------------------------------------

def outlier_rule(name: str, **fields) -> str:
    """ROUND_ROBIN + outlierDetection with ``fields`` (Istio's camelCase names)."""
    od = {"interval": "0.1s", "baseEjectionTime": "30s", **fields}
    lines = "".join(f"      {k}: {v}\n" for k, v in od.items() if v is not None)
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: {NS}
spec:
  host: {fqdn(name)}
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    outlierDetection:
{lines}"""


GATEWAY_CODES = (502, 503, 504)
# (service, number of failing hosts of 4, maxEjectionPercent or None, hosts expected ejected)
CAPS = [("cap25", 25, 1), ("capdefault", None, 1), ("cap50", 50, 2)]
# (service, failing hosts of 4, minHealthPercent, failing-host hits expected in a 20-request window)
PANIC = [("panic1at60", 1, 60, 0), ("panic1at80", 1, 80, 5), ("panic2at50", 2, 50, 0), ("panic2at60", 2, 60, 10)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy-outlier-real")
    started: list[UpstreamServer] = []

    def up(server):
        started.append(server.start())
        return server

    bad = [up(Scripted(f"bad{i}", f"127.0.8.{1 + i}")) for i in range(2)]
    for b in bad:
        b.status = 500
    good = [up(UpstreamServer(f"good{i}", host=f"127.0.8.{11 + i}")) for i in range(4)]
    gateway = {code: up(Scripted(f"gw{code}", f"127.0.8.{21 + i}",
                                 script=[500] * 6 + [code, code, 500, code, code, code]))
               for i, code in enumerate(GATEWAY_CODES)}
    for code, s in gateway.items():
        s.status = code
    dead = ClosedPort("127.0.8.31")
    addr = lambda servers: [s.address for s in servers]  # noqa: E731
    cfg = [FRONTEND,
           service("c5xx", addr([bad[0], good[0]])), outlier_rule("c5xx", consecutive5xxErrors=3,
                                                                   maxEjectionPercent=100),
           no_retries("c5xx"),
           # no VirtualService: Istio's default retries (connect-failure among them)
           service("refused", [dead.address, good[0].address]),
           outlier_rule("refused", consecutive5xxErrors=3, maxEjectionPercent=100),
           service("grow", addr([bad[0]])), no_retries("grow"),
           outlier_rule("grow", consecutive5xxErrors=1, baseEjectionTime=f"{BASE_GROW}s", maxEjectionPercent=100)]
    for code, s in gateway.items():
        name = f"gw{code}"
        cfg += [service(name, addr([s, good[1]])), no_retries(name),
                outlier_rule(name, consecutiveGatewayErrors=3, consecutive5xxErrors=0, maxEjectionPercent=100)]
    for name, pct, _ in CAPS:
        cfg += [service(name, addr(bad + good[:2])), no_retries(name),
                outlier_rule(name, consecutive5xxErrors=2, maxEjectionPercent=pct)]
    for name, nbad, health, _ in PANIC:
        cfg += [service(name, addr(bad[:nbad] + good[:4 - nbad])), no_retries(name),
                outlier_rule(name, consecutive5xxErrors=2, maxEjectionPercent=100, minHealthPercent=health)]
    cfg += [service("keep", addr([bad[1], good[2]])), no_retries("keep"),
            outlier_rule("keep", consecutive5xxErrors=2, maxEjectionPercent=100)]
    slow = up(UpstreamServer("slow", host="127.0.8.42"))
    slow.delay = 3.0
    cfg += [service("pertry", addr([slow, good[3]])),
            outlier_rule("pertry", consecutive5xxErrors=2, maxEjectionPercent=100),
            f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: pertry
  namespace: {NS}
spec:
  hosts:
  - {fqdn("pertry")}
  http:
  - retries:
      attempts: 1
      perTryTimeout: {PER_TRY}s
      retryOn: 5xx
    route:
    - destination:
        host: {fqdn("pertry")}
"""]
    toggle = Toggle("127.0.8.41")
    cfg += [service("tcpdb", [toggle.address], port_name="tcp", protocol="TCP"),
            outlier_rule("tcpdb", consecutive5xxErrors=3, maxEjectionPercent=100)]
    (d / "config.yaml").write_text("".join(cfg))
    proxy = ProxyProcess(d, metrics=False, access_log=True,
                         extra=("--forward", f"127.0.0.1:0={fqdn('tcpdb')}:80")).start()
    try:
        yield proxy, {"bad": bad, "good": good, "gateway": gateway, "dir": d, "toggle": toggle, "slow": slow}
    finally:
        proxy.stop()
        toggle.refuse()
        for s in started:
            s.stop()


class Client:
    """A keep-alive client to the proxy; ``get`` returns (status, x-instance or None, body)."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)

    def get(self, service: str, n: int):
        self.conn.request("GET", f"/{service}/{n}", headers={"Host": fqdn(service)})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.getheader("connection", "").lower() == "close":
            self.conn.close()
        return resp.status, resp.getheader("x-instance"), body

    def run(self, service: str, count: int, start: int = 0) -> list[tuple[int, str | None]]:
        return [self.get(service, start + i)[:2] for i in range(count)]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def client(env):
    c = Client(env[0])
    yield c
    c.close()


def hits(server: UpstreamServer, service: str, since: int = 0) -> int:
    """Requests of ``service`` that ``server`` received, from request number ``since`` on."""
    prefix = f"/{service}/"
    return sum(1 for r in server.requests if r["path"].startswith(prefix) and int(r["path"][len(prefix):]) >= since)


# --- consecutive errors -------------------------------------------------------------------

def test_consecutive_5xx_errors_eject_after_exactly_that_many_500s(env, client):
    bad, good = env[1]["bad"][0], env[1]["good"][0]
    results = client.run("c5xx", 20)
    assert hits(bad, "c5xx") == 3, "ejected at the third consecutive 500, not before or after"
    assert results.count((500, "bad0")) == 3
    assert results.count((200, "good0")) == 17
    assert results[-10:] == [(200, "good0")] * 10, results


@pytest.mark.parametrize("code", GATEWAY_CODES)
def test_consecutive_gateway_errors_count_502_503_504_not_500(env, client, code):
    """Script at the failing host: six 500s (more than the threshold of 3, no ejection),
    then CODE, CODE, 500 (which resets the gateway count), CODE, CODE, CODE: ejected at
    that third consecutive CODE, its 12th hit."""
    server = env[1]["gateway"][code]
    name = f"gw{code}"
    first = client.run(name, 14)
    assert hits(server, name) == 7, "round robin: every other request; 500s do not eject"
    assert first.count((500, server.name)) == 6 and first.count((code, server.name)) == 1
    rest = client.run(name, 30, start=14)
    assert hits(server, name) == 12, f"ejected at the 3rd consecutive {code} after the 500, i.e. hit 12"
    seen = first + rest
    assert seen.count((code, server.name)) == 5 and seen.count((500, server.name)) == 7
    assert rest[-14:] == [(200, "good1")] * 14, rest


def test_connect_failures_eject_while_default_retries_hide_them(env, client):
    """Nothing listens at the first endpoint: each connect failure counts as a 503, so the
    third ejects it. Istio's default retry policy (connect-failure) retries each failed try
    on the other endpoint, so the client sees only 200s, and after the ejection no request
    needs a retry."""
    good = env[1]["good"][0]
    results = client.run("refused", 12)
    assert results == [(200, "good0")] * 12, results
    mine = [r for r in good.requests if r["path"].startswith("/refused/")]
    retried = [r["path"] for r in mine if r["headers"].get("x-envoy-attempt-count") == "2"]
    assert len(mine) == 12
    assert len(retried) == 3, f"exactly 3 connect failures before the ejection, retried: {retried}"
    assert all(r["headers"].get("x-envoy-attempt-count") == "1" for r in mine[-6:])


def test_per_try_timeouts_count_as_gateway_errors_and_eject(env, client):
    """A host that never answers in time: each per-try timeout counts as a 504 for outlier
    detection (and is retried on the other host, so the client gets a 200 after one
    PER_TRY). Two of them eject it: exactly 2 slow hits, exactly 2 retried requests."""
    slow = env[1]["slow"]
    timed = []
    for i in range(8):
        started = time.monotonic()
        timed.append((client.get("pertry", i)[:2], time.monotonic() - started))
    assert [r for r, _ in timed] == [(200, "good3")] * 8, timed
    assert hits(slow, "pertry") == 2, "ejected after its 2nd per-try timeout"
    good = env[1]["good"][3]
    retried = [int(r["path"].rsplit("/", 1)[1]) for r in good.requests
               if r["path"].startswith("/pertry/") and r["headers"].get("x-envoy-attempt-count") == "2"]
    assert len(retried) == 2, retried
    assert all(timed[i][1] >= PER_TRY - 0.01 for i in retried), (retried, timed)


# --- maxEjectionPercent -------------------------------------------------------------------

@pytest.mark.parametrize("name,pct,ejected", CAPS)
def test_max_ejection_percent_caps_the_second_ejection(env, client, name, pct, ejected):
    """4 hosts, 2 of them answering 500, consecutive5xxErrors 2. 25% of 4 allows one
    ejection; absent means 10%, which still ejects one host (at least one always can);
    50% ejects both."""
    bad = env[1]["bad"]
    client.run(name, 24)
    totals = sorted(hits(b, name) for b in bad)
    window = client.run(name, 30, start=24)
    in_window = sorted(hits(b, name, since=24) for b in bad)
    if ejected == 1:
        assert totals[0] == 2, f"the first host ejected at its 2nd error: {totals}"
        assert in_window == [0, 10], f"the other stays in the rotation of 3 hosts: {in_window}"
        assert sum(s == 500 for s, _ in window) == 10
    else:
        assert totals == [2, 2], totals
        assert in_window == [0, 0]
        assert all(s == 200 for s, _ in window), window


# --- minHealthPercent (panic threshold) ---------------------------------------------------

@pytest.mark.parametrize("name,nbad,health,expected", PANIC)
def test_min_health_percent_is_envoys_panic_threshold(env, client, name, nbad, health, expected):
    """4 hosts, NBAD answering 500 and all of them ejected after 2 errors each. Healthy
    share 75% (one ejected) or 50% (two): below minHealthPercent, strictly, the cluster
    panics and balances over every host, ejected or not (exactly 5 of 20 requests per host
    in the rotation); at or above it the ejected hosts get nothing."""
    bad = env[1]["bad"][:nbad]
    client.run(name, 20)  # both failing hosts have failed twice by now (rotation over 4 or 3)
    assert all(hits(b, name) >= 2 for b in bad), [hits(b, name) for b in bad]
    window = client.run(name, 20, start=20)
    in_window = sum(hits(b, name, since=20) for b in bad)
    assert in_window == expected, f"failing hosts got {in_window} of 20 requests, expected {expected}"
    assert sum(s == 500 for s, _ in window) == expected
    if expected:
        assert all(hits(b, name, since=20) == 5 for b in bad), "panic: a strict rotation over all 4"


# --- ejection time ------------------------------------------------------------------------

def test_ejection_time_is_base_times_the_number_of_ejections(env, client):
    """One host answering 500, consecutive5xxErrors 1, baseEjectionTime BASE_GROW: each hit
    ejects it. Polled every 10 ms, it is back (the next hit) BASE_GROW x k after its k-th
    ejection, at the first sweep after that: never earlier, at most one sweep tick (+ slack)
    later. Meanwhile the one-host cluster has no healthy host: 503 UH, no upstream hit. The
    multiplier does not decay because the host is hit, and ejected again, within the sweep
    tick after its readmission."""
    bad = env[1]["bad"][0]
    timeline = []  # (sent, received, status, instance)
    deadline = time.monotonic() + 4 * BASE_GROW * 3 + 5
    n = 0
    while sum(1 for t in timeline if t[3]) < 4 and time.monotonic() < deadline:
        sent = time.monotonic()
        status, instance, body = client.get("grow", n)
        received = time.monotonic()
        n += 1
        if instance is None:
            assert (status, body.strip()) == (503, b"no healthy upstream"), (status, body)
        else:
            assert (status, instance) == (500, "bad0")
        timeline.append((sent, received, status, instance))
        time.sleep(0.01)
    upstream = [t for t in timeline if t[3]]
    assert len(upstream) == 4, f"4 hits expected within the deadline, got {len(upstream)}"
    assert hits(bad, "grow") == 4
    for k in (1, 2, 3):
        prev, nxt = upstream[k - 1], upstream[k]
        # earliest possible readmission: ejected no earlier than the failing request was sent
        # (less the event loop clock's millisecond granularity)
        assert nxt[1] - prev[0] >= BASE_GROW * k - 0.01, f"ejection {k} ended early: {nxt[1] - prev[0]:.3f} s"
        gap = nxt[0] - prev[1]
        assert gap <= BASE_GROW * k + READMIT_LATE, f"ejection {k} lasted {gap:.3f} s, expected {BASE_GROW * k} s"
    # the access log flags every local 503 UH, and only those
    refused = {f"/grow/{i}" for i, t in enumerate(timeline) if t[3] is None}
    deadline = time.monotonic() + 3
    while True:
        flagged = {r["path"] for r in env[0].access_log()
                   if r.get("response_flags") == "UH" and str(r.get("path")).startswith("/grow/")}
        if flagged >= refused or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert flagged == refused and refused, (len(flagged), len(refused))


def test_an_ejection_survives_an_unrelated_configuration_change(env, client):
    """A new file in the config directory (another service) is a new snapshot; the
    cluster's outlier state is kept (as Envoy keeps a cluster that did not change)."""
    bad, good, d = env[1]["bad"][1], env[1]["good"][2], env[1]["dir"]
    client.run("keep", 12)
    assert hits(bad, "keep") == 2
    (d / "unrelated.yaml").write_text(service("unrelated", [good.address]))
    deadline = time.monotonic() + 10
    while client.get("unrelated", 0)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("unrelated", 1)[:2] == (200, "good2"), "the new configuration was loaded"
    after = client.run("keep", 12, start=100)
    assert after == [(200, "good2")] * 12 and hits(bad, "keep", since=100) == 0, after


def test_tcp_connect_failures_eject_the_endpoint_of_a_relay(env):
    """An opaque TCP relay (``--forward`` on a TCP port) reports connect failures too:
    three refused connects in a row eject the only endpoint, so once it listens again
    the relay does not even try it (UH) until the ejection ends."""
    proxy, toggle = env[0], env[1]["toggle"]
    port = proxy.ports[1]

    def echo() -> tuple[bytes, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            me = "%s:%d" % s.getsockname()
            s.sendall(b"ping")
            s.settimeout(5)
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
        return got, me

    def flags(me: str) -> str:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for rec in proxy.access_log():
                if rec.get("downstream_remote_address") == me:
                    return rec["response_flags"]
            time.sleep(0.02)
        raise AssertionError(f"no access-log line for {me}")

    got, me = echo()
    assert got == b"ping" and flags(me) == "-", "the relay reaches the endpoint"
    toggle.refuse()
    try:
        for _ in range(3):
            got, me = echo()
            assert got == b"" and flags(me) == "UF"
    finally:
        toggle.listen()
    accepted = toggle.accepted
    for _ in range(2):
        got, me = echo()
        assert got == b"" and flags(me) == "UH", "ejected after 3 consecutive connect failures"
    assert toggle.accepted == accepted
