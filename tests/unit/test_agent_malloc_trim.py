"""The agent gives the C heaps' free pages back to the kernel (glibc malloc_trim) once after
start-up and once after each burst of enrollments, in an executor thread: what an enroll's
worker-thread work freed would otherwise stay resident (docs/operations.md, "Memory")."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nodeagent.agent import agent as agent_module
from nodeagent.agent.agent import Agent, AgentOptions, trim_malloc
from nodeagent.agent.capture import select_capture
from nodeagent.agent.workload import spec_from_json

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(agent_module.MALLOC_TRIM is None, reason="the C library has no malloc_trim")]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_trim_returns_what_a_worker_thread_freed():
    kept: list[bytes] = []
    before = []

    def work():  # in a thread, as the enroll's executor work: its own malloc arena
        blocks = [bytes(4000) for _ in range(5000)]  # ~20 MiB, each block above pymalloc's 512 bytes
        kept.extend(blocks[::50])  # a few stay live, so the heap cannot simply shrink from its top
        blocks.clear()
        before.append(rss_kib())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert trim_malloc() is True
    assert before[0] - rss_kib() > 10 * 1024, "at least 10 of the ~20 MiB freed should leave Rss"
    assert len(kept) == 100


def test_one_trim_after_start_and_one_per_burst_of_enrollments(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "TRIM_AFTER", 0.05)

    async def scenario():
        agent = Agent(AgentOptions(node="t", state_dir=tmp_path / "state", admin=("127.0.0.1", 0),
                                   metrics=("127.0.0.1", 0), readiness=("127.0.0.1", 0), cert_wait=0.0),
                      select_capture("none"))
        task = asyncio.create_task(agent.run())
        try:
            for _ in range(100):
                if agent.trims == 1:
                    break
                await asyncio.sleep(0.02)
            assert agent.trims == 1  # after start-up
            for i in range(3):  # back to back: one trim for the three
                reply = await agent.enroll(spec_from_json({"kind": "netns", "target": f"pod-to-come-{i}", "name": f"w{i}",
                                                           "namespace": "shop"}), wait=True)
                assert reply["ok"], reply
            assert agent.trims == 1
            started = time.monotonic()
            while agent.trims < 2 and time.monotonic() - started < 5:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert agent.trims == 2
        finally:
            agent.stop()
            await task
    asyncio.run(scenario())
