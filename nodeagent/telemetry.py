"""Istio-standard Prometheus metrics and the JSON access log.

Counting stays off the hot path: a request adds to plain dicts keyed by a
label tuple (counters plus fixed bucket arrays); nothing touches
prometheus_client per request. ``IstioCollector`` turns those dicts into
metric families only when /metrics is scraped. With several worker
processes, each worker's ``Telemetry.export()`` is merged by the parent.
"""
from __future__ import annotations

import json
import os
import sys
import time
from bisect import bisect_left

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

SOURCE_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal",
    "source_app", "source_version",
)
DESTINATION_LABELS = (
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service",
    "destination_service_name", "destination_service_namespace", "request_protocol",
)
HTTP_LABELS = SOURCE_LABELS + DESTINATION_LABELS + (
    "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
TCP_LABELS = SOURCE_LABELS + DESTINATION_LABELS + ("response_flags", "connection_security_policy")

# Istio's default bucket boundaries.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                       30000, 60000, 300000, 600000, 1800000, 3600000)
SIZE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

_NB_D = len(DURATION_BUCKETS_MS) + 1
_DURATION_BOUNDS = tuple(map(float, DURATION_BUCKETS_MS))  # float keys compare faster against floats
_NB_S = len(SIZE_BUCKETS) + 1
# bisect_left(SIZE_BUCKETS, n) for n < 1024, by index (cheaper than the call)
_SMALL_SIZE = bytes(bisect_left(SIZE_BUCKETS, n) for n in range(1024))


def source_labels(ctx) -> tuple:
    """reporter + source_* labels of a listener context (cached on the context object)."""
    src = ctx.source
    if src is None:
        return (ctx.reporter, "unknown", "unknown", "unknown", "unknown", "unknown")
    return (ctx.reporter, src.name, src.namespace, src.principal or "unknown", src.app, src.version)


def status_labels(status) -> tuple[str, str]:
    """(response_code, grpc_response_status) of a recorded status: an int, or for a gRPC
    request (int, grpc-status string) as nodeagent.proxy.h2 records it."""
    if status.__class__ is tuple:
        return str(status[0]), status[1]
    return str(status), ""


class Telemetry:
    """Per-process accumulators for HTTP and TCP metrics."""

    __slots__ = ("http", "tcp", "_src_cache", "security_policy", "_series")

    def __init__(self) -> None:
        # key -> [count, dur_sum, req_sum, resp_sum, dur_buckets, req_buckets, resp_buckets];
        # count and the size buckets [0] are filled in by export() (_complete), not per request
        self.http: dict[tuple, list] = {}
        # key -> [opened, closed, sent, received]
        self.tcp: dict[tuple, list] = {}
        self._src_cache: dict[int, tuple] = {}
        self.security_policy = "unknown"
        # (id(ctx), id(dest), status, flags) -> (entry, ctx, dest): the entry of self.http
        # without hashing the label tuples per request (ctx and dest are kept alive, so
        # their ids are not reused while cached)
        self._series: dict[tuple, tuple] = {}

    def _src(self, ctx) -> tuple:
        key = id(ctx)
        hit = self._src_cache.get(key)
        if hit is None or hit[0] is not ctx:
            hit = (ctx, source_labels(ctx))
            self._src_cache[key] = hit
        return hit[1]

    def record_http(self, ctx, dest: tuple, status: int, flags: str, duration_ms: float,
                    req_bytes: int, resp_bytes: int) -> None:
        # Only what export() cannot derive is counted here: the request count is the sum of
        # the duration buckets, and a size histogram's first bucket (0 or 1 byte) is the count
        # minus its other buckets, so empty bodies (most requests) cost nothing.
        hit = self._series.get((id(ctx), id(dest), status, flags))
        entry = hit[0] if hit is not None else self._http_entry(ctx, dest, status, flags)
        entry[1] += duration_ms
        # bisect_left(DURATION_BUCKETS_MS, d): the first two buckets (up to 1 ms) by comparison
        entry[4][0 if duration_ms <= 0.5 else 1 if duration_ms <= 1.0 else bisect_left(_DURATION_BOUNDS, duration_ms)] += 1
        if req_bytes:
            entry[2] += req_bytes
            entry[5][bisect_left(SIZE_BUCKETS, req_bytes)] += 1
        if resp_bytes:
            entry[3] += resp_bytes
            entry[6][_SMALL_SIZE[resp_bytes] if resp_bytes < 1024 else bisect_left(SIZE_BUCKETS, resp_bytes)] += 1

    def _http_entry(self, ctx, dest: tuple, status: int, flags: str) -> list:
        key = (self._src(ctx), dest, status, flags)
        entry = self.http.get(key)
        if entry is None:
            entry = [0, 0.0, 0, 0, [0] * _NB_D, [0] * _NB_S, [0] * _NB_S]
            self.http[key] = entry
        series = self._series
        if len(series) >= 4096:
            series.clear()
        series[(id(ctx), id(dest), status, flags)] = (entry, ctx, dest)
        return entry

    def tcp_entry(self, ctx, dest: tuple, flags: str = "-") -> list:
        """The [opened, closed, sent, received] counters a relay updates in place."""
        key = (self._src(ctx), dest, flags)
        entry = self.tcp.get(key)
        if entry is None:
            entry = [0, 0, 0, 0]
            self.tcp[key] = entry
        return entry

    def export(self) -> dict:
        """A picklable copy (label tuples flattened) for the parent process to merge."""
        return {
            "http": {k[0] + k[1] + status_labels(k[2]) + (k[3], self.security_policy): _complete(v)
                     for k, v in list(self.http.items())},
            "tcp": {k[0] + k[1] + (k[2], self.security_policy): list(v) for k, v in list(self.tcp.items())},
        }


def _complete(v: list) -> list:
    """A copy of one HTTP accumulator with what ``record_http`` leaves out filled in: the
    request count (the duration buckets' sum) and the size histograms' first bucket (the
    count minus the other buckets). Accumulators that count those too (a subclass's
    ``record_http``) come out the same."""
    count = sum(v[4])
    req, resp = list(v[5]), list(v[6])
    req[0] = count - sum(req[1:])
    resp[0] = count - sum(resp[1:])
    return [count, v[1], v[2], v[3], list(v[4]), req, resp]


def merge_exports(exports) -> dict:
    merged = {"http": {}, "tcp": {}}
    for exp in exports:
        for key, v in exp["http"].items():
            m = merged["http"].get(key)
            if m is None:
                merged["http"][key] = [v[0], v[1], v[2], v[3], list(v[4]), list(v[5]), list(v[6])]
            else:
                for i in range(4):
                    m[i] += v[i]
                for j in (4, 5, 6):
                    m[j] = [a + b for a, b in zip(m[j], v[j])]
        for key, v in exp["tcp"].items():
            m = merged["tcp"].get(key)
            if m is None:
                merged["tcp"][key] = list(v)
            else:
                merged["tcp"][key] = [a + b for a, b in zip(m, v)]
    return merged


def _buckets(bounds, counts) -> list:
    out = []
    acc = 0
    for bound, n in zip(bounds, counts):
        acc += n
        out.append((repr(float(bound)) if not float(bound).is_integer() else str(float(bound)), acc))
    acc += counts[-1]
    out.append(("+Inf", acc))
    return out


class IstioCollector:
    """A prometheus_client collector reading merged exports at scrape time."""

    def __init__(self, source) -> None:
        self.source = source  # () -> merged export dict

    def describe(self):
        return []

    def collect(self):
        data = self.source()
        requests = CounterMetricFamily("istio_requests_total", "Requests handled by the proxy", labels=HTTP_LABELS)
        duration = HistogramMetricFamily("istio_request_duration_milliseconds", "Request duration", labels=HTTP_LABELS)
        req_size = HistogramMetricFamily("istio_request_bytes", "Request body size", labels=HTTP_LABELS)
        resp_size = HistogramMetricFamily("istio_response_bytes", "Response body size", labels=HTTP_LABELS)
        for key, v in data["http"].items():
            labels = list(key)
            requests.add_metric(labels, v[0])
            duration.add_metric(labels, _buckets(DURATION_BUCKETS_MS, v[4]), v[1])
            req_size.add_metric(labels, _buckets(SIZE_BUCKETS, v[5]), v[2])
            resp_size.add_metric(labels, _buckets(SIZE_BUCKETS, v[6]), v[3])
        opened = CounterMetricFamily("istio_tcp_connections_opened_total", "TCP connections opened", labels=TCP_LABELS)
        closed = CounterMetricFamily("istio_tcp_connections_closed_total", "TCP connections closed", labels=TCP_LABELS)
        sent = CounterMetricFamily("istio_tcp_sent_bytes_total", "Bytes sent to the destination", labels=TCP_LABELS)
        received = CounterMetricFamily("istio_tcp_received_bytes_total", "Bytes received from the destination", labels=TCP_LABELS)
        for key, v in data["tcp"].items():
            labels = list(key)
            opened.add_metric(labels, v[0])
            closed.add_metric(labels, v[1])
            sent.add_metric(labels, v[2])
            received.add_metric(labels, v[3])
        return [requests, duration, req_size, resp_size, opened, closed, sent, received]


class AccessLog:
    """One JSON line per request or TCP connection, Envoy-like field names."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout

    def _write(self, record: dict) -> None:
        self.stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.stream.flush()

    def http(self, exchange, down, src, duration_ms: float) -> None:
        dest = exchange.dest or ()
        self._write({
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - duration_ms / 1000)) + "Z",
            "method": exchange.method.decode("latin-1"),
            "path": exchange.path.decode("latin-1"),
            "protocol": "HTTP/" + exchange.version,
            "response_code": exchange.status,
            "response_flags": exchange.flags,
            "bytes_received": exchange.req_bytes,
            "bytes_sent": exchange.resp_bytes,
            "duration": round(duration_ms, 3),
            "authority": exchange.authority.decode("latin-1"),
            "upstream_host": exchange.upstream_host or None,
            "upstream_cluster": _cluster_name(exchange.cluster),
            "upstream_transport_failure_reason": exchange.failure_reason,
            "route_name": exchange.plan.route_name if exchange.plan is not None else None,
            "downstream_remote_address": "%s:%s" % down.peer.remote[:2],
            "source_workload": src.name if src is not None else None,
            "source_namespace": src.namespace if src is not None else None,
            "destination_service": dest[5] if len(dest) > 5 else None,
            "user_agent": exchange.header_map().get("user-agent"),
            "request_id": exchange.request_id_str(),
            "attempts": exchange.attempt,
            "worker": os.getpid(),
        })

    def protocol_error(self, down, status: int) -> None:
        self._write({
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "response_code": status,
            "response_flags": "-",
            "downstream_remote_address": "%s:%s" % down.peer.remote[:2],
            "error": "malformed or oversized request",
        })

    def tcp(self, relay, duration_ms: float) -> None:
        self._write({
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - duration_ms / 1000)) + "Z",
            "protocol": "TCP",
            "response_flags": relay.flags,
            "bytes_received": relay.received,
            "bytes_sent": relay.sent,
            "duration": round(duration_ms, 3),
            "upstream_host": relay.upstream_host or None,
            "upstream_cluster": _cluster_name(relay.cluster),
            "upstream_transport_failure_reason": relay.failure_reason,
            "downstream_remote_address": "%s:%s" % relay.peer.remote[:2],
        })


def _cluster_name(state) -> str | None:
    """Envoy's outbound cluster name: outbound|PORT|SUBSET|HOST."""
    if state is None:
        return None
    key = state.key
    return "outbound|%d|%s|%s" % (key.port, key.subset or "", key.host)
