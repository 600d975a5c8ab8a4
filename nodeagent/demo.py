"""`make demo` (`python -m nodeagent.demo`): the shop sample on a two-node mesh
built from network namespaces on this machine, driven by curl from inside the
pods, with a report of what the mesh did; then everything is torn down (also
on Ctrl-C / SIGTERM).

As root: node1 and node2 (+ a control namespace running the CA service), one
``nodeagent run`` per node with nftables capture, the sample's workloads as
pods (nodeagent/defaults with only the addresses rewritten, see
nodeagent/meshlab.py). Without root: the same configuration pipeline only,
and ``nodeagent explain`` says what the mesh would enforce.
"""
from __future__ import annotations

import collections
import os
import signal
import sys
import tempfile
import threading
import time

from nodeagent import meshlab
from nodeagent.meshlab import LabError, MeshLab, start_shop
from redirect.netns import NetnsError

MARKER = b"DEMO-PLAINTEXT-MARKER-5b1c"


_quiet = False


def say(text: str = "") -> None:
    """Print a report line; a closed stdout (`make demo | head`) must not stop the teardown."""
    global _quiet
    if _quiet:
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _quiet = True
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())


_unexpected: list[str] = []


def expect(condition: bool, what: str) -> None:
    """The demo checks what it shows: a surprise is printed and makes the exit code 1."""
    if not condition:
        _unexpected.append(what)
        say(f"  !! unexpected: {what}")


def section(title: str) -> None:
    say()
    say(f"== {title} ==")


def _tally(results) -> str:
    counts = collections.Counter(r.json()["pod"] if r.status == 200 else f"HTTP {r.status or 'error'}"
                                 for r in results)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _chain(body: dict) -> str:
    hops = [f"{body['pod']}"]
    call = body.get("call")
    while call:
        if call.get("status") != 200:
            hops.append(f"HTTP {call.get('status')} {call.get('text', call.get('error', '')).strip()[:40]}")
            break
        body = call["body"]
        hops.append(body["pod"])
        call = body.get("call")
    return " -> ".join(hops)


# --------------------------------------------------------------------------
# the live mesh
# --------------------------------------------------------------------------

def routing(shop) -> None:
    section("1. routing: productpage (node1) -> reviews (node2), VirtualService reviews")
    split = shop.curl("productpage-v1", "reviews", "/reviews", count=30)
    say(f"  30 requests, no user          : {_tally(split)}   (weights 80/10/10 over v1/v2/v3)")
    jason = shop.curl("productpage-v1", "reviews", "/reviews", headers={"end-user": "jason"}, count=8)
    say(f"  8 requests, end-user: jason   : {_tally(jason)}   (route 'jason' -> subset v2)")
    expect(all(r.status == 200 and r.json()["pod"].startswith("reviews-") for r in split), "reviews split")
    expect(all(r.status == 200 and r.json()["pod"] == "reviews-v2" for r in jason), "jason -> reviews-v2")
    chains = collections.Counter()
    for r in shop.curl("client", "productpage", "/productpage", count=6):
        chains[_chain(r.json()) if r.status == 200 else f"HTTP {r.status}"] += 1
    expect(all(c.startswith("productpage-v1 -> reviews-") and "HTTP" not in c for c in chains), "full chain")
    say("  client -> productpage, which calls reviews, which (v2, v3) call ratings:")
    for chain, n in sorted(chains.items()):
        say(f"    {n} x {chain}")
    section("2. catalog: /newcatalog -> v2, everything else -> v1 (VirtualService catalog)")
    new = shop.curl("client", "catalog", "/newcatalog/items", count=10)
    say(f"  10 x GET /newcatalog/items    : {_tally(new)}")
    expect(all(r.status == 200 and r.json()["pod"] == "catalog-v2" for r in new), "/newcatalog -> catalog-v2")


def faults(shop) -> None:
    section("3. fault injection: ratings for end-user tester (2 s delay always, abort 503 for 50%)")
    results: list[tuple[float, object]] = []

    def one():
        t0 = time.monotonic()
        [r] = shop.curl("reviews-v2", "ratings", "/ratings", headers={"end-user": "tester"}, max_time=6)
        results.append((time.monotonic() - t0, r))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    for took, r in sorted(results, key=lambda x: x[1].status):
        what = r.json()["pod"] if r.status == 200 else r.body.strip()[:40]
        say(f"  HTTP {r.status} after {took:.1f} s  ({what})")
    normal = shop.curl("reviews-v2", "ratings", "/ratings", count=3)
    say(f"  3 requests without the header: {_tally(normal)}")
    expect(len(results) == 8 and all(took >= 1.9 and r.status in (200, 503) for took, r in results),
           "tester: 2 s delay, 200 or 503")
    expect(all(r.status == 200 for r in normal), "ratings without fault")


def denials(shop) -> None:
    lab = shop.lab
    section("4. denied by policy")
    [r] = shop.curl("client", "reviews", "/reviews")
    say(f"  shop/shop-client GET reviews        -> HTTP {r.status} {r.body.strip()!r}"
        "   (AuthorizationPolicy reviews-from-productpage)")
    expect(r.status == 403 and r.body.strip() == "RBAC: access denied", "shop-client denied on reviews")
    [r] = shop.curl("productpage-v1", "reviews", "/reviews")
    say(f"  shop/bookinfo-productpage GET reviews -> HTTP {r.status}   (allowed principal)")
    expect(r.status == 200, "productpage allowed on reviews")
    [r] = shop.curl("client", "catalog", "/newcatalog/1", method="DELETE")
    say(f"  shop/shop-client DELETE catalog     -> HTTP {r.status} {r.body.strip()!r}   (catalog-no-delete)")
    expect(r.status == 403, "DELETE on catalog denied")
    target = lab.pods["catalog-v2"]
    [r] = lab.curl("outsider", f"http://{target.ip}:{target.port}/newcatalog/x", max_time=3)
    outcome = f"HTTP {r.status}" if r.status else f"refused ({r.error or 'curl exit %d' % r.exit_code})"
    say(f"  legacy/outsider (not enrolled, plaintext) -> catalog-v2 {target.ip}:{target.port} directly: "
        f"{outcome}   (PeerAuthentication STRICT)")
    expect(r.status == 0, "plaintext refused by STRICT")


def wire(shop) -> None:
    lab = shop.lab
    section("5. mutual TLS on the wire (AF_PACKET capture on node2's link to node1)")
    target = lab.pods["catalog-v2"]
    with lab.sniff("node2", "node1") as cap:
        lab.send_udp("client", target.ip, 9999, MARKER + b"-udp")
        [r] = shop.curl("client", "catalog", "/newcatalog/upload", method="POST", data=MARKER.decode() * 4)
    in_tcp = any(MARKER in f and b"-udp" not in f for f in cap.frames)
    say(f"  POST with a marker in the body: HTTP {r.status}; {len(cap.frames)} frames captured, "
        f"TCP ports {sorted(p for p in cap.tcp_ports() if p < 20000)} (+ ephemeral)")
    say(f"  marker in a plaintext UDP datagram (control): {'seen' if cap.contains(MARKER + b'-udp') else 'NOT seen'}")
    if r.status == 200 and 15008 in cap.tcp_ports():
        verdict = "SEEN (plaintext!)" if in_tcp else "not seen: the hop went over the 15008 tunnel, encrypted"
    else:
        verdict = ("SEEN (plaintext!)" if in_tcp else
                   f"not seen, but no request crossed the tunnel (HTTP {r.status}), so this proves nothing")
    say(f"  marker in the request body on the wire       : {verdict}")
    n = lab.count("node2", "istio_requests_total", reporter="destination", connection_security_policy="mutual_tls")
    say(f"  node2 counted {n:.0f} request(s) with connection_security_policy=\"mutual_tls\"")
    expect(r.status == 200 and cap.contains(MARKER + b"-udp") and 15008 in cap.tcp_ports() and not in_tcp
           and n >= 1, "mTLS on the wire")


def outlier(shop) -> None:
    lab = shop.lab
    section("6. outlier detection: catalog-v1b (node2) answers 503; consecutiveErrors 5, baseEjectionTime 15m")
    results = shop.curl("client", "catalog", "/items", count=30)
    say(f"  30 x GET /items (subset v1: catalog-v1a, catalog-v1b): {_tally(results)}")
    say("  (no retries in the route: Istio's default applies, 503 is retried on another host, so the")
    say("   client sees v1a's answers while v1b's 503s count towards its ejection)")
    expect(all(r.status == 200 for r in results), "catalog v1 answers (503s retried)")
    view = lab.admin("node1", "/endpoints")
    ejected = {e["address"] for c in view["clusters"] for e in c["endpoints"]
               if c["cluster"] == "outbound|80|v1|catalog.shop.svc.cluster.local" and e["ejected"]}
    expect(ejected == {lab.pods["catalog-v1b"].ip}, "catalog-v1b ejected (and only it)")
    for c in view["clusters"]:
        if c["cluster"] != "outbound|80|v1|catalog.shop.svc.cluster.local":
            continue
        for e in c["endpoints"]:
            pod = next((p.name for p in lab.pods.values() if p.ip == e["address"]), e["address"])
            o = e.get("outlier") or {}
            if e["ejected"]:
                state = (f"EJECTED for another {o.get('remaining', 0):.0f} s "
                         f"(ejected {o.get('times_ejected', 1)} time(s))")
            else:
                state = "serving"
            say(f"  node1 /endpoints {c['cluster']} [{c['source_namespace']}]: {pod} {e['address']}:{e['port']} "
                f"{state}")


def counted(shop) -> None:
    lab = shop.lab
    section("7. what the agents counted (istio_requests_total)")
    rows = collections.Counter()
    for node in lab.nodes:
        for name, labels, value in lab.metrics(node):
            if name != "istio_requests_total" or not value:
                continue
            source = labels["source_workload"]
            if source == "unknown" and labels["source_principal"] != "unknown":
                source = labels["source_principal"].split("/ns/", 1)[-1].replace("/sa/", "/")  # ns/sa
            rows[(node, labels["reporter"], source, labels["destination_workload"],
                  labels["response_code"], labels["connection_security_policy"])] += value
    say("  (source: the workload, or ns/service-account proven by the peer certificate)")
    say(f"  {'node':6} {'reporter':11} {'source':26} {'destination':15} {'code':5} {'security':11} count")
    for key, value in sorted(rows.items()):
        say("  %-6s %-11s %-26s %-15s %-5s %-11s %d" % (*key, value))


def live() -> int:
    started = time.monotonic()
    say("nodeagent demo: the shop on a two-node mesh (network namespaces on this machine)")
    lab = MeshLab(log=lambda m: say(f"  {m}"))
    failed = []
    try:
        section("building")
        shop = start_shop(lab)
        say("  config: nodeagent/defaults/*.yaml with WorkloadEntry/ServiceEntry addresses rewritten "
            "(pods in 10.250.N.0/24, services on 10.250.200.0/24)")
        for name in ("productpage-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1",
                     "catalog-v1a", "catalog-v1b", "catalog-v2", "client", "outsider"):
            p = lab.pods[name]
            say(f"    {p.node}: {name:15} {p.ip:12} {p.namespace}/{p.service_account}"
                + ("" if p.enrolled else "  (not enrolled)"))
        for step in (routing, faults, denials, wire, outlier, counted):
            try:
                step(shop)
            except (LabError, ValueError, KeyError) as exc:
                failed.append(step.__name__)
                say(f"  FAILED: {exc}")
    except (LabError, NetnsError, OSError) as exc:
        say(f"nodeagent demo: {exc}")
        failed.append("setup")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = lab.teardown()
        section("teardown")
        say("  agents and CA stopped, capture uninstalled, processes killed, namespaces deleted"
            if not problems else f"  left behind: {problems}")
    say(f"\ndone in {time.monotonic() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; unexpected: {', '.join(_unexpected)}" if _unexpected else "; everything as the configuration says"))
    return 1 if failed or problems or _unexpected else 0


# --------------------------------------------------------------------------
# no root: the configuration pipeline only
# --------------------------------------------------------------------------

EXPLAIN = [
    ("productpage -> reviews, no user", "shop/bookinfo-productpage", "shop/reviews-v1",
     ["--port", "9080", "--method", "GET", "--path", "/reviews", "--host", "reviews.shop.svc.cluster.local:9080"]),
    ("productpage -> reviews as jason", "shop/bookinfo-productpage", "shop/reviews-v2",
     ["--port", "9080", "--method", "GET", "--path", "/reviews", "--host", "reviews.shop.svc.cluster.local:9080",
      "--header", "end-user=jason"]),
    ("shop-client -> reviews", "shop/shop-client", "shop/reviews-v1",
     ["--port", "9080", "--method", "GET", "--path", "/reviews", "--host", "reviews.shop.svc.cluster.local:9080"]),
    ("shop-client DELETE catalog", "shop/shop-client", "shop/catalog-v2",
     ["--port", "8080", "--method", "DELETE", "--path", "/newcatalog/1", "--host", "catalog.shop.svc.cluster.local:80"]),
    ("shop-client GET /newcatalog", "shop/shop-client", "shop/catalog-v2",
     ["--port", "8080", "--method", "GET", "--path", "/newcatalog/1", "--host", "catalog.shop.svc.cluster.local:80"]),
    ("plaintext -> catalog-v2", "plaintext", "shop/catalog-v2", ["--port", "8080"]),
]


def config_only(asked: bool = False) -> int:
    import subprocess

    if asked:
        say("nodeagent demo --config-only: the configuration pipeline only —")
    else:
        say("nodeagent demo: not running as root, so no network namespaces or capture rules can be made.")
        say("Run `sudo make demo` for the live two-node mesh. Below: the configuration pipeline only —")
    say("the same generated configuration, and what `nodeagent explain` says the mesh would enforce.\n")
    docs = meshlab.load_documents()
    workloads = meshlab.sample_workloads(docs)
    ips, per_node = {}, collections.Counter()
    for name, node in meshlab.SHOP_PLACEMENT.items():
        idx = int(node.removeprefix("node"))
        per_node[node] += 1
        ips[name] = f"10.250.{idx}.{per_node[node] + 1}"
    services = meshlab.service_ports(docs)
    vips = {name: f"{meshlab.SERVICE_NET}.{i + 1}" for i, name in enumerate(sorted(services))}
    text, dropped = meshlab.mesh_config(docs, ips, vips)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="nodeagent-demo-") as tmp:
        with open(os.path.join(tmp, "mesh.yaml"), "w") as fh:
            fh.write(text)
        say("workloads (WorkloadEntry -> pod address):")
        for name, wd in workloads.items():
            say(f"  {meshlab.SHOP_PLACEMENT.get(name, '-'):6} {name:15} {ips.get(name, '-'):12} "
                f"{wd.namespace}/{wd.service_account} {wd.labels}")
        say("services (ServiceEntry -> virtual address):")
        for name, (host, port) in sorted(services.items()):
            say(f"  {host}:{port} -> {vips[name]}")
        for label, src, dst, extra in EXPLAIN:
            proc = subprocess.run([sys.executable, "-m", "nodeagent", "explain", "--config-dir", tmp,
                                   "--from", src, "--to", dst, *extra], capture_output=True, text=True,
                                  timeout=30, cwd=repo)
            say(f"\n-- {label} ({src} -> {dst})")
            out = (proc.stdout or proc.stderr).rstrip()
            say("\n".join("   " + line for line in out.splitlines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m nodeagent.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-only", action="store_true",
                   help="only the configuration pipeline and `nodeagent explain` (what runs without root)")
    args = p.parse_args(argv)
    if args.config_only or os.geteuid() != 0:
        return config_only(asked=args.config_only)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        return live()
    except KeyboardInterrupt:
        say("\ninterrupted: torn down")
        return 130


if __name__ == "__main__":
    sys.exit(main())
