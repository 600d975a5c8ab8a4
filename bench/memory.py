"""`python -m bench memory`: the agent's memory and enroll latency with N pods (root).

Makes N network namespaces (loopback only, nothing routed), starts one
`nodeagent run` on the embedded default config, enrolls every namespace as a
pod through the agent's socket, and prints Rss/Pss/private/anonymous memory of
the agent at start and with N pods (from /proc/PID/smaps_rollup) and the
enroll round trip p50/p95. Everything it made is removed at the end.

It also measures the floor: a process of the same interpreter that only
imports and uses the agent's dependencies (FLOOR), so that the part of the
figure that is nodeagent's own is printed beside the total.

The agent runs on compiled bytecode, as an installed agent does: a module
whose .pyc is missing or stale (a source edited since, with
PYTHONDONTWRITEBYTECODE set) is compiled at import, and the compiler's
memory stays in the heap (policy/validate.py alone: +4.6 MiB), so figures
would depend on which files were edited last. The bytecode goes to a private
PYTHONPYCACHEPREFIX (nothing is written in the tree), filled before the run
by importing the agent's modules; any module still compiled during the run
is named.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import free_port

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous")
# What `nodeagent run` imports (start-up and the first enrollments), compiled before the run.
WARM_UP = ("import nodeagent.cli as cli; cli.build_parser(); "
           "import nodeagent.agent.agent, nodeagent.agent.capture, nodeagent.agent.netfilter, "
           "nodeagent.proxy.server, redirect.libnft, concurrent.futures.thread, uvloop, encodings.idna, "
           "cryptography.hazmat.backends.openssl.backend")

# The floor: the interpreter with only the libraries `nodeagent run` cannot do without (the
# project's dependencies), each used once as the agent uses it (an event loop, a TLS context,
# an EC key), and no nodeagent code. What the agent has above it is nodeagent's own.
FLOOR = ("import asyncio, ctypes, ssl, httptools, prometheus_client, uvloop, yaml; "
         "from cryptography import x509; from cryptography.hazmat.primitives.asymmetric import ec; "
         "ec.generate_private_key(ec.SECP256R1()); loop = uvloop.new_event_loop(); "
         "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); "
         "import os; print(open(f'/proc/{os.getpid()}/smaps_rollup').read())")


def floor_rss(env: dict) -> float:
    """Rss (MiB) of a process that only imports and uses the agent's dependencies (FLOOR)."""
    out = subprocess.run([sys.executable, "-c", FLOOR], cwd=REPO, env=env, check=True, timeout=60,
                         capture_output=True, text=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith("Rss:")) / 1024


def rss(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:")) / 1024


def memory(pid: int) -> str:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split(":")[0] in FIELDS}
    private = kib["Private_Clean"] + kib["Private_Dirty"]
    return (f"Rss {kib['Rss'] / 1024:.1f}  Pss {kib['Pss'] / 1024:.1f}  private {private / 1024:.1f}  "
            f"anon {kib['Anonymous'] / 1024:.1f} MiB")


def mappings(pid: int, top: int = 16) -> str:
    """Rss per mapped file ([heap], [anon], the .so files) from /proc/PID/smaps, largest first."""
    rss: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if not first.endswith(":"):  # a mapping's header: ADDR PERMS OFFSET DEV INODE [PATH]
                fields = line.split(None, 5)
                name = os.path.basename(fields[5].strip()) if len(fields) > 5 else "[anon]"
            elif first == "Rss:":
                rss[name] = rss.get(name, 0) + int(line.split()[1])
    ranked = sorted(rss.items(), key=lambda kv: -kv[1])
    return "\n".join(f"    {kib / 1024:6.2f} MiB  {name}" for name, kib in ranked[:top] if kib)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=100, help="pods to enroll (default 100)")
    p.add_argument("--service-accounts", type=int, default=0, metavar="N",
                   help="spread the pods over N service accounts (default: one per pod); each distinct "
                        "account has its own identity: key, certificate, TLS contexts")
    p.add_argument("--capture", choices=("nftables", "iptables", "ebpf", "none"), default="nftables")
    p.add_argument("--breakdown", action="store_true", help="also print Rss per mapping (heap, anon, each .so)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench memory: needs root (network namespaces, capture rules)", file=sys.stderr)
        return 1
    if args.service_accounts < 0:
        p.error("--service-accounts must be 0 (one per pod) or more")
    accounts = args.service_accounts or args.pods
    sys.path.insert(0, str(REPO))
    from nodeagent.agent.server import AgentClient, AgentNotRunning

    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-memory-"))
    tag = secrets.token_hex(2)
    names = [f"bm{tag}-{i}" for i in range(args.pods)]
    made: list[str] = []
    agent = None
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=5)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=5)
        pycache = tmp / "pycache"
        env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-c", WARM_UP], cwd=REPO, env=env, check=True, timeout=120)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "nodeagent", "policy", "redirect"],
                       cwd=REPO, env=env, check=True, timeout=120, stdout=subprocess.DEVNULL)
        compiled_before = set(pycache.rglob("*.pyc"))
        ready = free_port()
        extra = ["--bpf-pin-dir", f"/sys/fs/bpf/nodeagent-bench-{tag}"] if args.capture == "ebpf" else []
        agent = subprocess.Popen(
            [sys.executable, "-m", "nodeagent", "run", "--node", "bench", "--state-dir", str(tmp / "state"),
             "--capture", args.capture, "--admin", f"127.0.0.1:{free_port()}",
             "--metrics", f"127.0.0.1:{free_port()}", "--readiness", f"127.0.0.1:{ready}",
             "--config-dir", str(REPO / "nodeagent" / "defaults"), *extra],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "w"))
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ready}/healthz/ready", timeout=0.5)
                break
            except OSError:
                if agent.poll() is not None or time.monotonic() > deadline:
                    print(f"bench memory: the agent did not become ready; see {tmp / 'agent.log'}",
                          file=sys.stderr)
                    return 1
                time.sleep(0.05)
        time.sleep(2)   # as after the pods: start-up's last work done, its free memory returned
        start = rss(agent.pid)
        print(f"agent ready, 0 pods:     {memory(agent.pid)}")
        if args.breakdown:
            print(mappings(agent.pid))
        client = AgentClient(tmp / "state" / "agent.sock")
        took = []
        phases = []  # the agent's own (registry, capture, certificate wait) ms per enroll
        for i, name in enumerate(names):
            started = time.perf_counter()
            try:
                reply = client.call({"op": "enroll", "kind": "netns", "target": name, "name": f"w{i}",
                                     "namespace": "bench", "service_account": f"sa{i % accounts}", "labels": {"app": f"w{i}"},
                                     "ips": [f"10.250.{200 + i // 250}.{i % 250 + 1}"]})
            except (OSError, AgentNotRunning) as exc:  # the agent died or closed the socket
                reply = {"ok": False, "error": str(exc)}
            took.append((time.perf_counter() - started) * 1000)
            if reply.get("ok"):
                reg, cap = reply["registry_ms"], reply["capture_ms"]
                phases.append((reg, cap, reply["elapsed_ms"] - reg - cap))
            if not reply.get("ok"):
                print(f"bench memory: enroll {name}: {reply}", file=sys.stderr)
                tail = (tmp / "agent.log").read_text(errors="replace").splitlines()[-15:]
                print("the agent's last log lines:\n  " + "\n  ".join(tail), file=sys.stderr)
                return 1
        time.sleep(2)   # certificates issued, listeners up, arenas settled
        took.sort()
        print(f"{args.pods} pods ({args.capture}, {min(accounts, args.pods)} service accounts): "
              f"{memory(agent.pid)}")
        if args.breakdown:
            print(mappings(agent.pid))
        floor = floor_rss(env)
        print(f"the dependencies alone (python, asyncio, ssl, uvloop, httptools, PyYAML, ctypes, "
              f"prometheus_client, cryptography; no nodeagent code): Rss {floor:.1f} MiB; nodeagent's own "
              f"share: {start - floor:.1f} MiB at start, {rss(agent.pid) - floor:.1f} MiB with {args.pods} pods")
        print(f"enroll round trip: p50 {took[len(took) // 2]:.1f} ms, p95 {took[int(len(took) * 0.95) - 1]:.1f} ms")
        for k, what in enumerate(("registry (persisted)", "capture (netns listeners, rules)",
                                  "certificate wait")):
            col = sorted(p[k] for p in phases)
            print(f"  in the agent, {what}: p50 {col[len(col) // 2]:.1f} ms, p95 {col[int(len(col) * 0.95) - 1]:.1f} ms")
        late = sorted(str(path.relative_to(pycache)) for path in set(pycache.rglob("*.pyc")) - compiled_before)
        if late:
            print(f"compiled during the run (add them to WARM_UP): {', '.join(late)}")
        return 0
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        subprocess.run([sys.executable, "-m", "nodeagent", "uninstall", "--state-dir", str(tmp / "state")],
                       cwd=REPO, capture_output=True, timeout=60)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
