"""`python -m bench engine` drives the real engine (runtime, downstream, exchanges, pool,
telemetry) without sockets: it must keep working, answer every request 200 and count,
compiled (nodeagent/accel.py) and as Python."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bench.__main__ import main
from nodeagent import accel

REPO = Path(__file__).resolve().parents[2]


def test_bench_engine_runs(capsys):
    try:
        assert main(["engine", "--requests", "300"]) == 0
    finally:
        asyncio.set_event_loop(None)
    out = capsys.readouterr().out
    mode = "compiled" if all(accel.status().values()) else "python"
    assert f"CPU us/request (best of 5 runs of 300; request path {mode})" in out


def test_bench_engine_counts_the_python_request_path():
    out = subprocess.run([sys.executable, "-m", "bench", "engine", "--requests", "300", "--count"], cwd=REPO,
                         env={**os.environ, "NODEAGENT_PURE": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "request path python" in out.stdout
    bytecodes = int(out.stdout.split("engine: ")[2].split()[0])
    assert 500 < bytecodes < 5000
