"""`python -m bench mesh`: the full mesh path against an HAProxy chain with an mTLS hop, on the
two-node namespace mesh of nodeagent/meshlab.py (root).

- mesh: wrk in the enrolled ``client`` pod (node1) -> captured -> node1's agent (routing on the
  shop's catalog VirtualService: /newcatalog -> v2) -> mTLS tunnel (15008) -> node2's agent
  (STRICT, AuthorizationPolicy) -> the catalog-v2 pod;
- haproxy: wrk in a non-enrolled pod on node1 -> HAProxy in node1's namespace -> TLS 1.3 with
  client certificates (verified both ways) -> HAProxy in node2's namespace -> a non-enrolled
  server pod on node2.

Both servers are the same HAProxy answering ``200 ok`` itself (not Python-bound). One worker
each: every nodeagent and HAProxy runs one process, ``nbthread 1``. Reported: req/s, p50/p99
(wrk --latency), and CPU microseconds per request of the two proxies of each path together
(utime+stime deltas from /proc/PID/stat over the measured run / requests completed), and the
ratios in one run. Then, unless ``--latency-duration 0``, the unloaded latency: wrk -c1 on the
direct pod-to-pod path (no proxy), the mesh and the chain, and the p50 each path adds over
direct (under closed-loop wrk with 16 connections p50 is only connections / throughput).
Setup runs the real agents and CA service; nothing leaves the machine.

``--counts`` adds what does not depend on the machine's load, per request of a wrk -c1 run of
each path: the system calls of each proxy (``perf stat`` on the syscall tracepoints, when perf
is installed) and, in every namespace the path crosses, the IP packets received and forwarded and
the TCP segments in and out (``nstat``). The mesh's tunnel runs between the pods' own namespaces
(as ztunnel's in-pod mode), so each of its packets is also forwarded by both node namespaces,
which the chain's node-to-node hop is not. ``--pod-chain`` measures a third path with the same
network path as the mesh: the same two HAProxys, run in the client's and the server's own pod
namespaces (wrk -> HAProxy over loopback -> TLS pod to pod -> HAProxy -> the server over
loopback), so what it adds over the node chain is the network path alone, and what the mesh adds
over it is the proxies and the capture.

``--pin`` runs the unloaded measurements with every process of the lab (and wrk) on one CPU. On
this VM (2 vCPUs, no guest halt-polling) a wake-up of a process on the other, idle CPU costs
10-20 us more than one on the waker's CPU, and where the scheduler puts the four processes of a
path changes from run to run: unpinned, one path's added p50 moves by 2x between runs; pinned,
it repeats to within ~1 us, and what is left is the processing of the paths themselves.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from bench.common import cpu_times, edge_cfg, ingress_cfg, make_certs, missing_tool, per_request, upstream_cfg, wrk

WHO = "bench mesh"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench mesh", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=8, help="seconds per measured run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per path (default 2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--capture", choices=("nftables", "iptables", "ebpf"), default="nftables",
                   help="how the agents capture the pods' traffic (default nftables)")
    p.add_argument("--latency-duration", type=int, default=4,
                   help="seconds of the unloaded latency runs (wrk -c1; default 4; 0: skip them)")
    p.add_argument("--counts", action="store_true",
                   help="also count, per request of a wrk -c1 run of each path, each proxy's system calls "
                        "(perf) and the packets and TCP segments of every namespace on the path (nstat)")
    p.add_argument("--pod-chain", action="store_true",
                   help="also measure the HAProxy chain run inside the client's and server's pod namespaces "
                        "(the mesh's network path: TLS from pod to pod, loopback at both ends)")
    p.add_argument("--pin", action="store_true",
                   help="run the unloaded measurements with every process of the lab and wrk on CPU 0: "
                        "removes the cross-CPU wake-ups whose number varies from run to run")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure both paths this many times, interleaved, and keep each one's best run "
                        "(highest req/s; lowest p50 unloaded): a shared machine only ever makes a run "
                        "worse (default 1)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench mesh: needs root (network namespaces, nftables); run `sudo python -m bench mesh`",
              file=sys.stderr)
        return 1
    tool = missing_tool(("wrk", "haproxy", "nft", "nsenter"))
    if tool:
        print(f"bench mesh: {tool} is not installed (make setup installs it)", file=sys.stderr)
        return 1

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nodeagent import meshlab

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    lab = meshlab.MeshLab(capture=args.capture, log=lambda m: print(f"  {m}", flush=True))
    try:
        results = run(lab, args)
    except meshlab.LabError as exc:
        print(f"bench mesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench mesh: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        problems = lab.teardown()
        if problems:
            print(f"bench mesh: teardown left {problems}", file=sys.stderr)
    counted = [r for r in results if r["kind"] == "counts"]
    loaded = [r for r in results if r["kind"] == "loaded"]
    quiet = [r for r in results if r["kind"] == "unloaded"]
    rounds = f", best of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    print(f"\nwrk -t1 -c{args.connections} in the client pod, {args.duration}s per path after "
          f"{args.warmup}s warm-up{rounds}; capture {args.capture}; CPU = both proxies of the path; "
          f"load average at the start {load}")
    print(f"{'path':<54}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}")
    for r in loaded:
        print(f"{r['name']:<54}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['cpu_us']:>12.1f}{r['errors']:>8}")
    for r in loaded:
        split = ", ".join(f"{u:.1f}+{s:.1f}" for u, s in r["per_proxy"])
        print(f"  {r['name'].split(':')[0]}: user+system us/req per proxy (source side, destination side): {split}")
    mesh, ha = loaded[:2]
    if quiet:
        direct, lmesh, lha = quiet[:3]
        pinned = f", every process on CPU {PIN_CPU}" if args.pin else ""
        print(f"\nunloaded (wrk -t1 -c1, {args.latency_duration}s after 1s warm-up{pinned}): p50 / p99 ms; added = "
              f"p50 minus the direct pod-to-pod path's (plainclient -> plainserver, no proxy)")
        for r in quiet:
            added = "" if r is direct else f"   added p50 {r['p50'] - direct['p50']:.3f} ms"
            print(f"  {r['name']:<52}{r['p50']:>8.3f}{r['p99']:>8.3f}{added}")
        am, ah = lmesh["p50"] - direct["p50"], lha["p50"] - direct["p50"]
        print(f"  added p50: mesh {am:.3f} ms, haproxy chain {ah:.3f} ms "
              f"({am / ah:.2f}x)" if ah > 0 else f"  added p50: mesh {am:.3f} ms, haproxy chain {ah:.3f} ms")
        for r in quiet[3:]:
            ap = r["p50"] - direct["p50"]
            print(f"  added p50: mesh {am:.3f} ms, haproxy chain in the pods {ap:.3f} ms"
                  + (f" ({am / ap:.2f}x)" if ap > 0 else ""))
    for r in counted:
        print_counts(r)
    print(f"mesh path: {mesh['mtls']:.0f} requests counted by node2's agent with "
          f"connection_security_policy=mutual_tls (wrk completed {mesh['wrk_total']})")
    for r in loaded[2:]:
        print(f"nodeagent/haproxy in the pods: {mesh['rps'] / r['rps']:.2f}x req/s, {mesh['p50'] / r['p50']:.2f}x p50, "
              f"{mesh['cpu_us'] / r['cpu_us']:.2f}x CPU per request")
    print(f"nodeagent/haproxy: {mesh['rps'] / ha['rps']:.2f}x req/s, {mesh['p50'] / ha['p50']:.2f}x p50, "
          f"{mesh['p99'] / ha['p99']:.2f}x p99, {mesh['cpu_us'] / ha['cpu_us']:.2f}x CPU per request")
    return 0


def run(lab, args) -> list[dict]:
    """Loaded runs of both paths, then unloaded runs of the direct path and both paths,
    ``args.rounds`` times interleaved; per path the best of its runs."""
    paths, direct = setup(lab, args)
    loaded = [None] * len(paths)
    completed = 0  # wrk requests of the mesh path so far: node2's mutual_tls counter must match
    for _ in range(max(1, args.rounds)):
        for i, path in enumerate(paths):
            r = measure(lab, args, path)
            if "mtls" in r:
                completed += r["requests"] + r["warmup_requests"]
                r["wrk_total"] = completed
            r["kind"] = "loaded"
            if loaded[i] is None or r["rps"] > loaded[i]["rps"]:
                loaded[i] = r
    results = loaded
    if args.latency_duration > 0:
        quiet = [None] * (1 + len(paths))
        restore = pin_lab(lab) if args.pin else {}
        try:
            for _ in range(max(1, args.rounds)):
                for i, path in enumerate((direct, *paths)):
                    r = unloaded(lab, args, path)
                    r["kind"] = "unloaded"
                    if quiet[i] is None or r["p50"] < quiet[i]["p50"]:
                        quiet[i] = r
        finally:
            unpin(restore)
        results += quiet
    if args.counts:
        for path in paths:
            results.append(counts(lab, args, path))
    return results


COUNTED = ("IpInReceives", "IpForwDatagrams", "TcpInSegs", "TcpOutSegs", "TcpExtTCPPureAcks",
           "TcpExtDelayedACKs")


def _nstat(lab, ns: str) -> dict[str, int]:
    """The namespace's absolute counters (``nstat -az``: no history file is read or written)."""
    out = lab.exec(ns, ["nstat", "-az"], check=True).stdout
    values = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            values[fields[0]] = int(fields[1])
    return values


def _syscalls(text: str) -> dict[str, int]:
    """``perf stat -x,`` output of syscalls:sys_enter_* events -> {syscall: count} (non-zero)."""
    calls = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit() and "sys_enter_" in fields[2]:
            n = int(fields[0])
            if n:
                calls[fields[2].split("sys_enter_", 1)[1]] = n
    return calls


def counts(lab, args, path) -> dict:
    """One wrk -c1 run of ``path`` with its proxies' system calls and the packet counters of the
    namespaces it crosses, each per request."""
    import shutil
    import tempfile

    name, pod, url, host, pids = path
    server = "catalog-v2" if pod == "client" else "plainserver"
    spaces = [pod, "node1", "node2", server]
    seconds = max(2, args.latency_duration or 4)

    def in_pod(argv, timeout):
        return lab.exec(pod, argv, timeout=timeout, check=True).stdout

    wrk(url, 1, 1, host, who=WHO, run=in_pod)
    perf = shutil.which("perf")
    tmp = tempfile.mkdtemp(prefix="bench-mesh-counts-")
    stats = []
    try:
        procs = []
        if perf:
            for pid in pids:
                out = os.path.join(tmp, f"{pid}.txt")
                stats.append(out)
                procs.append(subprocess.Popen([perf, "stat", "-x,", "-o", out, "-e", "syscalls:sys_enter_*",
                                               "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # perf attaches to every tracepoint first
        before = {ns: _nstat(lab, ns) for ns in spaces}
        r = wrk(url, seconds, 1, host, who=WHO, run=in_pod)
        after = {ns: _nstat(lab, ns) for ns in spaces}
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        n = max(1, r["requests"])
        r["name"] = name
        r["kind"] = "counts"
        r["counts"] = {
            "syscalls": [{k: v / n for k, v in _syscalls(open(f).read()).items()} if os.path.exists(f) else None
                         for f in stats] if perf else None,
            "packets": {ns: {k: (after[ns].get(k, 0) - before[ns].get(k, 0)) / n for k in COUNTED} for ns in spaces},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return r


def print_counts(r) -> None:
    c = r["counts"]
    print(f"\nper request, wrk -t1 -c1 ({r['requests']} requests), {r['name']}")
    if c["syscalls"] is None:
        print("  system calls: perf is not installed")
    else:
        for where, calls in zip(("source-side", "destination-side"), c["syscalls"]):
            if calls is None:
                print(f"  {where} proxy: perf counted nothing")
                continue
            shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v >= 0.01)
            print(f"  {where} proxy: {sum(calls.values()):.2f} system calls: {shown}")
    print(f"  {'namespace':<14}" + "".join(f"{k.replace('TcpExt', ''):>17}" for k in COUNTED))
    for ns, values in c["packets"].items():
        print(f"  {ns:<14}" + "".join(f"{values[k]:>17.2f}" for k in COUNTED))


def unloaded(lab, args, path) -> dict:
    """p50/p99 of ``path`` with one connection (one request at a time): the latency the path
    adds when nothing queues, which closed-loop wrk with many connections cannot show (there
    p50 is the connection count over the throughput)."""
    name, pod, url, host, _ = path

    pin = ["taskset", "-c", str(PIN_CPU)] if args.pin else []

    def in_pod(argv, timeout):
        return lab.exec(pod, pin + argv, timeout=timeout, check=True).stdout

    wrk(url, 1, 1, host, who=WHO, run=in_pod)
    r = wrk(url, args.latency_duration, 1, host, who=WHO, run=in_pod)
    r["name"] = name
    return r


PIN_CPU = 0


def lab_threads(lab) -> list[int]:
    """Every thread of every process living in one of the lab's network namespaces."""
    spaces = set()
    for name in [*lab.nodes, lab.ca_node, *lab.pods]:
        try:
            spaces.add(os.stat(f"/run/netns/{lab.topo.netns(name)}").st_ino)
        except (OSError, KeyError):
            continue
    tids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino not in spaces:
                continue
            tids += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # gone, or not ours to look at
    return tids


def pin_lab(lab) -> dict[int, set]:
    """Put every thread of the lab on PIN_CPU; returns what to restore."""
    restore = {}
    for tid in lab_threads(lab):
        try:
            restore[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {PIN_CPU})
        except OSError:
            restore.pop(tid, None)  # exited meanwhile
    return restore


def unpin(restore: dict[int, set]) -> None:
    for tid, cpus in restore.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # exited meanwhile


def setup(lab, args) -> tuple[list[tuple], tuple]:
    """Build the lab, start both paths' processes, check them; returns one
    (name, pod, url, host, pids) per path (mesh first), and the direct pod-to-pod path."""
    from nodeagent import meshlab

    docs = meshlab.load_documents()
    wl = meshlab.sample_workloads(docs)
    services = meshlab.service_ports(docs)
    lab.build(["node1", "node2"])
    server = wl["catalog-v2"]
    lab.add_pod("node1", "client", namespace="shop", service_account="shop-client", labels={"app": "client"})
    lab.add_pod("node2", "catalog-v2", namespace=server.namespace, service_account=server.service_account,
                labels=server.labels, port=server.port)
    lab.add_pod("node1", "plainclient", namespace="bench", labels={"app": "plainclient"})
    lab.add_pod("node2", "plainserver", namespace="bench", labels={"app": "plainserver"}, port=server.port)
    vips = {name: f"{meshlab.SERVICE_NET}.{i + 1}" for i, name in enumerate(sorted(services))}
    text, _ = meshlab.mesh_config(docs, {"catalog-v2": lab.pods["catalog-v2"].ip}, vips)
    lab.write_config(text)
    lab.place_all([lab.pods["client"], lab.pods["catalog-v2"]])
    for node in lab.nodes:
        lab.start_agent(node, wait=False)
    for node in lab.nodes:
        lab.wait_ready(node)
    lab.enroll_all([lab.pods["client"], lab.pods["catalog-v2"]])
    for node in lab.nodes:
        lab.wait_certificates(node)

    d = lab.dir
    make_certs(d, server_name="mesh-node2")
    port = server.port
    with open(os.path.join(d, "upstream.cfg"), "w") as f:
        f.write(upstream_cfg(f"0.0.0.0:{port}"))
    node1, node2 = lab.topo.nodes["node1"], lab.topo.nodes["node2"]
    edge_listen = f"{node1.gateway}:18080"
    with open(os.path.join(d, "edge.cfg"), "w") as f:
        f.write(edge_cfg(edge_listen, f"{node2.link_address}:18443", d, sni="mesh-node2"))
    with open(os.path.join(d, "ingress.cfg"), "w") as f:
        f.write(ingress_cfg(f"{node2.link_address}:18443", f"{lab.pods['plainserver'].ip}:{port}", d))
    for pod in ("catalog-v2", "plainserver"):
        lab.topo.spawn(pod, ["haproxy", "-db", "-f", os.path.join(d, "upstream.cfg")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ingress = lab.topo.spawn("node2", ["haproxy", "-db", "-f", os.path.join(d, "ingress.cfg")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    edge = lab.topo.spawn("node1", ["haproxy", "-db", "-f", os.path.join(d, "edge.cfg")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    mesh_url, mesh_host = f"http://{vips['catalog']}:{services['catalog'][1]}/newcatalog/items", \
        f"{services['catalog'][0]}:{services['catalog'][1]}"
    ha_url = f"http://{edge_listen}/newcatalog/items"

    def check(pod, url, host):
        def ok():
            argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url]
            if host:
                argv[1:1] = ["-H", f"Host: {host}"]
            return lab.exec(pod, argv).stdout == "200"
        lab._wait(f"HTTP 200 from {url} in pod {pod}", ok)

    check("plainclient", ha_url, None)
    check("client", mesh_url, mesh_host)
    # The HAProxy hop is mutual TLS: a client without a certificate is refused.
    no_cert = lab.exec("node1", ["curl", "-sk", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                                 f"https://{node2.link_address}:18443/newcatalog/items"])
    if no_cert.stdout == "200":
        raise meshlab.LabError("the HAProxy ingress on node2 accepted a client without a certificate")
    agents = [lab.agents["node1"].pid, lab.agents["node2"].pid]
    paths = [
        ("mesh: client -> agent -> mTLS -> agent -> pod", "client", mesh_url, mesh_host, agents),
        ("haproxy: client -> haproxy -> TLS -> haproxy -> pod", "plainclient", ha_url, None,
         [edge.pid, ingress.pid]),
    ]
    if args.pod_chain:
        # The same two HAProxys inside the pods: wrk -> 127.0.0.1 -> HAProxy -> TLS from the client pod
        # to the server pod -> HAProxy -> 127.0.0.1 -> the server. The mesh's network path, no capture.
        server_ip = lab.pods["plainserver"].ip
        with open(os.path.join(d, "pod-edge.cfg"), "w") as f:
            f.write(edge_cfg("127.0.0.1:18081", f"{server_ip}:18444", d, sni="mesh-node2"))
        with open(os.path.join(d, "pod-ingress.cfg"), "w") as f:
            f.write(ingress_cfg(f"{server_ip}:18444", f"127.0.0.1:{port}", d))
        pod_ingress = lab.topo.spawn("plainserver", ["haproxy", "-db", "-f", os.path.join(d, "pod-ingress.cfg")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pod_edge = lab.topo.spawn("plainclient", ["haproxy", "-db", "-f", os.path.join(d, "pod-edge.cfg")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pod_url = "http://127.0.0.1:18081/newcatalog/items"
        check("plainclient", pod_url, None)
        paths.append(("haproxy in pods: client -> haproxy -> TLS -> haproxy", "plainclient", pod_url, None,
                      [pod_edge.pid, pod_ingress.pid]))
    direct_url = f"http://{lab.pods['plainserver'].ip}:{port}/newcatalog/items"
    check("plainclient", direct_url, None)
    direct = ("direct: plainclient -> plainserver (no proxy)", "plainclient", direct_url, None, [])
    return paths, direct


def measure(lab, args, path) -> dict:
    """Warm-up, then one measured wrk run of ``path`` with the CPU time of its two proxies."""
    name, pod, url, host, pids = path

    def in_pod(argv, timeout):
        return lab.exec(pod, argv, timeout=timeout, check=True).stdout

    warm = wrk(url, args.warmup, args.connections, host, who=WHO, run=in_pod)
    before = [cpu_times(pid) for pid in pids]
    r = wrk(url, args.duration, args.connections, host, who=WHO, run=in_pod)
    cpu = per_request(before, [cpu_times(pid) for pid in pids], r["requests"])
    r["cpu_us"] = cpu["cpu_us"]
    r["per_proxy"] = cpu["per_proxy"]
    r["name"] = name
    r["warmup_requests"] = warm["requests"]
    if pod == "client":
        r["mtls"] = lab.count("node2", "istio_requests_total", reporter="destination",
                              destination_workload="catalog-v2", response_code="200",
                              connection_security_policy="mutual_tls")
    print(f"  measured {name}: {r['rps']:.0f} req/s", flush=True)
    time.sleep(0.5)
    return r


if __name__ == "__main__":
    sys.exit(main())
