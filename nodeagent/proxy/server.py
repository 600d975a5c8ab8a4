"""Listeners and worker processes.

``serve_worker`` runs one event loop (uvloop when installed) with the
listeners of a ``ProxyConfig``. ``run`` starts N such workers as processes
sharing each listening port with SO_REUSEPORT (the kernel spreads accepted
connections), serves /metrics from the parent by merging the workers'
counters at scrape time, and stops everything cleanly on SIGTERM/SIGINT. With
several workers, outlier detection and connection-pool limits stay per cluster
(not per worker): ``nodeagent.proxy.shared``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.proxy import shared
from nodeagent.proxy.context import ListenerContext
from nodeagent.proxy.http import HttpDownstream
from nodeagent.proxy.runtime import Limits, ProxyRuntime
from nodeagent.proxy.tcp import DispatchProtocol
from nodeagent.telemetry import AccessLog, IstioCollector, Telemetry, merge_exports

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerSpec:
    """A listener: where, and the context its connections get.

    ``sock``: an already bound socket (e.g. bound inside a pod's network
    namespace by setns in a thread); workers then share it instead of binding
    their own SO_REUSEPORT sockets.
    """

    address: tuple[str, int]
    context: ListenerContext
    sock: socket.socket | None = None


@dataclass
class ProxyConfig:
    listeners: list[ListenerSpec]
    snapshots: Callable[[], object]  # returns the current ConfigSnapshot
    workers: int = 1
    metrics: tuple[str, int] | None = None
    access_log: bool = False
    limits: Limits = field(default_factory=Limits)
    on_ready: Callable[[list[tuple[str, int]], tuple[str, int] | None], None] | None = None
    start_watch: Callable[[asyncio.AbstractEventLoop], object] | None = None  # per worker


def bind_socket(address: tuple[str, int], reuse_port: bool) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def protocol_factory(runtime: ProxyRuntime, ctx: ListenerContext):
    if ctx.fixed_destination is None and ctx.original_destination is None:
        return lambda: HttpDownstream(runtime, ctx)
    return lambda: DispatchProtocol(runtime, ctx)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _worker_main(config: ProxyConfig, sockets: list[socket.socket], control: socket.socket | None,
                       ready: Callable[[ProxyRuntime], None] | None, link=None) -> None:
    loop = asyncio.get_running_loop()
    telemetry = Telemetry()
    runtime = ProxyRuntime(config.snapshots, telemetry, config.limits,
                           AccessLog() if config.access_log else None)
    if link is not None:
        # Several workers: outlier detection and pool limits are counted per cluster
        # across all of them (nodeagent.proxy.shared).
        runtime.cluster_class = link.cluster_state
        link.start(loop)
    runtime.start()
    watch = config.start_watch(loop) if config.start_watch is not None else None
    servers = []
    for spec, sock in zip(config.listeners, sockets):
        sock.listen(1024)
        sock.setblocking(False)
        servers.append(await loop.create_server(protocol_factory(runtime, spec.context), sock=sock, backlog=1024))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if control is not None:
        control.sendall(b"R")  # listeners are open: the parent may announce readiness
        control.setblocking(False)

        def answer() -> None:
            try:
                req = control.recv(1)
            except BlockingIOError:
                return
            if not req:
                stop.set()
                loop.remove_reader(control.fileno())
                return
            payload = pickle.dumps(telemetry.export())
            control.setblocking(True)
            control.sendall(struct.pack("!I", len(payload)) + payload)
            control.setblocking(False)

        loop.add_reader(control.fileno(), answer)
    if ready is not None:
        ready(runtime)
    await stop.wait()
    for server in servers:
        server.close()
    await runtime.close()
    if link is not None:
        link.close()
    if watch is not None and hasattr(watch, "cancel"):
        watch.cancel()


def _start_metrics(address: tuple[str, int], source) -> tuple[object, tuple[str, int]]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(IstioCollector(source))
    server, thread = start_http_server(address[1], addr=address[0], registry=registry)
    return server, server.server_address[:2]


def run(config: ProxyConfig) -> int:
    """Run the proxy until SIGTERM/SIGINT. Returns an exit code."""
    workers = max(1, config.workers)
    sockets = [spec.sock or bind_socket(spec.address, reuse_port=workers > 1) for spec in config.listeners]
    bound = [s.getsockname()[:2] for s in sockets]
    if workers == 1:
        return _run_single(config, sockets, bound)
    return _run_multi(config, sockets, bound, workers)


def _run_single(config, sockets, bound) -> int:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    metrics_server = None
    metrics_addr = None
    holder: dict = {}
    if config.metrics is not None:
        metrics_server, metrics_addr = _start_metrics(
            config.metrics, lambda: merge_exports([loop_export(holder)]))

    def ready(runtime) -> None:
        holder["telemetry"] = runtime.telemetry
        if config.on_ready:
            config.on_ready(bound, metrics_addr)

    try:
        loop.run_until_complete(_worker_main(config, sockets, None, ready))
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        loop.close()
    return 0


def loop_export(holder) -> dict:
    telemetry = holder.get("telemetry")
    return telemetry.export() if telemetry is not None else {"http": {}, "tcp": {}}


def _run_multi(config, sockets, bound, workers) -> int:
    # Each worker binds its own SO_REUSEPORT socket on the same (now known) port;
    # the parent keeps its bound-but-not-listening sockets only to hold the ports.
    children: list[tuple[int, socket.socket]] = []
    # Cluster-wide outlier detection (a hub in this process) and pool counters (shared memory).
    counters = shared.PoolCounters(workers)
    links = [socket.socketpair() for _ in range(workers)]
    for index in range(workers):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            for _, other in children:
                other.close()
            for i, (hub_end, worker_end) in enumerate(links):
                hub_end.close()
                if i != index:
                    worker_end.close()
            code = 0
            try:
                own = []
                for spec, s, addr in zip(config.listeners, sockets, bound):
                    if spec.sock is not None:
                        own.append(s)  # pre-bound: every worker accepts on the same socket
                    else:
                        s.close()
                        own.append(bind_socket(addr, reuse_port=True))
                loop = new_event_loop()
                asyncio.set_event_loop(loop)
                link = shared.WorkerLink(links[index][1], counters, index)
                loop.run_until_complete(_worker_main(config, own, child_end, None, link))
            except BaseException:  # a worker must never fall back into the parent's code
                log.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        child_end.close()
        children.append((pid, parent_end))
    for _, worker_end in links:
        worker_end.close()
    hub = shared.OutlierHub([hub_end for hub_end, _ in links])
    hub.start()
    for pid, conn in children:
        conn.settimeout(30.0)
        try:
            started = conn.recv(1) == b"R"
        except OSError:
            started = False
        if not started:
            for other, _ in children:
                _kill(other)
            for _ in children:
                os.wait()
            log.error("worker %d failed to start", pid)
            hub.stop()
            return 1
    lock = threading.Lock()

    def gather() -> dict:
        exports = []
        with lock:
            for _, conn in children:
                try:
                    conn.settimeout(2.0)
                    conn.sendall(b"?")
                    size = struct.unpack("!I", _recv_exact(conn, 4))[0]
                    exports.append(pickle.loads(_recv_exact(conn, size)))
                except (OSError, struct.error, EOFError):
                    continue
        return merge_exports(exports)

    metrics_server = None
    metrics_addr = None
    if config.metrics is not None:
        metrics_server, metrics_addr = _start_metrics(config.metrics, gather)
    stopping = threading.Event()

    def forward(signum, frame) -> None:
        stopping.set()
        for pid, _ in children:
            _kill(pid)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if config.on_ready:
        config.on_ready(bound, metrics_addr)
    code = 0
    remaining = {pid for pid, _ in children}
    while remaining:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        remaining.discard(pid)
        pids = [p for p, _ in children]
        if pid in pids:
            counters.clear_worker(pids.index(pid))  # its connections are gone with it
        if os.waitstatus_to_exitcode(status) != 0 and not stopping.is_set():
            code = 1
            log.error("worker %d exited with status %d; stopping the others", pid, os.waitstatus_to_exitcode(status))
            forward(signal.SIGTERM, None)
    if metrics_server is not None:
        metrics_server.shutdown()
    hub.stop()
    for hub_end, _ in links:
        hub_end.close()
    for s in sockets:
        s.close()
    return code


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise EOFError("worker closed its control socket")
        buf += part
    return bytes(buf)
