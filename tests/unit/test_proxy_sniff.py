"""What the sniffer of an HTTP2/GRPC port (tcp.py's DispatchProtocol, inbound.py's _Sniff)
makes of a connection's first bytes, and the gRPC status label of the mesh's metrics."""
from __future__ import annotations

from nodeagent.proxy.context import WorkloadIdentity
from nodeagent.proxy.inbound import InboundContext
from nodeagent.proxy.tcp import _SNIFF_LIMIT, sniff_http
from nodeagent.proxy.tunnel import MeshTelemetry
from nodeagent.telemetry import HTTP_LABELS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_http1_request_line_and_http2_preface_go_to_the_http_engine():
    assert sniff_http(b"GET /x HTTP/1.1\r\nHost: a\r\n") is True
    assert sniff_http(b"POST / HTTP/1.0\n") is True
    assert sniff_http(PREFACE) is True
    assert sniff_http(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00") is True
    assert sniff_http(PREFACE[:16]) is True  # the preface's first line: the engine checks the rest


def test_a_preface_split_over_reads_waits_for_its_first_line():
    for n in range(1, 16):
        assert sniff_http(PREFACE[:n]) is None, n
    assert sniff_http(b"GET /x HT") is None  # a request line still arriving


def test_other_bytes_are_relayed():
    assert sniff_http(b"PRI * HTTP/2.1\r\n") is False
    assert sniff_http(b"PRIX\r\n") is False
    assert sniff_http(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n") is False  # a line, not HTTP
    assert sniff_http(b"x" * _SNIFF_LIMIT) is False  # no line within the limit
    assert sniff_http(b"x" * (_SNIFF_LIMIT - 1)) is None


def test_mesh_metrics_carry_the_grpc_status():
    telemetry = MeshTelemetry()
    src = WorkloadIdentity("shop", "a", "a", {"app": "a"}, "cluster.local/ns/shop/sa/a")
    ctx = InboundContext("inbound", src, "destination", security_policy="mutual_tls")
    dest = ("b", "shop", "cluster.local/ns/shop/sa/b", "b", "v1", "g.shop.svc.cluster.local", "g", "shop", "grpc")
    telemetry.record_http(ctx, dest, (200, "0"), "-", 1.0, 10, 10)
    telemetry.record_http(ctx, dest, (403, "7"), "RBAC", 1.0, 10, 0)
    telemetry.record_http(ctx, dest[:-1] + ("http",), 200, "-", 1.0, 0, 0)
    got = {}
    for key, value in telemetry.export()["http"].items():
        labels = dict(zip(HTTP_LABELS, key))
        got[(labels["request_protocol"], labels["response_code"], labels["grpc_response_status"],
             labels["response_flags"], labels["connection_security_policy"])] = value[0]
    assert got == {("grpc", "200", "0", "-", "mutual_tls"): 1, ("grpc", "403", "7", "RBAC", "mutual_tls"): 1,
                   ("http", "200", "", "-", "mutual_tls"): 1}
