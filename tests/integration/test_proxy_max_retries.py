"""DestinationRule ``connectionPool.http.maxRetries``: Envoy's retry circuit breaker, end to end.

A real ``nodeagent proxy`` process and a real loopback upstream that answers a first try 503
(``x-envoy-attempt-count: 1``) and a retry 200, each after a wait. The first tries of a
burst are held until the whole burst has arrived and then answered 503 together, so every
retry decision of the burst falls while the first retry's attempt is still out (its answer
waits RETRY_DELAY): with ``maxRetries: 1`` exactly one request retries (200) and the others
get the upstream's 503 at once, flagged UO in the access log; unset, every request retries.
The budget is released when the retry's attempt ends (sequential requests all retry), a
subset's connectionPool overrides the host's, and HTTP/2 client streams count the same.
"""
from __future__ import annotations

import asyncio
import http.client
import threading

from tests.integration.istio_yaml import FRONTEND, destination_rule, fqdn, service, virtual_service
from tests.integration.proxy_harness import ProxyProcess
from tests.integration.test_proxy_grpc import _h2_get
from tests.integration.upstream import UpstreamServer

RETRY_DELAY = 0.8  # seconds a retry's answer waits: the retry stays outstanding that long


class BurstUpstream(UpstreamServer):
    """503 to first tries, released together once ``burst`` of them arrived (or after 5 s);
    200 to retries after RETRY_DELAY. Counts every arrival."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.burst = 1
        self.first = 0
        self.retries = 0
        self._gate = None

    def reset(self, burst: int) -> None:
        self.burst = burst
        self.first = 0
        self.retries = 0
        self._gate = None

    async def _respond(self, req, parser, writer) -> bool:
        if req.headers.get("x-envoy-attempt-count", "1") == "1":
            self.first += 1
            if self._gate is None:
                self._gate = asyncio.Event()
            gate = self._gate
            if self.first >= self.burst:
                gate.set()
            try:
                await asyncio.wait_for(gate.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
            req.headers["x-status"] = "503"
        else:
            self.retries += 1
            await asyncio.sleep(RETRY_DELAY)
            req.headers["x-status"] = "200"
        return await super()._respond(req, parser, writer)


def route(name: str, subset: str = "") -> str:
    dest = f"        host: {fqdn(name)}\n" + (f"        subset: {subset}\n" if subset else "")
    return virtual_service(name, fqdn(name), f"""  - retries:
      attempts: 1
      retryOn: "503"
    route:
    - destination:
{dest}""")


def rule(name: str, host_level: str, subsets: str = "") -> str:
    return destination_rule(name, fqdn(name), f"  trafficPolicy:\n{host_level}{subsets}")


def pool(max_retries: int, indent: str = "    ") -> str:
    return f"{indent}connectionPool:\n{indent}  http:\n{indent}    maxRetries: {max_retries}\n"


def get(port: int, name: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/r", headers={"Host": fqdn(name)})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def burst(n: int, call) -> list:
    """``call()`` from n threads at once; the results."""
    out: list = [None] * n

    def one(i):
        out[i] = call()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def access_log(proxy: ProxyProcess, name: str, count: int) -> list[dict]:
    """The access log entries of the requests to ``name`` (waits for ``count`` of them)."""
    return proxy.wait_access_log(lambda entry: entry.get("authority") == fqdn(name), want=count, timeout=5)


def test_max_retries_limits_retries_outstanding_to_the_cluster(tmp_path):
    limited, unlimited = BurstUpstream("lim").start(), BurstUpstream("unl").start()
    try:
        (tmp_path / "svc.yaml").write_text(
            FRONTEND
            + service("limited", [limited.address]) + route("limited") + rule("limited", pool(1))
            + service("unlimited", [unlimited.address]) + route("unlimited")
            + rule("unlimited", "    loadBalancer:\n      simple: ROUND_ROBIN\n"))
        with ProxyProcess(tmp_path, metrics=False, access_log=True) as proxy:
            n = 4
            # maxRetries 1: one retry outstanding, the other three answers go out as they are
            limited.reset(n)
            statuses = burst(n, lambda: get(proxy.port, "limited"))
            assert sorted(statuses) == [200, 503, 503, 503]
            assert (limited.first, limited.retries) == (n, 1)  # arrivals: requests + 1 retry
            entries = access_log(proxy, "limited", n)
            flags = sorted((e["response_code"], e["response_flags"]) for e in entries)
            assert flags == [(200, "-"), (503, "UO"), (503, "UO"), (503, "UO")]

            # maxRetries unset (2^32-1): every request retries
            unlimited.reset(n)
            assert burst(n, lambda: get(proxy.port, "unlimited")) == [200] * n
            assert (unlimited.first, unlimited.retries) == (n, n)

            # the budget comes back when a retry's attempt ends: sequential requests all retry
            for i in range(3):
                limited.reset(1)
                assert get(proxy.port, "limited") == 200
                assert (limited.first, limited.retries) == (1, 1), i
    finally:
        limited.stop()
        unlimited.stop()


def test_subset_connection_pool_overrides_the_host_level_max_retries(tmp_path):
    up_a, up_b = BurstUpstream("a").start(), BurstUpstream("b").start()
    subsets = """  subsets:
  - name: v1
    labels: {app: %s}
    trafficPolicy:
%s"""
    try:
        (tmp_path / "svc.yaml").write_text(
            FRONTEND
            # host level 1, subset 10: the subset's wins, every request retries
            + service("loose", [up_a.address]) + route("loose", "v1")
            + rule("loose", pool(1), subsets % ("loose", pool(10, "      ")))
            # host level unset, subset 1: one retry at a time
            + service("tight", [up_b.address]) + route("tight", "v1")
            + rule("tight", "    loadBalancer:\n      simple: ROUND_ROBIN\n", subsets % ("tight", pool(1, "      "))))
        with ProxyProcess(tmp_path, metrics=False) as proxy:
            n = 3
            up_a.reset(n)
            assert burst(n, lambda: get(proxy.port, "loose")) == [200] * n
            assert (up_a.first, up_a.retries) == (n, n)
            up_b.reset(n)
            assert sorted(burst(n, lambda: get(proxy.port, "tight"))) == [200, 503, 503]
            assert (up_b.first, up_b.retries) == (n, 1)
    finally:
        up_a.stop()
        up_b.stop()


def test_http2_client_streams_share_the_retry_budget(tmp_path):
    up = BurstUpstream("h2").start()
    try:
        (tmp_path / "svc.yaml").write_text(
            FRONTEND + service("h2", [up.address]) + route("h2") + rule("h2", pool(1)))
        with ProxyProcess(tmp_path, metrics=False, access_log=True) as proxy:
            n = 4

            def call():
                with proxy.raw(timeout=15) as sock:
                    return _h2_get(sock, fqdn("h2"), "/r", limit=15)[0]

            up.reset(n)
            assert sorted(burst(n, call)) == [200, 503, 503, 503]
            assert (up.first, up.retries) == (n, 1)
            entries = access_log(proxy, "h2", n)
            assert sorted((e["response_code"], e["response_flags"]) for e in entries) == \
                [(200, "-"), (503, "UO"), (503, "UO"), (503, "UO")]
            # released after the attempt: the next stream retries again
            up.reset(1)
            with proxy.raw(timeout=15) as sock:
                assert _h2_get(sock, fqdn("h2"), "/r", limit=15)[0] == 200
            assert (up.first, up.retries) == (1, 1)
    finally:
        up.stop()
