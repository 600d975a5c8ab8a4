"""`python -m bench engine` drives the real engine (runtime, downstream, exchanges, pool,
telemetry) without sockets: it must keep working, answer every request 200 and count."""
from __future__ import annotations

import asyncio

from bench.__main__ import main


def test_bench_engine_runs_and_counts(capsys):
    try:
        assert main(["engine", "--requests", "300", "--count"]) == 0
    finally:
        asyncio.set_event_loop(None)
    out = capsys.readouterr().out
    assert "CPU us/request" in out
    bytecodes = int(out.split("engine: ")[2].split()[0])
    assert 500 < bytecodes < 5000
