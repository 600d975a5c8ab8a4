"""`python -m bench mesh-loopback`: the full mesh path on loopback (no root) against an HAProxy
chain with an mTLS hop.

- mesh: wrk -> node 1 (a ``nodeagent`` process: workload A's outbound listener, routing by
  Host) -> TLS 1.3 tunnel on 15008-style port, A's certificate, CONNECT -> node 2 (another
  process: B's TunnelServer + InboundPlane, AuthorizationPolicy ALLOW principal A on B) ->
  the application B;
- haproxy: wrk -> haproxy 1 (``nbthread 1``, ``http-reuse always``) -> TLS 1.3 with a client
  certificate, verified both ways -> haproxy 2 (``nbthread 1``) -> the same application.

The application is an HAProxy answering ``200 ok`` itself (not Python-bound). Certificates
for both paths come from the same embedded CA (``nodeagent.identity``: ECDSA P-256). Every
proxy runs one process, one thread, on uvloop for the agents. Reported: req/s, p50/p99
(wrk --latency), CPU microseconds per request of the two proxies of each path together
(utime+stime deltas from /proc/PID/stat over the measured run / requests completed), the
ratios, and how many tunnels (TLS handshakes) node 2 accepted during the whole run.

``python -m bench.mesh_loopback node ...`` is the node process itself (what the bench
starts twice); ``--profile DIR`` runs both under cProfile and writes DIR/node1.prof and
DIR/node2.prof. ``--l7`` adds a DENY on method DELETE for B (as the shop sample's
catalog-no-delete on ``bench mesh``), so node 2 authorizes every request at L7.

``--callgrind DIR`` counts instructions instead of time (stable on a shared machine): both
nodes run under valgrind's callgrind with instrumentation off; it is switched on for one wrk
run of the mesh path (``--duration`` s, 4 connections, after a warm-up) and again for an idle
period as long; each node's user-space instructions per request = (run - idle) / requests.
The HAProxy path is not run. Output files stay in DIR (``callgrind_annotate`` reads them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (cpu_times, edge_cfg, free_port, ingress_cfg, make_certs, missing_tool, per_request,
                          stop_all, upstream_cfg, wait_port, wrk)

REPO = Path(__file__).resolve().parent.parent
WHO = "bench mesh-loopback"

NS = "shop"
A_ADDR, B_ADDR = "127.0.10.1", "127.0.20.1"  # the two workloads (node 1, node 2)
H1_ADDR, H2_ADDR = "127.0.10.2", "127.0.20.2"  # the two haproxys
B_HOST = "b.shop.svc.cluster.local"

MESH_CFG = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b, namespace: shop}}
spec:
  hosts: [b.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: b}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: b-1, namespace: shop}}
spec:
  address: {b_addr}
  serviceAccount: b
  ports: {{http: {app_port}}}
  labels: {{app: b, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: a, namespace: shop}}
spec:
  address: {a_addr}
  serviceAccount: a
  labels: {{app: a, version: v1}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: b-allow-a, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: b}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/a"]}}}}]
"""

L7_CFG = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-no-delete, namespace: shop}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - to: [{operation: {methods: [DELETE]}}]
"""


# --------------------------------------------------------------------------- the node process


def node_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mesh_loopback node",
                                description="one loopback node agent: an outbound listener of a source "
                                            "workload (--listen) or the tunnel server of a destination "
                                            "workload (--tunnel-listen)")
    p.add_argument("--ca", required=True, help="CA directory (nodeagent.identity CADirectory)")
    p.add_argument("--config-dir", required=True, help="directory of Istio YAML")
    p.add_argument("--workload", required=True, metavar="NAMESPACE/NAME", help="service account = name")
    p.add_argument("--address", required=True, help="the workload's address")
    p.add_argument("--listen", type=int, help="source node: outbound (explicit proxy) port on --address")
    p.add_argument("--tunnel-port", type=int, help="source node: the tunnel port of every destination")
    p.add_argument("--tunnel-listen", type=int, help="destination node: tunnel port on --address")
    p.add_argument("--stats", help="write tunnel counters (JSON) here on SIGUSR1 and on exit")
    p.add_argument("--profile", help="run under cProfile, write the stats here on exit")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop (default uvloop, as `nodeagent proxy` workers)")
    args = p.parse_args(argv)
    if (args.listen is None) == (args.tunnel_listen is None):
        p.error("give exactly one of --listen (source node) or --tunnel-listen (destination node)")
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile(time.thread_time)  # CPU time: wall time would charge the peers woken by a write
    if args.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        if profiler is not None:
            profiler.enable()
        loop.run_until_complete(_node(args))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        loop.close()
    return 0


async def _node(args) -> None:
    from nodeagent.identity.ca import CADirectory, LocalCA
    from nodeagent.identity.manager import CertificateManager
    from nodeagent.identity.spiffe import SpiffeId
    from nodeagent.identity.tls import TunnelTls
    from nodeagent.proxy.context import ListenerContext, PlainConnector, WorkloadIdentity
    from nodeagent.proxy.inbound import InboundPlane, InboundWorkload
    from nodeagent.proxy.runtime import ProxyRuntime
    from nodeagent.proxy.server import protocol_factory
    from nodeagent.proxy.snapshots import open_config
    from nodeagent.proxy.tunnel import MeshDirectory, MeshTelemetry, TunnelConnector, TunnelServer

    loop = asyncio.get_running_loop()
    ns, _, name = args.workload.partition("/")
    identity = SpiffeId.workload(ns, name)
    manager = CertificateManager(LocalCA(CADirectory(args.ca)), trust_domain="cluster.local")
    manager.add_workload(identity)
    await manager.refresh()
    tls = TunnelTls(manager)
    source = open_config(args.config_dir)
    watch = source.start_watch(loop)
    runtime = ProxyRuntime(source.current, MeshTelemetry())
    runtime.start()
    plane = None
    tunnel = None
    if args.listen is not None:
        connector = TunnelConnector(tls, identity, MeshDirectory(source.current), PlainConnector(),
                                    source_address=args.address, tunnel_port=args.tunnel_port)
        ref = source.workload(ns, name)
        ctx = ListenerContext(f"outbound {args.workload}",
                              WorkloadIdentity(ns, name, name, dict(ref.labels) if ref else {}, identity.principal),
                              connector=connector)
        server = await loop.create_server(protocol_factory(runtime, ctx), args.address, args.listen, backlog=1024)
    else:
        plane = InboundPlane(runtime)
        plane.start()
        ref = source.workload(ns, name)
        workload = InboundWorkload(ns, name, name, dict(ref.labels) if ref else {}, (args.address,))
        tunnel = await TunnelServer(plane, workload, tls).start(host=args.address, port=args.tunnel_listen)
        server = tunnel
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    written = [0]

    def write_stats() -> None:
        written[0] += 1
        stats = {"seq": written[0], "tunnels_accepted": tunnel.stats["accepted"] if tunnel else 0,
                 "tunnels_refused": tunnel.stats["refused"] if tunnel else 0,
                 "requests": sum(v[0] for v in runtime.telemetry.export()["http"].values())}
        Path(args.stats + ".tmp").write_text(json.dumps(stats))
        os.replace(args.stats + ".tmp", args.stats)

    if args.stats:
        loop.add_signal_handler(signal.SIGUSR1, write_stats)
    print(f"node {args.workload} ready", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    if args.stats:
        write_stats()
    if plane is not None:
        await plane.close()
    await runtime.close()
    watch.cancel()


# --------------------------------------------------------------------------- the bench


def node_stats(pid: int, path: Path) -> dict:
    """Ask a node (SIGUSR1) for its counters and wait for the new file."""
    try:
        seq = json.loads(path.read_text())["seq"]
    except (OSError, ValueError, KeyError):
        seq = 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            stats = json.loads(path.read_text())
            if stats["seq"] > seq:
                return stats
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise SystemExit(f"bench mesh-loopback: node {pid} wrote no counters to {path}")


def _callgrind_total(path: Path) -> int:
    """The instruction total of one callgrind output file."""
    total = 0
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total


def callgrind_measure(url: str, nodes: list[subprocess.Popen], out: Path, args) -> list[float]:
    """Instructions per request of each node over one wrk run, less an idle period as long."""
    def control(*opts) -> None:
        for proc in nodes:
            subprocess.run(["callgrind_control", *opts, str(proc.pid)], capture_output=True, timeout=60)

    wrk(url, max(args.warmup, 5), 4, B_HOST, who=WHO)
    control("-i", "on")
    r = wrk(url, args.duration, 4, B_HOST, who=WHO)
    control("-i", "off")
    control("-d", "run")
    control("-z")
    control("-i", "on")
    time.sleep(args.duration)
    control("-i", "off")
    control("-d", "idle")
    per_node = []
    for i, proc in enumerate(nodes, 1):
        files = sorted(out.glob(f"node{i}.out*"))
        run = [f for f in files if f.name.endswith(".1")]
        idle = [f for f in files if f.name.endswith(".2")]
        if not run or not idle:
            raise SystemExit(f"{WHO}: callgrind wrote no dumps for node {i} in {out}")
        per_node.append((_callgrind_total(run[0]) - _callgrind_total(idle[0])) / max(1, r["requests"]))
    print(f"callgrind: {r['requests']} requests over 4 connections in {args.duration}s; user-space "
          f"instructions per request: node 1 (source) {per_node[0]:.0f}, node 2 (destination) {per_node[1]:.0f}")
    return per_node


def measure(name: str, url: str, pids: list[int], args, host: str | None, stats=None) -> dict:
    wrk(url, args.warmup, args.connections, host, who=WHO)
    counters = stats() if stats else None
    before = [cpu_times(pid) for pid in pids]
    r = wrk(url, args.duration, args.connections, host, who=WHO)
    after = [cpu_times(pid) for pid in pids]
    if stats:
        end = stats()
        r["tunnels"] = end["tunnels_accepted"] - counters["tunnels_accepted"]
        r["served"] = end["requests"] - counters["requests"]
    r.update(per_request(before, after, r["requests"]))
    r["name"] = name
    return r


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:
        return node_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench mesh-loopback", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=8, help="seconds per measured run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per path (default 2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure both paths this many times, interleaved, and keep each one's best run "
                        "(a shared machine only ever makes a run slower; default 1)")
    p.add_argument("--profile", metavar="DIR", help="run the agents under cProfile; stats in DIR/node{1,2}.prof")
    p.add_argument("--callgrind", metavar="DIR",
                   help="count instructions per request of each agent under valgrind (mesh path only)")
    p.add_argument("--l7", action="store_true", help="add a DENY on method DELETE for B: L7 authorization")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="the agents' event loop (default uvloop, as `nodeagent run` and `nodeagent proxy`)")
    args = p.parse_args(argv)
    tool = missing_tool(("wrk", "haproxy") + (("valgrind", "callgrind_control") if args.callgrind else ()))
    if tool:
        print(f"bench mesh-loopback: {tool} is not installed (make setup installs it)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO))
    from nodeagent.identity.ca import CADirectory

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-mesh-"))
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

    def start(argv_, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv_, cwd=str(REPO), **kw)
        procs.append(proc)
        return proc

    stats = None
    results: list[dict | None] = [None, None]
    try:
        CADirectory.init(tmp / "ca", now=time.time() - 3600)
        make_certs(tmp, ca_dir=tmp / "ca")
        app_port = free_port(B_ADDR)
        (tmp / "app.cfg").write_text(upstream_cfg(f"{B_ADDR}:{app_port}"))
        (tmp / "config").mkdir()
        (tmp / "config" / "mesh.yaml").write_text(MESH_CFG.format(a_addr=A_ADDR, b_addr=B_ADDR, app_port=app_port)
                                                  + (L7_CFG if args.l7 else ""))
        app = start(["haproxy", "-db", "-f", str(tmp / "app.cfg")], **quiet)
        wait_port(B_ADDR, app_port, app, timeout=20.0, who=WHO)

        tunnel_port, out_port = free_port(B_ADDR), free_port(A_ADDR)
        node = [sys.executable, "-m", "bench.mesh_loopback", "node", "--ca", str(tmp / "ca"),
                "--config-dir", str(tmp / "config"), "--loop", args.loop]
        prof = (lambda n: ["--profile", str(Path(args.profile).resolve() / f"{n}.prof")]) if args.profile else \
            (lambda n: [])
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        grind = (lambda n: [])
        if args.callgrind:
            cg_dir = Path(args.callgrind).resolve()
            cg_dir.mkdir(parents=True, exist_ok=True)
            for old in cg_dir.glob("node[12].out*"):  # an earlier run's dumps would be read as this one's
                old.unlink()
            grind = (lambda n: ["valgrind", "--tool=callgrind", "--instr-atstart=no", "-q",
                                f"--callgrind-out-file={cg_dir / (n + '.out')}"])
        ready = 120.0 if args.callgrind else 20.0
        node2 = start(grind("node2") + node + ["--workload", "shop/b", "--address", B_ADDR, "--tunnel-listen",
                                               str(tunnel_port), "--stats", str(tmp / "node2.json")] + prof("node2"),
                      stdout=subprocess.DEVNULL)
        wait_port(B_ADDR, tunnel_port, node2, timeout=ready, who=WHO)
        node1 = start(grind("node1") + node + ["--workload", "shop/a", "--address", A_ADDR, "--listen", str(out_port),
                                               "--tunnel-port", str(tunnel_port)] + prof("node1"),
                      stdout=subprocess.DEVNULL)
        wait_port(A_ADDR, out_port, node1, timeout=ready, who=WHO)
        if args.callgrind:
            callgrind_measure(f"http://{A_ADDR}:{out_port}/items", [node1, node2], cg_dir, args)
            return 0

        h1_port, h2_port = free_port(H1_ADDR), free_port(H2_ADDR)
        (tmp / "ingress.cfg").write_text(ingress_cfg(f"{H2_ADDR}:{h2_port}", f"{B_ADDR}:{app_port}", tmp))
        (tmp / "edge.cfg").write_text(edge_cfg(f"{H1_ADDR}:{h1_port}", f"{H2_ADDR}:{h2_port}", tmp))
        ingress = start(["haproxy", "-db", "-f", str(tmp / "ingress.cfg")], **quiet)
        wait_port(H2_ADDR, h2_port, ingress, timeout=20.0, who=WHO)
        edge = start(["haproxy", "-db", "-f", str(tmp / "edge.cfg")], **quiet)
        wait_port(H1_ADDR, h1_port, edge, timeout=20.0, who=WHO)

        mesh_url, ha_url = f"http://{A_ADDR}:{out_port}/items", f"http://{H1_ADDR}:{h1_port}/items"
        for url, host in ((mesh_url, B_HOST), (ha_url, None)):
            check = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url]
            if host:
                check[1:1] = ["-H", f"Host: {host}"]
            code = subprocess.run(check, capture_output=True, text=True).stdout
            if code != "200":
                raise SystemExit(f"bench mesh-loopback: {url} answered {code or 'nothing'}, not 200")
        paths = [
            ("mesh: agent -> mTLS -> agent (authz)", mesh_url, [node1.pid, node2.pid], B_HOST,
             lambda: node_stats(node2.pid, tmp / "node2.json")),
            ("haproxy -> TLS 1.3 mTLS -> haproxy", ha_url, [edge.pid, ingress.pid], None, None),
        ]
        for _ in range(max(1, args.rounds)):
            for i, (name, url, pids, host, stats_of) in enumerate(paths):
                r = measure(name, url, pids, args, host, stats_of)
                print(f"  measured {name}: {r['rps']:.0f} req/s", file=sys.stderr, flush=True)
                if results[i] is None or r["rps"] > results[i]["rps"]:
                    results[i] = r
    except KeyboardInterrupt:
        print("bench mesh-loopback: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all(procs, 20)
        try:
            stats = json.loads((tmp / "node2.json").read_text())
        except (OSError, ValueError):
            stats = None
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrk -t1 -c{args.connections}, {args.duration}s per path after {args.warmup}s warm-up, agents on {args.loop}"
          + (f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
          + "; CPU = both proxies of the path")
    print(f"{'path':<40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}")
    for r in results:
        print(f"{r['name']:<40}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['cpu_us']:>12.1f}{r['errors']:>8}")
    for r in results:
        split = ", ".join(f"{u:.1f}+{s:.1f}" for u, s in r["per_proxy"])
        print(f"  {r['name']}: user+system us/req per proxy (first, second): {split}")
    mesh, ha = results
    print(f"nodeagent/haproxy: {mesh['rps'] / ha['rps']:.2f}x req/s, {mesh['p50'] / ha['p50']:.2f}x p50, "
          f"{mesh['p99'] / ha['p99']:.2f}x p99, {mesh['cpu_us'] / ha['cpu_us']:.2f}x CPU per request")
    if "tunnels" in mesh:
        print(f"mesh tunnels (TLS handshakes) node 2 accepted during the measured run: {mesh['tunnels']} for "
              f"{mesh['served']} requests it served over {args.connections} wrk connections")
    if stats is not None:
        print(f"over the whole run (warm-ups, checks, rounds): {stats['tunnels_accepted']} tunnels accepted, "
              f"{stats['tunnels_refused']} refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
