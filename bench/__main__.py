"""`python -m bench`: wrk against the upstream directly, `nodeagent proxy` and HAProxy.

The upstream is an HAProxy answering ``200 ok`` itself (fast, not Python-bound).
HAProxy 2.6 as the reference proxy runs with ``nbthread 1`` and ``http-reuse
always``; nodeagent runs one worker with routing (a shop-like VirtualService and
DestinationRule) and metrics on. Prints req/s, p50, p99 per target, the
nodeagent/HAProxy ratio, CPU microseconds per request (utime+stime deltas of
the proxy process from /proc/<pid>/stat divided by the requests wrk completed) and
context switches per request (voluntary: the proxy waited for events; involuntary: it
was preempted, which on a machine with as many busy processes as cores costs system
time in the switches and user time in cold caches).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import (context_switches, cpu_times, free_port, missing_tool, per_request, stop_all, upstream_cfg,
                          wait_port, wrk)

REPO = Path(__file__).resolve().parent.parent

HAPROXY_CFG = """global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend proxy
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    balance roundrobin
    server v1 127.0.0.2:{up} 
    server v2 127.0.0.3:{up}
"""

SHOP_CFG = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: catalog}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: catalog-v1, namespace: shop}}
spec:
  address: 127.0.0.2
  ports: {{http: {up}}}
  labels: {{app: catalog, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: catalog-v2, namespace: shop}}
spec:
  address: 127.0.0.3
  ports: {{http: {up}}}
  labels: {{app: catalog, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: frontend, namespace: shop}}
spec:
  address: 127.0.0.1
  serviceAccount: frontend
  labels: {{app: frontend, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /newcatalog}}}}]
    route: [{{destination: {{host: catalog.shop.svc.cluster.local, subset: v2}}}}]
  - route:
    - destination: {{host: catalog.shop.svc.cluster.local, subset: v1}}
      weight: 50
    - destination: {{host: catalog.shop.svc.cluster.local, subset: v2}}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""


def measure(name: str, url: str, pid: int | None, args, host: str | None = None) -> dict:
    wrk(url, args.warmup, args.connections, host, socket_errors=False)
    before = [cpu_times(pid)] if pid else []
    switches = context_switches(pid) if pid else None
    res = wrk(url, args.duration, args.connections, host, socket_errors=False)  # the column counts non-2xx only
    if pid:
        cpu = per_request(before, [cpu_times(pid)], res["requests"])
        res.update(user_us=cpu["user_us"], sys_us=cpu["sys_us"], cpu_us=cpu["cpu_us"])
        after = context_switches(pid)
        n = max(1, res["requests"])
        res.update(vcs=(after[0] - switches[0]) / n, ics=(after[1] - switches[1]) / n)
    res["name"] = name
    return res


class _RecordingTransport:
    """A transport that keeps what is written (engine bench: no sockets, no kernel)."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = []

    def write(self, data) -> None:
        self.out.append(data)

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 15001)}.get(name, default)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class _RecordingConnector:
    async def connect(self, protocol_factory, host, port, timeout):
        protocol = protocol_factory()
        transport = _RecordingTransport()
        protocol.connection_made(transport)
        return transport, protocol


ENGINE_REQUEST = b"GET /catalog/items HTTP/1.1\r\nHost: catalog.shop.svc.cluster.local\r\n\r\n"  # what wrk sends
ENGINE_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n"
                   b"cache-control: no-cache\r\n\r\nok")  # what the upstream HAProxy answers


def engine_main(argv) -> int:
    """`python -m bench engine`: the proxy's per-request Python work alone. A real runtime,
    HttpDownstream, exchanges, pools and telemetry on the bench's configuration, with the
    sockets replaced by recording transports: each request is fed as wrk sends it and
    answered as the upstream HAProxy does. Prints CPU µs per request (best of 5 runs) and,
    with --count, the bytecodes and Python calls per request (sys.settrace). For instruction
    counts that do not depend on the machine's load, run it under valgrind twice with
    --requests N and M and divide the difference of the totals by M - N (see docs/proxy.md)."""
    import asyncio

    from nodeagent.proxy.server import new_event_loop

    p = argparse.ArgumentParser(prog="python -m bench engine", description=engine_main.__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100000, help="requests per run (default 100000)")
    p.add_argument("--once", action="store_true", help="one run, nothing printed (for valgrind)")
    p.add_argument("--count", action="store_true", help="also count bytecodes and Python calls per request (only when the request path runs as "
                        "Python: NODEAGENT_PURE=1)")
    args = p.parse_args(argv)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return _engine_run(args, loop)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _engine_run(args, loop) -> int:
    import asyncio
    import random
    import time

    from nodeagent.proxy.context import ListenerContext, WorkloadIdentity
    from nodeagent.proxy.http import HttpDownstream
    from nodeagent.proxy.runtime import ProxyRuntime
    from nodeagent.telemetry import Telemetry
    from policy.loader import load_text
    from policy.snapshot import build_snapshot

    loaded = load_text(SHOP_CFG.format(up=8080), "shop.yaml")
    if not loaded.ok:
        print("\n".join(map(str, loaded.errors)), file=sys.stderr)
        return 1
    snapshot = build_snapshot(loaded.resources)
    runtime = ProxyRuntime(lambda: snapshot, Telemetry(), rand=random.Random(7))
    runtime.loop = loop
    ctx = ListenerContext("explicit", WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}),
                          connector=_RecordingConnector())
    downs = []
    for _ in range(4):
        down = HttpDownstream(runtime, ctx)
        transport = _RecordingTransport()
        down.connection_made(transport)
        downs.append((down, transport))

    def one(down, transport) -> None:
        down.data_received(ENGINE_REQUEST)
        conn = down.active.upstream
        if conn is None:  # the pool is opening its first connection to this endpoint
            loop.run_until_complete(asyncio.sleep(0))
            conn = down.active.upstream
        conn.transport.out.clear()
        conn.data_received(ENGINE_RESPONSE)
        if not transport.out or not transport.out[-1].startswith(b"HTTP/1.1 200 OK\r\n"):
            raise SystemExit(f"bench engine: unexpected response {transport.out[-1:]!r}")
        transport.out.clear()

    def run(n: int) -> None:
        for i in range(n):
            one(*downs[i & 3])

    run(200)  # every endpoint has a pooled connection, every cache is warm
    if args.once:
        run(args.requests)
        return 0
    best = min(_timed(run, args.requests, time.process_time) for _ in range(5))
    from nodeagent import accel
    mode = "compiled" if all(accel.status().values()) else "python"
    print(f"engine: {best:.2f} CPU us/request (best of 5 runs of {args.requests}; request path {mode})")
    if args.count and mode == "compiled":
        print("engine: bytecodes are not counted when the request path runs compiled "
              "(NODEAGENT_PURE=1 runs it as Python)")
    elif args.count:
        counts = [0, 0]

        def trace(frame, event, arg):
            frame.f_trace_opcodes = True
            if event == "opcode":
                counts[0] += 1
            elif event == "call":
                counts[1] += 1
            return trace
        n = min(args.requests, 2000)
        sys.settrace(trace)
        try:
            run(n)
        finally:
            sys.settrace(None)
        print(f"engine: {counts[0] / n:.0f} bytecodes and {counts[1] / n:.1f} Python calls per request")
    return 0


def _timed(run, n: int, clock) -> float:
    start = clock()
    run(n)
    return (clock() - start) / n * 1e6


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:  # `python -m bench engine`: the per-request Python work without sockets
        return engine_main(argv[1:])
    if argv[:1] == ["mesh"]:  # `python -m bench mesh`: the two-node mesh path, bench/mesh.py
        from bench.mesh import main as mesh_main
        return mesh_main(argv[1:])
    if argv[:1] == ["capture"]:  # `python -m bench capture`: nftables vs eBPF capture, bench/capture.py
        from bench.capture import main as capture_main
        return capture_main(argv[1:])
    if argv[:1] == ["memory"]:  # `python -m bench memory`: agent memory and enroll latency with N pods
        from bench.memory import main as memory_main
        return memory_main(argv[1:])
    if argv[:1] == ["mesh-loopback"]:  # the same without root: two agent processes on loopback
        from bench.mesh_loopback import main as loopback_main
        return loopback_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                epilog="`python -m bench mesh --help`: client pod -> agent -> mTLS -> agent -> "
                                       "pod vs an HAProxy chain with an mTLS hop (root); `python -m bench engine "
                                       "--help`: the proxy's per-request Python work without sockets")
    p.add_argument("--duration", type=int, default=8, help="seconds per measured run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--path", default="/catalog/items", help="request path (default /catalog/items)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the proxies this many times, interleaved, and keep each one's best run "
                        "(a shared machine only ever makes a run slower; default 1)")
    args = p.parse_args(argv)
    tool = missing_tool(("wrk", "haproxy"))
    if tool:
        print(f"bench: {tool} is not installed (make setup installs it)", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-"))
    try:
        up, hap = free_port(), free_port()
        (tmp / "upstream.cfg").write_text(upstream_cfg(f"127.0.0.2:{up}", f"127.0.0.3:{up}"))
        (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=hap, up=up))
        (tmp / "config").mkdir()
        (tmp / "config" / "shop.yaml").write_text(SHOP_CFG.format(up=up))
        procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(tmp / "upstream.cfg")]))
        wait_port("127.0.0.2", up)
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")])
        procs.append(haproxy)
        wait_port("127.0.0.1", hap)
        na_port = free_port()
        nodeagent = subprocess.Popen(
            [sys.executable, "-m", "nodeagent", "proxy", "--config-dir", str(tmp / "config"),
             "--listen", f"127.0.0.1:{na_port}", "--workload", "shop/frontend", "--workers", "1",
             "--metrics", "127.0.0.1:0"], cwd=str(REPO), stderr=subprocess.DEVNULL)
        procs.append(nodeagent)
        wait_port("127.0.0.1", na_port)
        host = "catalog.shop.svc.cluster.local"
        results = [measure("upstream (direct)", f"http://127.0.0.2:{up}{args.path}", None, args), None, None]
        for _ in range(max(1, args.rounds)):
            runs = [
                measure("nodeagent proxy", f"http://127.0.0.1:{na_port}{args.path}", nodeagent.pid, args, host),
                measure("haproxy 2.6", f"http://127.0.0.1:{hap}{args.path}", haproxy.pid, args),
            ]
            for i, run in enumerate(runs, start=1):
                if results[i] is None or run["rps"] > results[i]["rps"]:
                    results[i] = run
    finally:
        stop_all(procs, 10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrk -t1 -c{args.connections}, {args.duration:g}s per target after {args.warmup:g}s warm-up, "
          f"path {args.path}" + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else ""))
    print(f"{'target':<20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'user':>7}{'sys':>7}{'non-2xx':>9}"
          f"{'cs/req vol':>12}{'invol':>7}")
    for r in results:
        cpu, user, system = (f"{r[k]:.1f}" if k in r else "-" for k in ("cpu_us", "user_us", "sys_us"))
        vcs, ics = (f"{r[k]:.3f}" if k in r else "-" for k in ("vcs", "ics"))
        print(f"{r['name']:<20}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{cpu:>12}{user:>7}{system:>7}"
              f"{r['errors']:>9}{vcs:>12}{ics:>7}")
    na, ha = results[1], results[2]
    print(f"nodeagent/haproxy: {na['rps'] / ha['rps']:.2f}x req/s, "
          f"{na['cpu_us'] / ha['cpu_us']:.2f}x CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
