"""Cluster-wide outlier detection and connection-pool limits across worker processes.

Envoy counts a cluster's consecutive errors and its circuit breakers once per
cluster, whatever thread served the request. With ``--workers N > 1`` each of our
workers has its own ``ClusterState``; this module makes the two counts global
again (see docs/proxy.md, "Workers share outlier detection and pool limits"):

- outlier detection: the parent process runs the one pure
  ``policy.outlier.OutlierDetector`` per cluster (``OutlierHub``, a thread) and its
  sweep. A worker reports an upstream result only when it can change something:
  every error, and a success of an endpoint the parent marked *watched* (a
  consecutive-error counter is non-zero). An error report waits for the parent's
  answer; the parent broadcasts the cluster's ejected and watched sets to every
  worker before it answers, so the request that ejects an endpoint has every
  worker excluding it before its response leaves. Healthy traffic never talks to
  the parent.
- connection-pool limits: an anonymous shared mmap (``PoolCounters``) with one row
  per cluster (by name hash) and three cells per worker (open connections,
  pending requests, outstanding retries). Each worker writes only its own cells; a
  limit is checked against the sum of the row (N reads, no lock). Like Envoy's, the check and the
  increment are not one atomic step. A worker with no connection of its own to
  the cluster may always open one (Envoy's per-thread pool rule, which keeps a
  pending request from waiting on another worker's connection it can never use).

With one worker none of this is used and nothing changes.
"""
from __future__ import annotations

import logging
import mmap
import pickle
import selectors
import socket
import struct
import threading
import time
import zlib

from policy import outlier as outlier_mod

from nodeagent.proxy.runtime import ClusterState
from nodeagent.proxy.upstream import ClusterPool, PoolLimits, UNLIMITED

log = logging.getLogger(__name__)

ROWS = 4096  # clusters hash into this many counter rows (a collision shares a row)
REPORT_TIMEOUT = 1.0  # seconds a worker waits for the parent's answer to an error report
_LEN = struct.Struct("!I")
CELLS = 3  # per worker and row: open connections, pending requests, outstanding retries


def cluster_id(key, source_namespace) -> str:
    """The name a cluster has in every worker and in the parent."""
    return repr((key, source_namespace))


def _frame(msg) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def _frames(buf: bytearray) -> list:
    out = []
    while len(buf) >= 4:
        size = _LEN.unpack_from(buf)[0]
        if len(buf) < 4 + size:
            break
        out.append(pickle.loads(bytes(buf[4:4 + size])))
        del buf[:4 + size]
    return out


# --- connection-pool limits ---------------------------------------------------------


class PoolCounters:
    """Shared int64 cells: ROWS rows x workers x (open connections, pending requests,
    outstanding retries).

    Created by the parent before it forks (an anonymous MAP_SHARED mapping is
    shared with the children)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.map = mmap.mmap(-1, ROWS * workers * CELLS * 8)
        self.cells = memoryview(self.map).cast("q")

    def row(self, cid: str) -> int:
        return zlib.crc32(cid.encode()) % ROWS

    def clear_worker(self, worker: int) -> None:
        """A worker is gone: its cells no longer count."""
        cells = self.cells
        for row in range(ROWS):
            i = (row * self.workers + worker) * CELLS
            cells[i] = 0
            cells[i + 1] = 0
            cells[i + 2] = 0


class SharedPool(ClusterPool):
    """A ClusterPool whose maxConnections / http1MaxPendingRequests count every worker."""

    __slots__ = ("cells", "base", "mine", "width")

    def __init__(self, key, limits: PoolLimits, connector, counters: PoolCounters, row: int, worker: int) -> None:
        super().__init__(key, limits, connector)
        self.cells = counters.cells
        self.width = CELLS * counters.workers
        self.base = row * self.width
        self.mine = self.base + CELLS * worker

    def _publish(self) -> None:
        cells = self.cells
        i = self.mine
        cells[i] = self.open
        cells[i + 1] = len(self.pending)

    def _may_connect(self) -> bool:
        if self.open == 0:
            return True  # Envoy: a pool with no connection always creates one
        limit = self.limits.max_connections
        if limit >= UNLIMITED:
            return True
        base = self.base
        return sum(self.cells[base:base + self.width:CELLS]) < limit

    def _may_queue(self) -> bool:
        limit = self.limits.max_pending
        if limit >= UNLIMITED:
            return True
        base = self.base + 1
        return sum(self.cells[base:base + self.width:CELLS]) < limit

    def acquire(self, exchange, endpoint: tuple[str, int]) -> str | None:
        idle = self.idle.get(endpoint)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                exchange.upstream_ready(conn)
                return None
        if self._may_connect():
            self._connect(exchange, endpoint)
            return None
        if self._may_queue():
            self.pending.append((exchange, endpoint))
            self._publish()
            return None
        return "UO"

    def cancel(self, exchange) -> None:
        super().cancel(exchange)
        self._publish()

    def _connect(self, exchange, endpoint) -> None:
        super()._connect(exchange, endpoint)
        self._publish()

    async def _open(self, exchange, endpoint) -> None:
        try:
            await super()._open(exchange, endpoint)
        finally:
            self._publish()

    def release(self, conn, reusable: bool) -> None:
        super().release(conn, reusable)
        self._publish()

    def _connect_counted(self, exchange, endpoint) -> None:
        if self._may_connect():
            self._connect(exchange, endpoint)
        else:
            self.pending.appendleft((exchange, endpoint))
            self._publish()

    def connection_closed(self, conn) -> None:
        super().connection_closed(conn)
        self._publish()

    def _serve_pending(self) -> None:
        while self.pending and self._may_connect():
            exchange, endpoint = self.pending.popleft()
            if not exchange.abandoned:
                self._connect(exchange, endpoint)
        self._publish()


# --- outlier detection: worker side ------------------------------------------------


class SharedClusterState(ClusterState):
    """A worker's ClusterState whose outlier decisions are the parent's."""

    __slots__ = ("link", "cid", "watched")

    def __init__(self, link: "WorkerLink", key, source_namespace, connector, rand) -> None:
        super().__init__(key, source_namespace, connector, rand)
        self.link = link
        self.cid = cluster_id(key, source_namespace)
        self.watched = frozenset()
        counters = link.counters
        self.pool = SharedPool(key, PoolLimits(), connector, counters, counters.row(self.cid), link.worker)
        link.register(self)

    def refresh(self, snapshot, now: float) -> None:
        super().refresh(snapshot, now)
        self.link.configure(self)

    def retry_begin(self) -> bool:
        """ClusterState.retry_begin against the retries outstanding in every worker (the
        row's third cells), as Envoy's one retry circuit breaker per cluster."""
        pool = self.pool
        limit = self.max_retries
        if limit < UNLIMITED:
            base = pool.base + 2
            if sum(pool.cells[base:base + pool.width:CELLS]) >= limit:
                return False
        self.retries += 1
        pool.cells[pool.mine + 2] = self.retries
        return True

    def retry_end(self) -> None:
        if self.retries > 0:
            self.retries -= 1
            pool = self.pool
            pool.cells[pool.mine + 2] = self.retries

    def record(self, endpoint, status: int, now: float) -> None:
        if self.outlier is None or endpoint is None:
            return
        eid = endpoint.id
        if 0 < status < 500:
            if eid in self.watched:  # it resets a non-zero counter in the parent
                self.link.report(self.cid, eid, status, wait=False)
            return
        # An error of an endpoint this worker already excludes comes from a request
        # picked before the ejection: the parent is told, nobody needs to wait.
        self.link.report(self.cid, eid, status, wait=eid not in self.ejected)

    def sweep(self, now: float) -> None:
        self.pool.sweep(now)  # the outlier sweep runs in the parent


class WorkerLink:
    """A worker's end of the outlier channel to the parent."""

    def __init__(self, sock: socket.socket, counters: PoolCounters, worker: int) -> None:
        self.sock = sock
        self.counters = counters
        self.worker = worker
        self.buf = bytearray()
        self.states: dict[str, list] = {}
        self.known: dict[str, tuple[frozenset, frozenset]] = {}
        self.sent: dict[str, tuple] = {}
        self.seq = 0
        self.loop = None

    def cluster_state(self, key, source_namespace, connector, rand) -> SharedClusterState:
        """A ``ProxyRuntime.cluster_class``."""
        return SharedClusterState(self, key, source_namespace, connector, rand)

    def start(self, loop) -> None:
        self.loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def register(self, state: SharedClusterState) -> None:
        self.states.setdefault(state.cid, []).append(state)

    def configure(self, state: SharedClusterState) -> None:
        """After a refresh: tell the parent the cluster's policy and endpoints, take its view."""
        ejected, watched = self.known.get(state.cid, (frozenset(), frozenset()))
        state.ejected = ejected
        state.watched = watched
        policy = state.policy.outlier
        if policy is None:
            return
        facts = (policy, tuple(sorted(e.id for e in state.endpoints)))
        if self.sent.get(state.cid) != facts:
            self.sent[state.cid] = facts
            self._send(("cfg", state.cid) + facts)

    def report(self, cid: str, eid: str, status: int, wait: bool) -> None:
        self.seq += 1
        seq = self.seq if wait else 0
        self._send(("res", cid, eid, status, seq))
        if wait:
            self._wait(seq)

    def _send(self, msg) -> None:
        sock = self.sock
        try:
            sock.settimeout(REPORT_TIMEOUT)
            sock.sendall(_frame(msg))
        except OSError as exc:
            log.warning("cannot report to the proxy parent (outlier detection): %s", exc)
        finally:
            sock.settimeout(0.0)

    def _wait(self, seq: int) -> None:
        sock = self.sock
        deadline = time.monotonic() + REPORT_TIMEOUT
        try:
            while True:
                if self._apply(seq):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer")
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    raise EOFError("parent closed the channel")
                self.buf += data
        except (OSError, EOFError) as exc:
            log.warning("the proxy parent did not answer an outlier report: %s", exc)
        finally:
            sock.settimeout(0.0)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.sock.fileno())
            return
        self.buf += data
        self._apply(None)

    def _apply(self, seq) -> bool:
        acked = False
        for msg in _frames(self.buf):
            if msg[0] == "state":
                _, cid, ejected, watched = msg
                self.known[cid] = (ejected, watched)
                for state in self.states.get(cid, ()):
                    state.ejected = ejected
                    state.watched = watched
            elif msg[0] == "ack" and msg[1] == seq:
                acked = True
        return acked


# --- outlier detection: parent side ------------------------------------------------


class OutlierHub:
    """The parent's authoritative outlier detectors, fed by the workers' reports."""

    def __init__(self, socks: list[socket.socket], clock=time.monotonic) -> None:
        self.socks = socks
        self.clock = clock
        self.detectors: dict[str, outlier_mod.OutlierDetector] = {}
        self.published: dict[str, tuple[frozenset, frozenset]] = {}
        self.bufs = {s.fileno(): bytearray() for s in socks}
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="outlier-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping and len(sel.get_map()) > 1:
                timeout = None
                if self.detectors:
                    timeout = max(0.0, min(d.next_sweep for d in self.detectors.values()) - self.clock())
                for key, _ in sel.select(timeout):
                    s = key.fileobj
                    if s is self._wake_r:
                        continue
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(s)
                        continue
                    buf = self.bufs[s.fileno()]
                    buf += data
                    for msg in _frames(buf):
                        self.handle(s, msg)
                self.sweep(self.clock())
        except Exception:  # the proxy keeps serving; ejections just stop being shared
            log.exception("outlier detection hub failed")
        finally:
            sel.close()

    def handle(self, sender: socket.socket, msg) -> None:
        now = self.clock()
        if msg[0] == "cfg":
            _, cid, policy, ids = msg
            det = self.detectors.get(cid)
            if det is None or det.policy != policy:
                self.detectors[cid] = outlier_mod.OutlierDetector(policy, now, ids)
            else:
                det.set_endpoints(ids)
            self._publish(cid, now)
        elif msg[0] == "res":
            _, cid, eid, status, seq = msg
            det = self.detectors.get(cid)
            if det is not None:
                if status:
                    event = det.record_result(eid, status, now)
                else:
                    event = det.record_result(eid, None, now, connect_failure=True)
                if event is not None:
                    log.info("outlier detection ejected %s from %s (%s) for %.1fs",
                             event.endpoint_id, cid, event.reason, event.until - event.at)
                self._publish(cid, now)
            if seq:
                self._send(sender, ("ack", seq))

    def sweep(self, now: float) -> None:
        for cid, det in self.detectors.items():
            if now >= det.next_sweep:
                readmitted = det.sweep(now)
                if readmitted:
                    log.info("outlier detection readmitted %s to %s", ", ".join(readmitted), cid)
                self._publish(cid, now)

    def _publish(self, cid: str, now: float) -> None:
        det = self.detectors[cid]
        watched = frozenset(eid for eid, h in det.snapshot_state(now).items()
                            if h["consecutive_5xx"] or h["consecutive_gateway"] or h["consecutive_local_origin"])
        view = (det.ejected(), watched)
        if self.published.get(cid) == view:
            return
        self.published[cid] = view
        msg = ("state", cid) + view
        for s in self.socks:
            self._send(s, msg)

    @staticmethod
    def _send(sock: socket.socket, msg) -> None:
        try:
            sock.settimeout(REPORT_TIMEOUT)
            sock.sendall(_frame(msg))
        except OSError:
            pass  # a worker that is gone
        finally:
            try:
                sock.setblocking(False)
            except OSError:
                pass
