"""The retry circuit breaker (DestinationRule connectionPool.http.maxRetries) of a cluster:
ClusterState counts the retries outstanding in one worker; with several workers
SharedClusterState counts them in the shared cells of every worker."""
from __future__ import annotations

import asyncio
import random
import socket

import pytest

from policy.cluster import ClusterKey
from nodeagent.proxy.context import PlainConnector
from nodeagent.proxy.runtime import ClusterState
from nodeagent.proxy.shared import PoolCounters, WorkerLink
from nodeagent.proxy.upstream import UNLIMITED

KEY = ClusterKey("x.shop.svc.cluster.local", None, 80)


@pytest.fixture(autouse=True)
def event_loop_set():
    """ClusterPool takes the current event loop when it is made (nothing runs on it here)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def test_cluster_state_counts_outstanding_retries_against_max_retries():
    state = ClusterState(KEY, "shop", PlainConnector(), random.Random(1))
    assert state.max_retries == UNLIMITED  # no limit until a DestinationRule sets maxRetries
    assert all(state.retry_begin() for _ in range(100))
    for _ in range(100):
        state.retry_end()
    assert state.retries == 0
    state.max_retries = 2
    assert state.retry_begin() and state.retry_begin()
    assert not state.retry_begin()  # overflow: not counted
    assert state.retries == 2
    state.retry_end()
    assert state.retry_begin()
    state.retry_end()
    state.retry_end()
    state.retry_end()
    state.retry_end()  # an extra end never goes below zero
    assert state.retries == 0


def test_workers_share_the_retry_budget_through_the_counters():
    counters = PoolCounters(2)
    socks = [socket.socketpair() for _ in range(2)]
    try:
        links = [WorkerLink(socks[w][0], counters, w) for w in range(2)]
        a, b = (link.cluster_state(KEY, "shop", PlainConnector(), random.Random(1)) for link in links)
        a.max_retries = b.max_retries = 1
        assert a.retry_begin()
        assert not b.retry_begin()  # worker 0's retry is outstanding
        assert not a.retry_begin()
        a.retry_end()
        assert b.retry_begin()
        assert not a.retry_begin()
        counters.clear_worker(1)  # worker 1 exited: its retries no longer count
        assert a.retry_begin()
        # connection and pending cells are untouched by the retry cells
        assert a.pool._may_connect() and a.pool._may_queue()
        # unlimited: no shared check refuses, and the count is still published
        b.max_retries = UNLIMITED
        assert all(b.retry_begin() for _ in range(5))
        assert counters.cells[b.pool.mine + 2] == b.retries
    finally:
        for pair in socks:
            for s in pair:
                s.close()
