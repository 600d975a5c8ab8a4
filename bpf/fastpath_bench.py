"""Measure the same-node fast path: client -> proxy hop with and without sk_msg redirect.

    sudo .venv/bin/python -m bpf.fastpath_bench [--rounds 5]

Builds a throw-away network namespace, captures it with EbpfCapture (its own
pin directory), and runs, alternately with the fast path on and off, a
ping-pong (64-byte messages, round trips per second) and a bulk transfer
(64 KiB writes) from a captured client to an echo/sink "proxy" on
127.0.0.1:15001. Prints the medians as JSON. Needs root; takes ~10 s.
"""
from __future__ import annotations

import argparse
import json
import secrets
import socket
import statistics
import subprocess
import threading
import time

from .loader import EbpfCapture
from .netns import run_in_netns


def _serve(listener: socket.socket, echo: bool) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 20):
                if echo:
                    conn.sendall(data)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _connect(netns_path: str) -> socket.socket:
    sock = run_in_netns(netns_path, socket.socket)
    sock.settimeout(10)
    sock.connect(("10.250.9.2", 80))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ping_pong_us(netns_path: str, listener: socket.socket, count: int = 5000) -> float:
    server = _serve(listener, echo=True)
    with _connect(netns_path) as sock:
        message = b"x" * 64
        started = time.perf_counter()
        for _ in range(count):
            sock.sendall(message)
            got = 0
            while got < len(message):
                got += len(sock.recv(65536))
        elapsed = time.perf_counter() - started
    server.join(timeout=10)
    return elapsed / count * 1e6


def bulk_mb_s(netns_path: str, listener: socket.socket, total: int = 256 << 20) -> float:
    server = _serve(listener, echo=False)
    with _connect(netns_path) as sock:
        chunk = b"x" * 65536
        started = time.perf_counter()
        for _ in range(total // len(chunk)):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        server.join(timeout=30)
        elapsed = time.perf_counter() - started
    return total / elapsed / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpf.fastpath_bench")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    tag = secrets.token_hex(3)
    ns = f"nabench{tag}"
    ns_path = f"/run/netns/{ns}"
    cap = EbpfCapture(f"/sys/fs/bpf/nodeagent-bench-{tag}")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    results: dict[str, list[float]] = {"rtt_us_fast": [], "rtt_us_tcp": [], "bulk_mb_s_fast": [], "bulk_mb_s_tcp": []}
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.250.9.2/32", "dev", "lo"], check=True)

        def make_listener() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 15001))
            sock.listen(8)
            return sock
        listener = run_in_netns(ns_path, make_listener)
        cap.start()
        if cap.fast_path_problem:
            print(json.dumps({"error": cap.fast_path_problem}))
            return 1
        for _ in range(args.rounds):
            for fast, label in ((True, "fast"), (False, "tcp")):
                cap.enroll_netns(ns_path, 15001, fast_path=fast)
                results[f"rtt_us_{label}"].append(ping_pong_us(ns_path, listener))
                results[f"bulk_mb_s_{label}"].append(bulk_mb_s(ns_path, listener))
        listener.close()
    finally:
        cap.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    summary = {k: round(statistics.median(v), 1) for k, v in results.items()}
    summary["rtt_gain_pct"] = round(100 * (1 - summary["rtt_us_fast"] / summary["rtt_us_tcp"]), 1)
    summary["bulk_gain_pct"] = round(100 * (summary["bulk_mb_s_fast"] / summary["bulk_mb_s_tcp"] - 1), 1)
    summary["samples"] = {k: [round(x, 1) for x in v] for k, v in results.items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
