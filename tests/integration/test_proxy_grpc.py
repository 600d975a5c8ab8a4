"""HTTP/2 and gRPC through `nodeagent proxy` (issue 3): real grpcio clients and servers,
a real h2 server that resets streams, curl --http2-prior-knowledge, all on loopback."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import grpc
import pytest

from tests.integration.grpc_upstream import GrpcServer, RawH2Server
from tests.integration.proxy_harness import ProxyProcess, metric_value
from tests.integration.test_proxy_hooks import HOST as HOOKED_HOST, hooked  # noqa: F401 (fixture)
from tests.integration.upstream import UpstreamServer

NS = "shop"


def _service(name: str, port: int, endpoints, *, port_name="grpc", protocol="GRPC") -> str:
    """A ServiceEntry NAME.shop on PORT with one WorkloadEntry per (server, version)."""
    out = [f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {NS}
spec:
  hosts:
  - {name}.{NS}.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: {port}
    name: {port_name}
    protocol: {protocol}
  workloadSelector:
    labels:
      app: {name}
"""]
    for i, (server, version) in enumerate(endpoints):
        out.append(f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}-{i}
  namespace: {NS}
spec:
  address: 127.0.0.1
  ports:
    {port_name}: {server.address[1]}
  labels:
    app: {name}
    version: {version}
""")
    return "".join(out)


def _subsets_dr(name: str, extra: str = "") -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: {NS}
spec:
  host: {name}.{NS}.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
{extra}  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"""


def _config(a, b, good, bad, good2, bad2, raw, raw1, web, shadow, raw2, raw3) -> str:
    host = f".{NS}.svc.cluster.local"
    return "".join([
        _service("echo", 50051, [(a, "v1"), (b, "v2")]),
        _subsets_dr("echo"),
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
  namespace: {NS}
spec:
  hosts: [echo{host}]
  http:
  - name: by-header
    match:
    - headers:
        x-version:
          exact: v2
    route:
    - destination: {{host: echo{host}, subset: v2}}
  - name: by-method
    match:
    - uri:
        prefix: /test.Echo/Second
    route:
    - destination: {{host: echo{host}, subset: v2}}
  - name: default
    route:
    - destination: {{host: echo{host}, subset: v1}}
""",
        _service("split", 50052, [(a, "v1"), (b, "v2")]),
        _subsets_dr("split"),
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: split
  namespace: {NS}
spec:
  hosts: [split{host}]
  http:
  - route:
    - destination: {{host: split{host}, subset: v1}}
      weight: 75
    - destination: {{host: split{host}, subset: v2}}
      weight: 25
""",
        _service("flaky", 50053, [(good, "v1"), (bad, "v1")]),
        _subsets_dr("flaky"),
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: flaky
  namespace: {NS}
spec:
  hosts: [flaky{host}]
  http:
  - route:
    - destination: {{host: flaky{host}}}
    retries:
      attempts: 2
      retryOn: unavailable
""",
        _service("eject", 50054, [(good2, "v1"), (bad2, "v1")]),
        _subsets_dr("eject", extra="""    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 100
"""),
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: eject
  namespace: {NS}
spec:
  hosts: [eject{host}]
  http:
  - route:
    - destination: {{host: eject{host}}}
    retries:
      attempts: 0
""",
        _service("faulty", 50055, [(a, "v1")]),
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: faulty
  namespace: {NS}
spec:
  hosts: [faulty{host}]
  http:
  - match:
    - uri:
        prefix: /test.Echo/Which
    fault:
      abort:
        grpcStatus: RESOURCE_EXHAUSTED
        percentage:
          value: 100
    route:
    - destination: {{host: faulty{host}}}
  - fault:
      abort:
        httpStatus: 503
        percentage:
          value: 100
    route:
    - destination: {{host: faulty{host}}}
""",
        _service("slow", 50058, [(a, "v1")]),
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: slow
  namespace: {NS}
spec:
  hosts: [slow{host}]
  http:
  - match:
    - headers:
        x-delay-me:
          exact: "yes"
    fault:
      delay:
        fixedDelay: 0.3s
        percentage:
          value: 100
    route:
    - destination: {{host: slow{host}}}
  - route:
    - destination: {{host: slow{host}}}
    timeout: 0.3s
""",
        _service("raw", 50056, [(raw, "v1")]),
        _service("raw1", 50057, [(raw1, "v1")]),
        _service("web", 8080, [(web, "v1")], port_name="http", protocol="HTTP"),
        _service("shadow", 8080, [(shadow, "v1")], port_name="http", protocol="HTTP"),
        _service("limited", 50060, [(raw3, "v1")]),
        f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: limited
  namespace: {NS}
spec:
  host: limited{host}
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
""",
        _service("pooled", 50059, [(raw2, "v1")]),
        f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: pooled
  namespace: {NS}
spec:
  host: pooled{host}
  trafficPolicy:
    connectionPool:
      http:
        maxRequestsPerConnection: 2
        idleTimeout: 0.4s
""",
        f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: {NS}
spec:
  hosts: [web{host}]
  http:
  - match:
    - uri:
        prefix: /mirrored
    route:
    - destination: {{host: web{host}}}
    mirror:
      host: shadow{host}
  - route:
    - destination: {{host: web{host}}}
""",
    ])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    a, b = GrpcServer("a").start(), GrpcServer("b").start()
    good, bad = GrpcServer("good").start(), GrpcServer("bad").start()
    good2, bad2 = GrpcServer("good2").start(), GrpcServer("bad2").start()
    bad.fail = bad2.fail = True
    raw = RawH2Server().start()
    raw1 = RawH2Server(max_streams=1, delay=0.3).start()
    web = UpstreamServer("web").start()
    shadow = UpstreamServer("shadow").start()
    raw2 = RawH2Server().start()
    raw3 = RawH2Server(max_streams=1, delay=0.4).start()
    servers = [a, b, good, bad, good2, bad2, raw, raw1, web, shadow, raw2, raw3]
    d = tmp_path_factory.mktemp("grpc")
    (d / "config.yaml").write_text(_config(*servers))
    proxy = ProxyProcess(d, access_log=True).start()
    channels = {}

    def channel(service: str, port: int) -> grpc.Channel:
        key = (service, port)
        if key not in channels:
            channels[key] = grpc.insecure_channel(
                f"127.0.0.1:{proxy.port}",
                options=[("grpc.default_authority", f"{service}.{NS}.svc.cluster.local:{port}"),
                         ("grpc.enable_retries", 0)])
        return channels[key]

    yield {"proxy": proxy, "channel": channel, "a": a, "b": b, "good": good, "bad": bad,
           "good2": good2, "bad2": bad2, "raw": raw, "raw1": raw1, "web": web, "shadow": shadow, "raw2": raw2, "raw3": raw3}
    for ch in channels.values():
        ch.close()
    proxy.stop()
    for s in servers:
        s.stop()


def _unary(ch, method: str, req: bytes = b"x", metadata=None, timeout: float = 5.0):
    return ch.unary_unary(f"/test.Echo/{method}")(req, metadata=metadata, timeout=timeout)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_unary_server_streaming_client_streaming_and_bidi(env):
    ch = env["channel"]("echo", 50051)
    assert _unary(ch, "Echo", b"hello") == b"hello"
    assert list(ch.unary_stream("/test.Echo/Stream")(b"5", timeout=5)) == [b"0", b"1", b"2", b"3", b"4"]
    # client streaming: 3 MiB in 48 messages, well beyond the proxy's 1 MiB connection window
    chunks = [bytes([65 + i % 26]) * 65536 for i in range(48)]
    assert ch.stream_unary("/test.Echo/Collect")(iter(chunks), timeout=10) == b"%d" % (48 * 65536)
    # bidi: each answer comes back before the next message is sent (true streaming, no buffering)
    sent = []
    ready = threading.Event()

    def requests():
        for word in (b"one", b"two", b"three"):
            sent.append(word)
            yield word
            assert ready.wait(5)
            ready.clear()

    answers = []
    for answer in ch.stream_stream("/test.Echo/Bidi")(requests(), timeout=5):
        answers.append(answer)
        assert len(answers) == len(sent)
        ready.set()
    assert answers == [b"ONE", b"TWO", b"THREE"]


def test_large_server_stream_flows_with_backpressure(env):
    ch = env["channel"]("echo", 50051)
    total = 0
    for i, msg in enumerate(ch.unary_stream("/test.Echo/Big")(b"160", timeout=20)):  # 10 MiB
        total += len(msg)
        if i % 40 == 0:
            time.sleep(0.05)  # a slow reader: the proxy must hold back, not buffer 10 MiB
    assert total == 160 * 65536


def test_trailers_and_error_status_reach_the_client(env):
    ch = env["channel"]("echo", 50051)
    err = _code(lambda: _unary(ch, "Trailers"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "missing thing"
    assert ("x-trailer", "yes") in tuple(err.trailing_metadata())


def test_routing_by_header_and_by_method_path(env):
    ch = env["channel"]("echo", 50051)
    assert _unary(ch, "Which") == b"a"
    assert _unary(ch, "Which", metadata=(("x-version", "v2"),)) == b"b"
    assert _unary(ch, "Second") == b"b"
    # the same connection carries both routes: one upstream HTTP/2 connection per endpoint
    seen = env["b"].seen_metadata[-1]
    assert seen.get("x-envoy-attempt-count") == "1"


def test_weighted_split(env):
    ch = env["channel"]("split", 50052)
    answers = [_unary(ch, "Which") for _ in range(200)]
    a = answers.count(b"a")
    assert answers.count(b"b") == 200 - a
    assert 120 <= a <= 180, a  # 75/25, binomial sd ~6


def test_retry_on_unavailable_reaches_the_good_endpoint(env):
    ch = env["channel"]("flaky", 50053)
    before = env["bad"].hits
    for _ in range(10):
        assert _unary(ch, "Which") == b"good"
    assert env["bad"].hits > before  # round robin did send some tries to the failing one
    retried = [m for m in env["good"].seen_metadata if m.get("x-envoy-attempt-count") == "2"]
    assert retried


def test_outlier_detection_ejects_an_endpoint_answering_unavailable(env):
    ch = env["channel"]("eject", 50054)
    failures = 0
    for _ in range(12):
        try:
            assert _unary(ch, "Which") == b"good2"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            failures += 1
    assert failures == 2  # two consecutive UNAVAILABLE (recorded as 503) eject it
    hits = env["bad2"].hits
    for _ in range(5):
        assert _unary(ch, "Which") == b"good2"
    assert env["bad2"].hits == hits


def test_fault_abort_with_grpc_status_and_with_http_status(env):
    ch = env["channel"]("faulty", 50055)
    hits = env["a"].hits
    err = _code(lambda: _unary(ch, "Which"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "fault filter abort"
    err = _code(lambda: _unary(ch, "Echo"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # httpStatus 503, mapped as Envoy does
    assert env["a"].hits == hits  # nothing reached the server
    text = env["proxy"].metrics()
    assert metric_value(text, "istio_requests_total", destination_service_name="faulty",
                        response_flags="FI", grpc_response_status="8", request_protocol="grpc") == 1
    assert metric_value(text, "istio_requests_total", destination_service_name="faulty",
                        response_flags="FI", grpc_response_status="14", response_code="503") == 1


def test_upstream_reset_before_and_after_the_response_started(env):
    ch = env["channel"]("raw", 50056)
    assert _unary(ch, "Ok") == b"ok"
    err = _code(lambda: _unary(ch, "ResetBefore"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # 503 UR as a trailers-only reply
    assert "reset" in err.details()
    err = _code(lambda: _unary(ch, "ResetAfter"))
    assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert _unary(ch, "Ok") == b"ok"  # the upstream connection survived the stream resets
    assert env["raw"].connections == 1
    text = env["proxy"].metrics()
    assert metric_value(text, "istio_requests_total", destination_service_name="raw",
                        response_flags="UR") == 2


def test_upstream_goaway_refuses_the_stream_and_it_is_retried_elsewhere_or_unavailable(env):
    ch = env["channel"]("raw", 50056)
    connections = env["raw"].connections
    err = _code(lambda: _unary(ch, "GoAway"))
    # Istio's default retry policy retries refused streams: the new connection gets GOAWAY too.
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert env["raw"].connections >= connections + 1
    assert _unary(ch, "Ok") == b"ok"


def test_server_max_concurrent_streams_is_respected(env):
    ch = env["channel"]("raw1", 50057)
    results = []

    def call():
        results.append(_unary(ch, "Slow", timeout=10))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == [b"ok"] * 4
    assert env["raw1"].max_active == 1  # never two streams on one connection
    assert env["raw1"].connections >= 2  # the proxy opened more connections instead


def test_grpc_to_an_http1_port_is_refused_clearly(env):
    ch = env["channel"]("web", 8080)
    err = _code(lambda: _unary(ch, "Which"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP/2" in err.details() and "grpc" in err.details()


def test_no_route_is_unimplemented(env):
    ch = grpc.insecure_channel(f"127.0.0.1:{env['proxy'].port}",
                               options=[("grpc.default_authority", "nowhere.shop.svc.cluster.local:1")])
    try:
        err = _code(lambda: _unary(ch, "Which"))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # 404 NR, as Envoy maps it
    finally:
        ch.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge_and_http1_on_the_same_listener(env):
    proxy = env["proxy"]
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\\n%{http_version} %{http_code}",
         "-H", "Host: web.shop.svc.cluster.local:8080", "-H", "x-test: h2",
         f"http://127.0.0.1:{proxy.port}/hello?x=1"],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.rpartition("\n")
    assert tail == "2 200"
    assert '"path": "/hello?x=1"' in body and '"x-test": "h2"' in body
    # a POST body through HTTP/2 -> HTTP/1.1 (chunked upstream)
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", "@-", "-H", "content-type: text/plain",
         "-H", "Host: web.shop.svc.cluster.local:8080", f"http://127.0.0.1:{proxy.port}/upload"],
        input="z" * 100000, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert '"body_len": 100000' in out.stdout
    # HTTP/1.1 on the same listener is unaffected
    status, headers, data = proxy.request("/plain", host="web.shop.svc.cluster.local:8080")
    assert status == 200 and headers["x-instance"] == "web"


def test_metrics_and_access_log(env):
    ch = env["channel"]("echo", 50051)
    assert _unary(ch, "Echo", b"m") == b"m"
    _code(lambda: _unary(ch, "Trailers"))
    assert env["proxy"].request("/m", host="web.shop.svc.cluster.local:8080")[0] == 200
    text = env["proxy"].metrics()
    assert metric_value(text, "istio_requests_total", destination_service_name="echo",
                        request_protocol="grpc", response_code="200", grpc_response_status="0") >= 1
    assert metric_value(text, "istio_requests_total", destination_service_name="echo",
                        grpc_response_status="5", response_code="200") >= 1  # Trailers: NOT_FOUND
    assert metric_value(text, "istio_requests_total", destination_service_name="web",
                        request_protocol="http", grpc_response_status="") >= 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any('"/test.Echo/Echo"' in l for l in env["proxy"].stdout):
        time.sleep(0.05)
    line = next(l for l in env["proxy"].stdout if '"/test.Echo/Echo"' in l and '"bytes_received":6,' in l)
    assert '"bytes_sent":6,' in line  # one gRPC message of one byte each way (5-byte prefix + 1)
    assert '"protocol":"HTTP/2"' in line and '"upstream_cluster":"outbound|50051|v1|echo.shop.svc.cluster.local"' in line


def test_route_timeout_fault_delay_and_client_cancellation(env):
    ch = env["channel"]("slow", 50058)
    a = env["a"]
    t0 = time.monotonic()
    err = _code(lambda: _unary(ch, "Sleep", b"2"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # 504 UT as a trailers-only reply
    assert "timeout" in err.details()
    assert time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    assert _unary(ch, "Echo", b"late", metadata=(("x-delay-me", "yes"),)) == b"late"
    assert time.monotonic() - t0 >= 0.3
    # the client cancels: the proxy resets the upstream stream, the server sees it
    cancelled = a.cancelled
    ch_plain = env["channel"]("echo", 50051)
    future = ch_plain.unary_unary("/test.Echo/Sleep").future(b"3")  # no deadline: only a cancel ends it
    time.sleep(0.3)
    future.cancel()
    deadline = time.monotonic() + 3
    while a.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.cancelled == cancelled + 1
    text = env["proxy"].metrics()
    assert metric_value(text, "istio_requests_total", destination_service_name="slow",
                        response_code="504", response_flags="UT", grpc_response_status="14") == 1
    assert metric_value(text, "istio_requests_total", destination_service_name="slow",
                        response_flags="DI", grpc_response_status="0") == 1
    assert metric_value(text, "istio_requests_total", destination_service_name="echo",
                        response_flags="DC", request_protocol="grpc") == 1


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_slow_reader_does_not_make_the_proxy_buffer(env):
    ch = env["channel"]("echo", 50051)
    pid = env["proxy"].proc.pid
    assert len(list(ch.unary_stream("/test.Echo/Big")(b"64", timeout=30))) == 64  # warm up (imports, heap)
    before = _rss_kb(pid)
    it = ch.unary_stream("/test.Echo/Big")(b"512", timeout=30)  # 32 MiB
    total = len(next(it))
    time.sleep(1.0)  # the client does not read: the server must be held back, not buffered
    held = _rss_kb(pid) - before
    for msg in it:
        total += len(msg)
    assert total == 512 * 65536
    assert held < 8 * 1024, f"proxy RSS grew {held} KiB while the client did not read"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_too_many_request_headers_get_431_on_the_stream(env):
    proxy = env["proxy"]
    args = ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
            "-H", "Host: web.shop.svc.cluster.local:8080"]
    for i in range(120):
        args += ["-H", f"x-h{i}: v"]
    out = subprocess.run(args + [f"http://127.0.0.1:{proxy.port}/many"], capture_output=True, text=True, timeout=20)
    assert out.stdout == "431", out.stderr
    body = len(b"Request Header Fields Too Large\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any('"/many"' in l for l in proxy.stdout):
        time.sleep(0.05)
    line = next(l for l in proxy.stdout if '"/many"' in l)
    assert '"response_code":431' in line and f'"bytes_sent":{body},' in line


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_inbound_authorization_hook_applies_to_each_http2_stream(hooked):
    port, authorizer, connector, upstream = hooked

    def curl(path: str) -> str:
        out = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
             "-H", f"Host: {HOOKED_HOST}", f"http://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, timeout=20)
        return out.stdout

    assert curl("/admin/users") == "2 403"
    assert upstream.hits == 0
    assert curl("/public") == "2 200"
    assert upstream.hits == 1
    assert [r[1] for r in authorizer.requests] == ["/admin/users", "/public"]


def test_grpc_with_several_workers_and_merged_metrics(tmp_path):
    server = GrpcServer("w").start()
    proxy = None
    try:
        (tmp_path / "c.yaml").write_text(_service("echo", 50051, [(server, "v1")]))
        proxy = ProxyProcess(tmp_path, workers=2).start()
        channels = [grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                                          options=[("grpc.default_authority", "echo.shop.svc.cluster.local:50051")])
                    for _ in range(4)]
        for ch in channels:
            for _ in range(5):
                assert _unary(ch, "Echo", b"w") == b"w"
        text = proxy.metrics()
        assert metric_value(text, "istio_requests_total", request_protocol="grpc",
                            grpc_response_status="0", response_code="200") == 20
        for ch in channels:
            ch.close()
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_plain_http2_request_is_mirrored(env):
    proxy, shadow = env["proxy"], env["shadow"]
    hits = shadow.hits
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
         "-H", "Host: web.shop.svc.cluster.local:8080", f"http://127.0.0.1:{proxy.port}/mirrored/x"],
        capture_output=True, text=True, timeout=20)
    assert out.stdout == "200", out.stderr
    deadline = time.monotonic() + 5
    while shadow.hits == hits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert shadow.hits == hits + 1
    assert shadow.requests[-1]["headers"]["host"] == "web.shop.svc.cluster.local-shadow:8080"


def test_upstream_connection_reuse_max_requests_per_connection_and_idle_timeout(env):
    ch = env["channel"]("pooled", 50059)
    raw2 = env["raw2"]
    assert [_unary(ch, "Ok") for _ in range(2)] == [b"ok", b"ok"]
    assert raw2.connections == 1  # two streams, one connection
    assert _unary(ch, "Ok") == b"ok"
    assert raw2.connections == 2  # maxRequestsPerConnection: 2
    time.sleep(1.0)  # idleTimeout 0.4s closes the idle connection
    assert _unary(ch, "Ok") == b"ok"
    assert raw2.connections == 3


def _h2_get(sock, host: str, path: str, split_preface: bool = False, limit: float = 5.0,
            grpc: bytes | None = None, headers: tuple = ()) -> tuple[int, bytes]:
    """One GET (or with ``grpc``, a gRPC call with that message) over a raw socket with the h2
    library as the client; (status, body), with ``.trailers`` of the last call in _h2_get.trailers."""
    from h2.connection import H2Connection
    from h2.events import DataReceived, ResponseReceived, StreamEnded, TrailersReceived

    conn = H2Connection()
    conn.initiate_connection()
    _h2_get.trailers = {}
    if grpc is None:
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", host), (":path", path)]
                          + list(headers), end_stream=True)
    else:
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", host), (":path", path),
                              ("content-type", "application/grpc"), ("te", "trailers")] + list(headers))
        conn.send_data(1, b"\x00" + len(grpc).to_bytes(4, "big") + grpc, end_stream=True)
    data = conn.data_to_send()
    if split_preface:
        sock.sendall(data[:8])  # "PRI * HT": the preface split over two reads
        time.sleep(0.1)
        sock.sendall(data[8:])
    else:
        sock.sendall(data)
    status, body = 0, b""
    sock.settimeout(limit)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        for event in conn.receive_data(chunk):
            if isinstance(event, ResponseReceived):
                status = int(dict(event.headers)[b":status"])
                _h2_get.trailers = dict(event.headers)  # a trailers-only response
            elif isinstance(event, TrailersReceived):
                _h2_get.trailers = dict(event.headers)
            elif isinstance(event, DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                return status, body
        sock.sendall(conn.data_to_send())
    raise AssertionError("no complete response")


def test_preface_split_over_reads_and_protocol_errors(env):
    proxy = env["proxy"]
    with proxy.raw() as sock:
        status, body = _h2_get(sock, "web.shop.svc.cluster.local:8080", "/split", split_preface=True)
    assert status == 200 and b'"path": "/split"' in body
    # a preface followed by garbage: GOAWAY (frame type 7) and the connection closes
    with proxy.raw() as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x09\x00\x00\x00\x00\x01garb")
        data = b""
        sock.settimeout(5)
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    frames, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        frames.append(data[i + 3])
        i += 9 + length
    assert 7 in frames, frames
    # the listener still serves both protocols
    assert proxy.request("/after", host="web.shop.svc.cluster.local:8080")[0] == 200
    with proxy.raw() as sock:
        assert _h2_get(sock, "web.shop.svc.cluster.local:8080", "/after2")[0] == 200


def test_stream_idle_timeout_ends_a_silent_grpc_call(tmp_path):
    server = GrpcServer("idle").start()
    proxy = None
    try:
        (tmp_path / "c.yaml").write_text(_service("echo", 50051, [(server, "v1")]))
        proxy = ProxyProcess(tmp_path, extra=("--stream-idle-timeout", "0.5")).start()
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}",
                                   options=[("grpc.default_authority", "echo.shop.svc.cluster.local:50051")]) as ch:
            t0 = time.monotonic()
            err = _code(lambda: _unary(ch, "Sleep", b"3"))
            assert err.code() == grpc.StatusCode.UNKNOWN  # 408, mapped as Envoy does
            assert "stream timeout" in err.details()
            assert time.monotonic() - t0 < 2.5
            assert _unary(ch, "Echo", b"still") == b"still"
        text = proxy.metrics()
        assert metric_value(text, "istio_requests_total", response_code="408", response_flags="SI",
                            grpc_response_status="2") == 1
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


def test_grpc_timeout_header_bounds_the_call_as_istio_configures_envoy(env):
    a = env["a"]
    cancelled = a.cancelled
    t0 = time.monotonic()
    with env["proxy"].raw() as sock:
        status, _ = _h2_get(sock, "echo.shop.svc.cluster.local:50051", "/test.Echo/Sleep", grpc=b"3",
                            headers=(("grpc-timeout", "300m"),))
    assert time.monotonic() - t0 < 2.0
    assert status == 200 and _h2_get.trailers[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
    deadline = time.monotonic() + 3
    while a.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.cancelled == cancelled + 1  # the call did not run on (the header is forwarded too)
    text = env["proxy"].metrics()
    assert metric_value(text, "istio_requests_total", destination_service_name="echo",
                        response_code="408", response_flags="DT", grpc_response_status="4") == 1


def test_connection_pool_limits_overflow_on_http2_upstreams(env):
    """maxConnections 1 + http1MaxPendingRequests 1 to a server allowing one stream per
    connection: of six concurrent calls one runs, one waits, four overflow (503 UO)."""
    ch = env["channel"]("limited", 50060)
    results = []
    lock = threading.Lock()

    def call():
        try:
            out = _unary(ch, "Slow", timeout=10)
        except grpc.RpcError as err:
            out = err.code()
        with lock:
            results.append(out)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert sorted(map(str, results)) == sorted(["b'ok'"] * 2 + [str(grpc.StatusCode.UNAVAILABLE)] * 4)
    assert env["raw3"].connections == 1 and env["raw3"].max_active == 1
    text = env["proxy"].metrics()
    assert metric_value(text, "istio_requests_total", destination_service_name="limited",
                        response_flags="UO", response_code="503", grpc_response_status="14") == 4
