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
ratios in one run. Setup runs the real agents and CA service; nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")

UPSTREAM_CFG = """global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend upstream
    bind 0.0.0.0:{port}
    http-request return status 200 content-type text/plain string ok
"""

EDGE_CFG = """global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend out
    bind {listen}
    default_backend next
backend next
    server s1 {server} ssl crt {dir}/client.pem ca-file {dir}/ca.pem verify required sni str(mesh-node2)
"""

INGRESS_CFG = """global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend in
    bind {listen} ssl crt {dir}/server.pem ca-file {dir}/ca.pem verify required
    default_backend app
backend app
    server app {server}
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_wrk(out: str) -> dict:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise SystemExit(f"bench mesh: no {pct}% latency in wrk output:\n{out}")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0),
    }


def make_certs(directory: str) -> None:
    """A throwaway CA, a server and a client certificate (ECDSA P-256, as the mesh's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench-ca")).issuer_name(name("bench-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(directory, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"mesh-{who}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("mesh-node2")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        path = os.path.join(directory, f"{who}.pem")
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM) + pem_key(key))
        os.chmod(path, 0o600)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench mesh", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=8, help="seconds per measured run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per path (default 2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--capture", choices=("nftables", "iptables", "ebpf"), default="nftables",
                   help="how the agents capture the pods' traffic (default nftables)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench mesh: needs root (network namespaces, nftables); run `sudo python -m bench mesh`",
              file=sys.stderr)
        return 1
    for tool in ("wrk", "haproxy", "nft", "nsenter"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
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
    print(f"\nwrk -t1 -c{args.connections} in the client pod, {args.duration}s per path after "
          f"{args.warmup}s warm-up; capture {args.capture}; CPU = both proxies of the path; "
          f"load average at the start {load}")
    print(f"{'path':<54}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}")
    for r in results:
        print(f"{r['name']:<54}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['cpu_us']:>12.1f}{r['errors']:>8}")
    mesh, ha = results
    print(f"mesh path: {mesh['mtls']:.0f} requests counted by node2's agent with "
          f"connection_security_policy=mutual_tls (wrk completed {mesh['requests'] + mesh['warmup_requests']})")
    print(f"nodeagent/haproxy: {mesh['rps'] / ha['rps']:.2f}x req/s, {mesh['p50'] / ha['p50']:.2f}x p50, "
          f"{mesh['p99'] / ha['p99']:.2f}x p99, {mesh['cpu_us'] / ha['cpu_us']:.2f}x CPU per request")
    return 0


def run(lab, args) -> list[dict]:
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
    make_certs(d)
    port = server.port
    with open(os.path.join(d, "upstream.cfg"), "w") as f:
        f.write(UPSTREAM_CFG.format(port=port))
    node1, node2 = lab.topo.nodes["node1"], lab.topo.nodes["node2"]
    edge_listen = f"{node1.gateway}:18080"
    with open(os.path.join(d, "edge.cfg"), "w") as f:
        f.write(EDGE_CFG.format(listen=edge_listen, server=f"{node2.link_address}:18443", dir=d))
    with open(os.path.join(d, "ingress.cfg"), "w") as f:
        f.write(INGRESS_CFG.format(listen=f"{node2.link_address}:18443", server=f"{lab.pods['plainserver'].ip}:{port}",
                                   dir=d))
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
    results = []
    for name, pod, url, host, pids in paths:
        base = ["wrk", "-t1", f"-c{args.connections}", "--latency"]
        if host:
            base += ["-H", f"Host: {host}"]
        warm = parse_wrk(lab.exec(pod, base + [f"-d{args.warmup}s", url], timeout=args.warmup + 30, check=True).stdout)
        before = sum(cpu_seconds(pid) for pid in pids)
        out = lab.exec(pod, base + [f"-d{args.duration}s", url], timeout=args.duration + 30, check=True).stdout
        spent = sum(cpu_seconds(pid) for pid in pids) - before
        r = parse_wrk(out)
        r["cpu_us"] = spent * 1e6 / max(1, r["requests"])
        r["name"] = name
        r["warmup_requests"] = warm["requests"]
        if pod == "client":
            r["mtls"] = lab.count("node2", "istio_requests_total", reporter="destination",
                                  destination_workload="catalog-v2", response_code="200",
                                  connection_security_policy="mutual_tls")
        results.append(r)
        print(f"  measured {name}: {r['rps']:.0f} req/s", flush=True)
        time.sleep(0.5)
    return results


if __name__ == "__main__":
    sys.exit(main())
