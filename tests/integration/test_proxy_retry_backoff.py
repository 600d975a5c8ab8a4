"""Envoy's jittered exponential retry back-off, end to end.

Upstreams answer 503 a given number of times, then 200, and record when each attempt
arrived. Through the real `nodeagent proxy` process (its own random source), the gaps
between attempts stay inside Envoy's windows (0-25, 0-75, 0-175 ms by default, plus
scheduling slack). With an in-process runtime whose random source always draws 0.999,
the gaps are the windows' ends exactly (Istio's ``retries.backoff`` as base interval),
the route timeout cuts a back-off short (504 UT, no later attempt) and the per-try
timeout does not include the wait.
"""
from __future__ import annotations

import asyncio
import http.client
import random
import threading
import time

import pytest

from nodeagent.proxy.context import ListenerContext, PlainConnector, WorkloadIdentity
from nodeagent.proxy.runtime import ProxyRuntime
from nodeagent.proxy.server import protocol_factory
from nodeagent.proxy.snapshots import open_config
from nodeagent.telemetry import Telemetry
from tests.integration.proxy_harness import ProxyProcess
from tests.integration.test_proxy_lb_match import NS, fqdn, resource, service, virtual_service
from tests.integration.upstream import UpstreamServer

SLACK = 0.08  # scheduling slack on a loaded 2-core machine (both loops, the client, the OS)


class FlakyUpstream(UpstreamServer):
    """Answers 503 to the next ``failures`` requests (then 200) and records arrival times;
    ``stall`` delays the first request of a burst that long (a hung try)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.failures = 0
        self.stall = 0.0
        self.arrivals: list[float] = []

    async def _respond(self, req, parser, writer) -> bool:
        self.arrivals.append(time.monotonic())
        if self.stall:
            stall, self.stall = self.stall, 0.0
            await asyncio.sleep(stall)
        if self.failures > 0:
            self.failures -= 1
            req.headers["x-status"] = "503"
        return await super()._respond(req, parser, writer)


def route(name: str, retries: str, timeout: str = "") -> str:
    return virtual_service(name, f"""  - retries:
{retries}{("    timeout: " + timeout + chr(10)) if timeout else ""}    route:
    - destination:
        host: {fqdn(name)}
""")


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


FRONTEND = resource("WorkloadEntry", "frontend", "  address: 127.0.0.1\n  labels:\n    app: frontend\n")


def get(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/r", headers={"Host": fqdn(host)})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("x-instance") or ""
    finally:
        conn.close()


def test_default_backoff_through_the_proxy_process(tmp_path):
    up = FlakyUpstream("f0").start()
    try:
        (tmp_path / "svc.yaml").write_text(
            FRONTEND + service("flaky", [up])
            + route("flaky", "      attempts: 3\n      retryOn: \"503\"\n"))
        with ProxyProcess(tmp_path, workload=f"{NS}/frontend", metrics=False) as proxy:
            for _ in range(5):
                up.failures = 3
                up.arrivals.clear()
                assert get(proxy.port, "flaky") == (200, "f0")
                assert len(up.arrivals) == 4
                for n, gap in enumerate(gaps(up.arrivals), start=1):
                    assert 0.0 <= gap <= 0.025 * (2 ** n - 1) + SLACK, (n, gap)
            # exhausted retries: the last 503 is the answer, after 3 back-offs
            up.failures = 10
            up.arrivals.clear()
            assert get(proxy.port, "flaky") == (503, "f0")
            assert len(up.arrivals) == 4
    finally:
        up.stop()


class AlmostOne(random.Random):
    """Every draw is 0.999: each back-off is the end of its window."""

    def random(self) -> float:
        return 0.999


@pytest.fixture
def in_process(tmp_path):
    """A ProxyRuntime (random source AlmostOne) on its own loop and real sockets."""
    up = FlakyUpstream("f1").start()
    (tmp_path / "svc.yaml").write_text(
        FRONTEND + service("backoff", [up])
        + route("backoff", "      attempts: 3\n      retryOn: \"503\"\n      backoff: 50ms\n")
        + service("deadline", [up])
        + route("deadline", "      attempts: 5\n      retryOn: \"503\"\n      backoff: 200ms\n", timeout="0.3s")
        + service("pertry", [up])
        + route("pertry", "      attempts: 2\n      retryOn: \"5xx\"\n      perTryTimeout: 0.15s\n"
                          "      backoff: 50ms\n"))
    source = open_config(str(tmp_path))
    ctx = ListenerContext("backoff-test", WorkloadIdentity(NS, "frontend"), reporter="source",
                          connector=PlainConnector())
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    def run():
        asyncio.set_event_loop(loop)

        async def main():
            runtime = ProxyRuntime(source.current, Telemetry(), rand=AlmostOne())
            runtime.start()
            server = await loop.create_server(protocol_factory(runtime, ctx), "127.0.0.1", 0)
            state["port"] = server.sockets[0].getsockname()[1]
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
            server.close()
            await runtime.close()

        loop.run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield state["port"], up
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(10)
    loop.close()
    up.stop()


def test_istio_backoff_base_sets_the_windows(in_process):
    port, up = in_process
    up.failures = 3
    up.arrivals.clear()
    assert get(port, "backoff") == (200, "f1")
    assert len(up.arrivals) == 4
    # base 50 ms (max 500 ms): 0.999 x 50, 150, 350 ms
    for gap, expected in zip(gaps(up.arrivals), (0.04995, 0.14985, 0.34965)):
        assert expected - 0.002 <= gap <= expected + SLACK, (gap, expected)


def test_route_timeout_cuts_the_backoff_short(in_process):
    port, up = in_process
    up.failures = 100
    up.arrivals.clear()
    t0 = time.monotonic()
    assert get(port, "deadline") == (504, "")
    elapsed = time.monotonic() - t0
    # try 1 at 0, back-off 0.2 s, try 2 at ~0.2 s, back-off 0.6 s: the 0.3 s route timeout ends it
    assert 0.3 <= elapsed <= 0.3 + SLACK
    assert len(up.arrivals) == 2
    time.sleep(0.7)  # the cancelled back-off never starts a third try
    assert len(up.arrivals) == 2
    up.failures = 0


def test_per_try_timeout_then_backoff(in_process):
    port, up = in_process
    up.failures = 0
    up.stall = 1.0  # the first try hangs past its 0.15 s per-try timeout
    up.arrivals.clear()
    assert get(port, "pertry") == (200, "f1")
    assert len(up.arrivals) == 2
    # the retry starts after the per-try timeout plus a back-off of 0.999 x 50 ms
    assert 0.15 + 0.04995 - 0.002 <= gaps(up.arrivals)[0] <= 0.15 + 0.05 + SLACK
