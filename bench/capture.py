"""`python -m bench capture`: the cost of each capture mode on the same path (root).

One node, two pods (redirect.topology): ``client`` and ``server``. The server
pod runs HAProxy answering ``200 ok`` itself on :80 (fast, not Python-bound).
In the client pod, in the proxy's position, runs a MINIMAL PYTHON TCP RELAY
(uvloop, this module's ``relay`` command: accept on 0.0.0.0:15001, read the
original destination with SO_ORIGINAL_DST, connect there with mark 0x539,
copy bytes both ways) - not the agent, whose routing, telemetry and mTLS
would drown the capture's share. The client dials the server pod's address;
the capture modes compared (outbound, then inbound):

- ``direct``: no capture, no relay (the floor);
- ``nftables``: the in-pod plan of redirect/ (nat output REDIRECT to :15001);
- ``ebpf``: bpf/ connect4 rewrite + getsockopt hook, fast path off;
- ``ebpf+fast``: the same with the sk_msg same-node fast path on;
- ``nftables-in``: inbound instead - the relay sits in the SERVER pod on
  :15006, fed by the in-pod plan's prerouting REDIRECT;
- ``ebpf-in``: the same fed by the sk_lookup program (bpf/inbound.py), the
  listener registered in the in_listen map (the bench opens it in the server
  pod and hands it to the relay).

Measured per mode, from inside the client pod: connection setup rate (a
bounded loop of connect + one HTTP request + close, one at a time, new
connections per second, and the CPU microseconds per connection of that
client thread plus the relay) and requests per second with keep-alive
(Debian's wrk, -t1). Also the relay's CPU microseconds per request
(utime+stime from /proc over the wrk run). CPU figures are less disturbed
by a busy machine than rates. Modes alternate for ``--rounds`` rounds; each
mode's best run is kept (a shared machine only ever makes a run slower).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds, missing_tool, upstream_cfg, wrk

REPO = Path(__file__).resolve().parent.parent
RELAY_PORT = 15001
INBOUND_PORT = 15006
PROXY_MARK = 0x539
MODES = ("direct", "nftables", "ebpf", "ebpf+fast", "nftables-in", "ebpf-in")

SERVER_CFG = upstream_cfg("0.0.0.0:80")


# ---- the relay (runs inside the client pod) -----------------------------------------


class _Upstream(asyncio.Protocol):
    def __init__(self, down: asyncio.Transport) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.write(data)

    def connection_lost(self, exc) -> None:
        self.down.close()


class _Downstream(asyncio.Protocol):
    """One captured connection: original destination, marked upstream, bytes both ways.

    No flow control: a benchmark relay for small requests and answers.
    """
    accepted = 0

    def connection_made(self, transport) -> None:
        from bpf.origdst import so_original_dst

        _Downstream.accepted += 1
        self.t, self.up, self.pending, self.closed = transport, None, [], False
        dst = so_original_dst(transport.get_extra_info("socket"))
        if dst is None:
            transport.abort()
            return
        asyncio.ensure_future(self._connect(dst))

    async def _connect(self, dst) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, dst)
            up, _ = await loop.create_connection(lambda: _Upstream(self.t), sock=sock)
        except OSError:
            sock.close()
            self.t.abort()
            return
        self.up = up
        for data in self.pending:
            up.write(data)
        self.pending = []
        if self.closed:
            up.close()

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.up is not None:
            self.up.close()


def relay_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capture relay")
    p.add_argument("--port", type=int, default=RELAY_PORT)
    p.add_argument("--stats", required=True, help="file the accepted count is written to on SIGUSR1")
    p.add_argument("--fd", type=int, help="serve this inherited listening socket instead of binding --port")
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        if args.fd is not None:
            sock = socket.socket(fileno=args.fd)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", args.port))
            sock.listen(1024)
        server = await loop.create_server(_Downstream, sock=sock, backlog=1024)

        def dump() -> None:
            Path(args.stats + ".tmp").write_text(str(_Downstream.accepted))
            os.replace(args.stats + ".tmp", args.stats)

        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, dump)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        dump()
        await stop.wait()
        server.close()

    asyncio.run(serve())
    return 0


# ---- the bench ----------------------------------------------------------------------


def setup_rate(netns: str, addr: tuple[str, int], seconds: float, limit: int) -> tuple[float, int, int, float]:
    """(new connections per second, completed, failed, CPU seconds of the client thread):
    connect + GET + read to close, one at a time."""
    from bpf.netns import run_in_netns

    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"

    def loop() -> tuple[float, int, int, float]:
        done = failed = 0
        cpu = time.thread_time()
        started = time.perf_counter()
        deadline = started + seconds
        while done + failed < limit and time.perf_counter() < deadline:
            try:
                with socket.create_connection(addr, timeout=5) as sock:
                    sock.sendall(request)
                    answer = b""
                    while chunk := sock.recv(4096):
                        answer += chunk
                if answer.startswith(b"HTTP/1.1 200"):
                    done += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
        return done / (time.perf_counter() - started), done, failed, time.thread_time() - cpu

    return run_in_netns(f"/run/netns/{netns}", loop)


def wrk_in_pod(topo, pod: str, url: str, seconds: float, connections: int) -> dict:
    return wrk(url, seconds, connections, who="bench capture",
               run=lambda argv, timeout: topo.exec(pod, argv, timeout=timeout).stdout)


class Relay:
    """One relay process in a pod; counts the connections it accepted (SIGUSR1 -> stats file)."""

    def __init__(self, bench: "Bench", pod: str, listener: socket.socket | None) -> None:
        self.stats = str(bench.tmp / f"relay-{pod}.stats")
        argv = [sys.executable, "-m", "bench.capture", "relay", "--stats", self.stats]
        kwargs = {}
        if listener is not None:   # a listener the bench opened in the pod (registered for sk_lookup)
            argv += ["--fd", str(listener.fileno())]
            kwargs["pass_fds"] = (listener.fileno(),)
        self.proc = bench.topo.spawn(pod, argv, cwd=str(REPO), stderr=subprocess.DEVNULL, **kwargs)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.stats):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"bench capture: the relay in pod {pod} did not start")
            time.sleep(0.05)

    def accepted(self) -> int:
        before = os.stat(self.stats).st_mtime_ns
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while os.stat(self.stats).st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return int(Path(self.stats).read_text())

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-capture-"))
        self.pin_dir = f"/sys/fs/bpf/nodeagent-bench-{secrets.token_hex(3)}"
        self.topo = None
        self.relays: dict[str, Relay] = {}
        self.ebpf = None
        self.inbound_listener: socket.socket | None = None

    def build(self) -> None:
        from bpf.netns import run_in_netns
        from redirect.topology import Topology

        self.topo = Topology(timeout=10.0)
        self.topo.add_node("n1")
        self.client = self.topo.add_pod("n1", "client")
        self.server = self.topo.add_pod("n1", "server")
        (self.tmp / "server.cfg").write_text(SERVER_CFG)
        self.topo.spawn("server", ["haproxy", "-db", "-f", str(self.tmp / "server.cfg")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.relays["client"] = Relay(self, "client", None)          # outbound: 0.0.0.0:15001 in the client

        def inbound_listener() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", INBOUND_PORT))
            sock.listen(1024)
            return sock
        self.inbound_listener = run_in_netns(f"/run/netns/{self.server.netns}", inbound_listener)
        self.relays["server"] = Relay(self, "server", self.inbound_listener)   # inbound: 15006 in the server
        deadline = time.monotonic() + 15
        while setup_rate(self.client.netns, (self.server.ip, 80), 1.0, 1)[1] != 1:
            if time.monotonic() > deadline:
                raise SystemExit("bench capture: the server pod does not answer")
            time.sleep(0.1)

    @staticmethod
    def pod_of(mode: str) -> str | None:
        """Which pod's relay a mode goes through (None: direct)."""
        return None if mode == "direct" else "server" if mode.endswith("-in") else "client"

    def capture(self, mode: str, on: bool) -> None:
        from redirect import CaptureConfig, apply, cleanup, in_pod_plan

        pod = self.pod_of(mode)
        if pod is None:
            return
        path = f"/run/netns/{self.topo.netns(pod)}"
        if mode.startswith("nftables"):
            # the in-pod plan captures both directions; only one is used per mode
            apply(in_pod_plan(CaptureConfig(ipv6=False)), path, "nft") if on else cleanup(path)
            return
        if self.ebpf is None:
            from bpf.loader import EbpfCapture

            self.ebpf = EbpfCapture(self.pin_dir)
            self.ebpf.start()
        if not on:
            self.ebpf.unenroll_netns(path)
        elif mode == "ebpf-in":
            self.ebpf.enroll_inbound(path, [self.inbound_listener])
        else:
            self.ebpf.enroll_netns(path, RELAY_PORT, fast_path=mode == "ebpf+fast")

    def run_mode(self, mode: str) -> dict:
        addr = (self.server.ip, 80)
        pod = self.pod_of(mode)
        relay = self.relays.get(pod)
        self.capture(mode, True)
        try:
            before = {name: r.accepted() for name, r in self.relays.items()}
            relay_cpu = relay.cpu() if relay else 0.0
            rate, done, failed, client_cpu = setup_rate(self.client.netns, addr, self.args.setup_seconds,
                                                        self.args.setup_limit)
            setup_cpu = (client_cpu + (relay.cpu() - relay_cpu if relay else 0.0)) * 1e6 / max(1, done)
            for name, r in self.relays.items():   # each mode really goes through its relay, and only that
                relayed, want = r.accepted() - before[name], done + failed if name == pod else 0
                if relayed != want:
                    raise SystemExit(f"bench capture: mode {mode}: the {name} relay took {relayed} of "
                                     f"{done + failed} connections, expected {want}")
            url = f"http://{self.server.ip}:80/"
            wrk_in_pod(self.topo, "client", url, 1, self.args.connections)   # warm-up
            cpu = relay.cpu() if relay else 0.0
            res = wrk_in_pod(self.topo, "client", url, self.args.duration, self.args.connections)
            res["cpu_us"] = (relay.cpu() - cpu) * 1e6 / max(1, res["requests"]) if relay else None
        finally:
            self.capture(mode, False)
        res.update(mode=mode, setup=rate, setup_cpu=setup_cpu, setup_done=done, setup_failed=failed)
        return res

    def close(self) -> None:
        for relay in self.relays.values():
            relay.stop()
        if self.inbound_listener is not None:
            self.inbound_listener.close()
        if self.ebpf is not None:
            self.ebpf.cleanup()
        if self.topo is not None:
            self.topo.teardown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench capture", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; best run per mode (default 2)")
    p.add_argument("--setup-seconds", type=float, default=3.0, help="time bound of the setup loop (default 3)")
    p.add_argument("--setup-limit", type=int, default=5000, help="connection bound of the setup loop (default 5000)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per mode (default 5)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        print(f"bench capture: unknown mode(s) {unknown}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench capture: needs root (network namespaces, nftables, eBPF)", file=sys.stderr)
        return 1
    tool = missing_tool(("wrk", "haproxy", "nft", "nsenter"))
    if tool:
        print(f"bench capture: {tool} is not installed (make setup installs it)", file=sys.stderr)
        return 1
    if any(m.startswith("ebpf") for m in modes):
        from bpf.loader import unavailable_reason
        reason = unavailable_reason()
        if reason:
            print(f"bench capture: eBPF unavailable: {reason}; run with --modes direct,nftables", file=sys.stderr)
            return 1
    bench = Bench(args)
    best: dict[str, dict] = {}
    try:
        bench.build()
        for _ in range(max(1, args.rounds)):
            for mode in modes:
                res = bench.run_mode(mode)
                old = best.get(mode)
                if old is None or res["rps"] > old["rps"]:
                    best[mode] = dict(res)
                if old is not None:   # each figure's best run: highest rate, lowest CPU
                    best[mode]["setup"] = max(res["setup"], old["setup"])
                    best[mode]["setup_cpu"] = min(res["setup_cpu"], old["setup_cpu"])
    finally:
        bench.close()
    print(f"client pod -> [capture] -> Python relay (uvloop; in the client pod, *-in: in the server pod) -> "
          f"HAProxy in the server pod; "
          f"setup loop <= {args.setup_seconds:g}s/{args.setup_limit} conns, wrk -t1 -c{args.connections} "
          f"{args.duration:g}s; best of {args.rounds} alternating rounds")
    print(f"{'mode':<12}{'setup conn/s':>14}{'CPU us/conn':>13}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'relay CPU us/req':>18}{'errors':>8}")
    for mode in modes:
        r = best[mode]
        cpu = f"{r['cpu_us']:.1f}" if r["cpu_us"] is not None else "-"
        print(f"{mode:<12}{r['setup']:>14.0f}{r['setup_cpu']:>13.1f}{r['rps']:>10.0f}{r['p50']:>9.2f}"
              f"{r['p99']:>9.2f}{cpu:>18}{r['errors'] + r['setup_failed']:>8}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        sys.exit(relay_main(sys.argv[2:]))
    sys.exit(main())
