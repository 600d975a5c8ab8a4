"""What capture costs on this machine (root).

``python -m redirect.bench [-n 20]``: how long apply takes. For each round a
fresh network namespace is created (``ip netns add``, like a new pod), then
timed: the first apply (nothing there yet), a no-op re-apply (in sync, with the
sweep of the other backends), a no-op without the sweep, and cleanup. The
namespace is deleted afterwards. Prints the median, min and max of each in
milliseconds.

``python -m redirect.bench --datapath [-n 3] [--seconds 5]``: what the in-pod
plan costs per request on the application -> proxy hop (the kernel's share of
a captured connection, free of any proxy code): wrk and an HAProxy answering
``200`` itself (playing the proxy's outbound listener on 15001) in ONE pod of
a ``redirect.topology``, measured three ways, interleaved round by round (see
``DATAPATH_MODES``). CPU per request is wrk's plus HAProxy's user+system time,
which includes the kernel's loopback work done on their behalf. Needs wrk and
haproxy.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from . import capture, libnft
from .netns import NetnsError
from .plan import OUTBOUND_PORT, CaptureConfig, CaptureError, in_pod_plan

STEPS = ("apply fresh", "apply no-op", "apply no-op sweep=False", "cleanup")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def measure(rounds: int = 20, backend: str = "nft", *, pause: float = 0.02) -> dict[str, list[float]]:
    """Milliseconds per step (see STEPS), ``rounds`` fresh namespaces; checks each step's result."""
    plan = in_pod_plan(CaptureConfig())
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(rounds):
        name = f"nabench{secrets.token_hex(4)}"
        _ip("netns", "add", name)
        try:
            ms, first = _timed(lambda: capture.apply(plan, name, backend))
            if not first.changed:
                raise CaptureError(f"first apply in fresh namespace {name} changed nothing")
            samples["apply fresh"].append(ms)
            for step, sweep in (("apply no-op", True), ("apply no-op sweep=False", False)):
                ms, again = _timed(lambda: capture.apply(plan, name, backend, sweep=sweep))
                if again.changed:
                    raise CaptureError(f"re-apply in {name} changed something: {again.drift}")
                samples[step].append(ms)
            ms, removed = _timed(lambda: capture.cleanup(name))
            if not removed:
                raise CaptureError(f"cleanup in {name} found nothing to remove")
            samples["cleanup"].append(ms)
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        time.sleep(pause)  # rounds apart, like enrollments, not one burst
    libnft.drain()
    return samples


def summary(samples: dict[str, list[float]]) -> str:
    return "\n".join(f"{step:<26} median {statistics.median(v):6.1f} ms   min {min(v):6.1f}   max {max(v):6.1f}"
                     for step, v in samples.items() if v)


# ---- the data path ----------------------------------------------------------------------------

# (mode, what it shows). Every mode runs the same wrk against the same HAProxy in the same pod.
DATAPATH_MODES = (
    ("no rules", "wrk -> 127.0.0.1:15001, no table in the pod: no netfilter hook at all"),
    ("plan, not redirected", "the in-pod plan applied, wrk -> 127.0.0.1:15001 (out-skip-loopback): "
                             "conntrack and the nat hooks on every packet, no NAT"),
    ("plan, REDIRECT", "the in-pod plan applied, wrk -> a service address, redirected to :15001: "
                       "what a captured application connection costs"),
)
SERVICE_ADDRESS = "10.250.200.1"  # nothing listens there: only the capture makes it answer


def _haproxy_cfg(port: int) -> str:
    return ("global\n    nbthread 1\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n"
            f"    timeout server 60s\nfrontend proxy\n    bind 0.0.0.0:{port}\n"
            "    http-request return status 200 content-type text/plain string ok\n")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_wrk(out: str) -> dict:
    """req/s, requests, p50 (ms) and errors (non-2xx answers plus socket errors) of ``wrk --latency``."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if rps is None or requests is None or p50 is None:
        raise CaptureError(f"datapath bench: cannot read wrk's output:\n{out[-800:]}")
    value, unit = float(p50.group(1)), p50.group(2)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    return {"rps": float(rps.group(1)), "requests": int(requests.group(1)),
            "p50": value / 1000 if unit == "us" else value * 1000 if unit == "s" else value, "errors": errors}


def measure_datapath(rounds: int = 3, seconds: int = 5, connections: int = 16, *,
                     warmup: int = 1) -> dict[str, list[dict]]:
    """Per mode of ``DATAPATH_MODES``, one result per round: ``rps``, ``p50`` (ms),
    ``cpu_us`` (wrk + HAProxy, per request), ``requests``, ``errors``.

    Raises CaptureError when wrk or haproxy is missing; every namespace and
    process made here is gone on return.
    """
    from .topology import Topology

    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            raise CaptureError(f"datapath bench: {tool} is not installed (Debian package {tool})")
    plan = in_pod_plan(CaptureConfig())
    results: dict[str, list[dict]] = {mode: [] for mode, _ in DATAPATH_MODES}
    with tempfile.TemporaryDirectory(prefix="nodeagent-datapath-") as tmp, Topology(timeout=10.0) as topo:
        topo.add_node("node")
        topo.add_pod("node", "app")
        ns = topo.netns("app")
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(_haproxy_cfg(OUTBOUND_PORT))
        proxy = topo.spawn("app", ["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        direct = f"http://127.0.0.1:{OUTBOUND_PORT}/"
        deadline = time.monotonic() + 10
        while topo.exec("app", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", direct],
                        check=False).stdout != "200":
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise CaptureError(f"datapath bench: HAProxy did not answer on {direct} in the pod")
            time.sleep(0.1)

        def wrk(url: str, secs: int) -> dict:
            argv = ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--latency", url]
            return parse_wrk(topo.exec("app", argv, timeout=secs + 30).stdout)

        try:
            for _ in range(rounds):
                for mode, _ in DATAPATH_MODES:
                    if mode == "no rules":
                        capture.cleanup(ns)
                    else:
                        capture.apply(plan, ns)
                    url = f"http://{SERVICE_ADDRESS}:80/" if mode == "plan, REDIRECT" else direct
                    if warmup:
                        wrk(url, warmup)
                    before = _cpu_seconds(proxy.pid) + _children_cpu()
                    result = wrk(url, seconds)
                    spent = _cpu_seconds(proxy.pid) + _children_cpu() - before
                    result["cpu_us"] = spent * 1e6 / max(result["requests"], 1)
                    results[mode].append(result)
        finally:
            capture.cleanup(ns)
            libnft.drain()
    return results


def datapath_summary(results: dict[str, list[dict]]) -> str:
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "cpu_us")}
           for mode, rs in results.items() if rs}
    lines = [f"{'mode':<24}{'req/s':>9}{'p50 ms':>9}{'CPU us/req':>12}{'errors':>8}"]
    for mode, m in med.items():
        errors = sum(r["errors"] for r in results[mode])
        lines.append(f"{mode:<24}{m['rps']:>9.0f}{m['p50']:>9.3f}{m['cpu_us']:>12.1f}{errors:>8}")
    if len(med) == len(DATAPATH_MODES):
        base, hooks, nat = (med[mode]["cpu_us"] for mode, _ in DATAPATH_MODES)
        lines.append(f"per request on this hop: conntrack + nat hooks {hooks - base:+.1f} us, "
                     f"REDIRECT's NAT {nat - hooks:+.1f} us more, capture in all {nat - base:+.1f} us "
                     f"({(nat - base) / base * 100:+.0f}% CPU); req/s {med['plan, REDIRECT']['rps'] / med['no rules']['rps']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m redirect.bench", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=None,
                        help="fresh namespaces to measure (default 20); with --datapath: rounds (default 3)")
    parser.add_argument("--backend", default="nft", help="nft (default), iptables, iptables-nft, iptables-legacy")
    parser.add_argument("--datapath", action="store_true",
                        help="measure what the in-pod plan costs per request instead of apply times")
    parser.add_argument("--seconds", type=int, default=5, help="with --datapath: seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="with --datapath: wrk connections (default 16)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.datapath else 20
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.datapath:
        if args.seconds < 1 or args.connections < 1:
            parser.error("--seconds and --connections must be at least 1")
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        try:
            results = measure_datapath(args.rounds, args.seconds, args.connections)
        except (CaptureError, NetnsError, subprocess.CalledProcessError, OSError) as exc:
            print(f"redirect.bench: {exc}", file=sys.stderr)
            return 1
        print(f"app -> proxy hop in one pod: wrk -t1 -c{args.connections} -> HAProxy answering 200 on "
              f":{OUTBOUND_PORT}; {args.rounds} rounds x {args.seconds} s, medians; load average {load}")
        for mode, what in DATAPATH_MODES:
            print(f"  {mode}: {what}")
        print(datapath_summary(results))
        return 0
    via = "libnftables in-process" if libnft.available() else "the nft command"
    try:
        samples = measure(args.rounds, args.backend)
    except (CaptureError, subprocess.CalledProcessError, OSError) as exc:
        print(f"redirect.bench: {exc}", file=sys.stderr)
        return 1
    print(f"capture apply, backend {args.backend} ({via if args.backend == 'nft' else 'subprocesses'}), "
          f"{args.rounds} fresh namespaces:")
    print(summary(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
