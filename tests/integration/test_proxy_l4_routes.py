"""VirtualService ``tcp`` and ``tls`` routes on the opaque TCP relay, end to end:
real TCP and TLS backends on 127.0.0.0/8, real TLS clients (ssl module), a real
runtime on a real loop.

Listeners are the engine's two kinds of service-bound listeners: a ``--forward``
listener (``fixed_destination`` = service name and port, as `nodeagent proxy`
opens) and a captured listener (``original_destination`` = the address the
client dialled, as the agent's 15001 gets from SO_ORIGINAL_DST). The runtime's
randomness is seeded, so the weighted split is reproducible; the bounds below
hold for any seed with overwhelming probability anyway.
"""
from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import pytest

from nodeagent.proxy import tcp as tcp_mod
from nodeagent.proxy.context import ListenerContext, WorkloadIdentity
from nodeagent.proxy.runtime import ProxyRuntime
from nodeagent.proxy.server import protocol_factory
from nodeagent.proxy.snapshots import open_config
from nodeagent.telemetry import Telemetry
from tests.integration.l4_backends import Backend, plain_call, self_signed, tls_call

ECHO = "tcp-echo.shop.svc.cluster.local"


def config(b) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  hosts: [{ECHO}]
  addresses: [10.96.0.10, 10.200.0.10]
  ports: [{{number: 9000, name: tcp, protocol: TCP}}, {{number: 9001, name: tcp-admin, protocol: TCP}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{tcp: {b['v1'].port}, tcp-admin: {b['v1'].port}}}, labels: {{app: tcp-echo, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{tcp: {b['v2'].port}, tcp-admin: {b['v2'].port}}}, labels: {{app: tcp-echo, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  host: tcp-echo
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sink, namespace: shop}}
spec:
  hosts: [sink.shop.svc.cluster.local]
  ports: [{{number: 7000, name: tcp, protocol: TCP}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {b['sink'].port}}}, labels: {{app: sink}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{{port: 9001}}]
    route: [{{destination: {{host: sink}}}}]
  - match: [{{sourceLabels: {{app: canary}}}}]
    route: [{{destination: {{host: tcp-echo, subset: v2}}}}]
  - match: [{{destinationSubnets: [10.96.0.0/16], sourceNamespace: ops}}]
    route: [{{destination: {{host: sink}}}}]
  - route:
    - {{destination: {{host: tcp-echo, subset: v1}}, weight: 80}}
    - {{destination: {{host: tcp-echo, subset: v2}}, weight: 20}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  addresses: [10.97.0.1]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {b['api-default'].port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api-v2, namespace: shop}}
spec:
  hosts: [api-v2.example.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {b['api-v2'].port}}}, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: org, namespace: shop}}
spec:
  hosts: [org.shop.svc.cluster.local]
  addresses: [10.98.0.1]
  ports: [{{number: 8443, name: https, protocol: HTTPS}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{https: {b['org'].port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com, "*.example.org"]
  tls:
  - match: [{{port: 443, sniHosts: [api.example.com]}}]
    route: [{{destination: {{host: api-v2.example.com}}}}]
  - match: [{{sniHosts: ["*.example.org"]}}]
    route: [{{destination: {{host: org.shop.svc.cluster.local, port: {{number: 8443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: egress, namespace: shop}}
spec:
  hosts: [egress.example.net]
  ports: [{{number: {b['decoy'].port}, name: tls, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {b['egress'].port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: broken, namespace: shop}}
spec:
  hosts: [broken.shop.svc.cluster.local]
  ports: [{{number: 7100, name: tcp, protocol: TCP}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {b['sink'].port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: broken, namespace: shop}}
spec:
  hosts: [broken]
  tcp:
  - route: [{{destination: {{host: nowhere}}}}]
"""


WEB = WorkloadIdentity("shop", "web", labels={"app": "web", "version": "v1"})
CANARY = WorkloadIdentity("shop", "canary", labels={"app": "canary"})
OPS = WorkloadIdentity("ops", "tool", labels={"app": "tool"})


class Env:
    def __init__(self, backends, certs, ports, runtime, loop) -> None:
        self.b = backends
        self.certs = certs
        self.ports = ports
        self.runtime = runtime
        self.loop = loop

    def tcp_metrics(self) -> list[tuple[dict, list]]:
        """(labels, [opened, closed, sent, received]) per series, read on the runtime's loop."""
        async def grab():
            return self.runtime.telemetry.export()["tcp"]
        exported = asyncio.run_coroutine_threadsafe(grab(), self.loop).result(5)
        names = ("reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
                 "source_version", "destination_workload", "destination_workload_namespace",
                 "destination_principal", "destination_app", "destination_version", "destination_service",
                 "destination_service_name", "destination_service_namespace", "request_protocol",
                 "response_flags", "connection_security_policy")
        return [(dict(zip(names, k)), v) for k, v in exported.items()]

    def closed_total(self, **labels) -> int:
        return sum(v[1] for lab, v in self.tcp_metrics() if all(lab[k] == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("l4")
    certs = {
        "api-v2": self_signed(tmp, ["api.example.com"]),
        "api-default": self_signed(tmp, ["default.example.com"]),
        "org": self_signed(tmp, ["*.example.org", "deep.sub.example.org"]),
        "egress": self_signed(tmp, ["egress.example.net"]),
    }
    b = {name: Backend(name, tls=certs.get(name)).start()
         for name in ("v1", "v2", "sink", "api-default", "api-v2", "org", "egress")}
    b["decoy"] = Backend("decoy", host="127.0.0.250").start()
    (tmp / "cfg").mkdir()
    (tmp / "cfg" / "l4.yaml").write_text(config(b))
    source = open_config(str(tmp / "cfg"))
    decoy = b["decoy"].port

    def captured(dest):
        return lambda sock: dest

    listeners = {
        "echo": ListenerContext("forward", WEB, fixed_destination=(ECHO, 9000)),
        "echo-admin": ListenerContext("forward", WEB, fixed_destination=(ECHO, 9001)),
        "echo-canary": ListenerContext("forward", CANARY, fixed_destination=(ECHO, 9000)),
        "ops-vip": ListenerContext("outbound", OPS, original_destination=captured(("10.96.0.10", 9000))),
        "ops-other-vip": ListenerContext("outbound", OPS, original_destination=captured(("10.200.0.10", 9000))),
        "api": ListenerContext("forward", WEB, fixed_destination=("api.example.com", 443)),
        "api-vip": ListenerContext("outbound", WEB, original_destination=captured(("10.97.0.1", 443))),
        "egress": ListenerContext("outbound", WEB, original_destination=captured(("127.0.0.250", decoy))),
        "broken": ListenerContext("forward", WEB, fixed_destination=("broken.shop.svc.cluster.local", 7100)),
    }
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    def run():
        asyncio.set_event_loop(loop)

        async def main():
            runtime = ProxyRuntime(source.current, Telemetry(), rand=random.Random(20240601))
            runtime.start()
            state["runtime"] = runtime
            ports = {}
            servers = []
            for name, ctx in listeners.items():
                server = await loop.create_server(protocol_factory(runtime, ctx), "127.0.0.1", 0)
                servers.append(server)
                ports[name] = server.sockets[0].getsockname()[1]
            state["ports"] = ports
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
            for server in servers:
                server.close()
            await runtime.close()

        loop.run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield Env(b, certs, state["ports"], state["runtime"], loop)
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(10)
    loop.close()
    for backend in b.values():
        backend.stop()


def who(reply: bytes) -> str:
    return reply.split(b"|", 1)[0].decode()


def test_tcp_weighted_80_20_split(env):
    n = 300
    counts = {"v1": 0, "v2": 0}
    for i in range(n):
        reply = plain_call(env.ports["echo"], b"conn %d" % i)
        assert reply.endswith(b"|plain|conn %d" % i), reply
        counts[who(reply)] += 1
    # Binomial(300, 0.2): mean 60, sigma 6.9; +-35 is 5 sigma (and the runtime's rand is seeded)
    assert abs(counts["v2"] - 60) <= 35, counts
    assert counts["v1"] + counts["v2"] == n
    # istio_tcp_* carry the chosen destination: subset v2's endpoints are version v2
    opened_v2 = sum(v[0] for lab, v in env.tcp_metrics()
                    if lab["destination_service"] == ECHO and lab["destination_version"] == "v2"
                    and lab["source_workload"] == "web")
    assert opened_v2 == counts["v2"]
    deadline = time.monotonic() + 5
    while env.closed_total(destination_version="v1", source_workload="web") < counts["v1"] \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    series = [(lab, v) for lab, v in env.tcp_metrics()
              if lab["destination_version"] == "v1" and lab["source_workload"] == "web"]
    assert sum(v[1] for _, v in series) == counts["v1"]
    lab = series[0][0]
    assert (lab["destination_app"], lab["destination_service_name"], lab["request_protocol"],
            lab["response_flags"]) == ("tcp-echo", "tcp-echo", "tcp", "-")
    assert sum(v[3] for _, v in series) >= counts["v1"] * len(b"conn 0")


def test_tcp_match_on_port(env):
    assert plain_call(env.ports["echo-admin"], b"admin") == b"sink|plain|admin"


def test_tcp_match_on_source_labels(env):
    for _ in range(5):
        assert plain_call(env.ports["echo-canary"], b"x") == b"v2|plain|x"


def test_tcp_match_on_destination_subnet_of_the_captured_address(env):
    # the ops workload dialled the VIP inside 10.96.0.0/16: the subnet route sends it to sink
    assert plain_call(env.ports["ops-vip"], b"a") == b"sink|plain|a"
    # the same service through its other VIP: the subnet route does not apply, 80/20 split
    assert who(plain_call(env.ports["ops-other-vip"], b"b")) in ("v1", "v2")


def test_tls_route_by_sni_with_a_real_tls_client(env):
    # SNI api.example.com -> the api-v2 service; the client verifies api-v2's certificate
    reply = tls_call(env.ports["api"], "api.example.com", env.certs["api-v2"][0], b"hello")
    assert reply == b"api-v2|tls|hello"
    # a wildcard sniHosts entry (one label or several), verified against org's certificate
    assert tls_call(env.ports["api"], "a.example.org", env.certs["org"][0], b"w") == b"org|tls|w"
    assert tls_call(env.ports["api"], "deep.sub.example.org", env.certs["org"][0], b"d") == b"org|tls|d"
    # through a captured listener (the agent's path), dialling the service's VIP
    reply = tls_call(env.ports["api-vip"], "api.example.com", env.certs["api-v2"][0], b"v")
    assert reply == b"api-v2|tls|v"
    metrics = env.tcp_metrics()
    assert any(lab["destination_service"] == "api-v2.example.com" and lab["destination_version"] == "v2"
               and v[0] >= 2 for lab, v in metrics)


def test_tls_without_matching_sni_or_without_sni_goes_to_the_service(env):
    assert tls_call(env.ports["api"], "unknown.example.com", None, b"u") == b"api-default|tls|u"
    assert tls_call(env.ports["api"], None, None, b"n") == b"api-default|tls|n"
    # the ClientHello's SNI decides, even when the client does not check the certificate
    assert tls_call(env.ports["api"], "api.example.com", None, b"s") == b"api-v2|tls|s"


def test_not_tls_on_a_tls_port_goes_to_the_service(env):
    assert plain_call(env.ports["api"], b"GET / HTTP/1.1\r\n\r\n") == b"api-default|plain|GET / HTTP/1.1\r\n\r\n"
    # a TLS record that is not a handshake: decided at once, no waiting for more bytes
    t0 = time.monotonic()
    assert plain_call(env.ports["api"], b"\x17\x03\x03\x00\x01x") == b"api-default|plain|\x17\x03\x03\x00\x01x"
    assert time.monotonic() - t0 < tcp_mod.SNI_PEEK_TIMEOUT


def test_silent_client_is_routed_without_sni_after_the_timeout(env, monkeypatch):
    monkeypatch.setattr(tcp_mod, "SNI_PEEK_TIMEOUT", 0.3)
    backend = env.b["api-default"]
    before = len(backend.seen)
    with socket.create_connection(("127.0.0.1", env.ports["api"]), timeout=5) as s:
        t0 = time.monotonic()
        time.sleep(0.8)  # say nothing: the proxy must connect upstream on its own after 0.3 s
        s.sendall(b"late")
        reply = s.recv(100)
    assert reply == b"api-default|plain|late"
    mode, data, accepted = backend.seen[before]
    assert data == b"late" and 0.25 <= accepted - t0 < 0.8


def test_half_closed_client_before_a_full_client_hello(env):
    with socket.create_connection(("127.0.0.1", env.ports["api"]), timeout=5) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a record, then EOF
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(100)
    assert reply == b"api-default|plain|\x16\x03\x01"


def test_egress_tls_by_sni_to_an_address_that_is_no_service(env):
    # the client dialled 127.0.0.250:PORT (no service); PORT is the TLS port of a
    # ServiceEntry without addresses, so the SNI picks the service
    reply = tls_call(env.ports["egress"], "egress.example.net", env.certs["egress"][0], b"e")
    assert reply == b"egress|tls|e"
    # no SNI, or an SNI that names nothing: passed through to the original destination
    assert plain_call(env.ports["egress"], b"p") == b"decoy|plain|p"
    with pytest.raises(OSError):
        tls_call(env.ports["egress"], "nothing.example.net", None, b"q")  # decoy speaks no TLS
    assert env.b["decoy"].seen[-1][1].startswith(b"\x16\x03")


def test_route_to_a_missing_cluster_closes_with_nc(env):
    before = env.b["sink"].connections
    with socket.create_connection(("127.0.0.1", env.ports["broken"]), timeout=5) as s:
        s.sendall(b"x")
        try:
            answer = s.recv(100)
        except ConnectionResetError:  # closed with our byte unread: a reset is a close too
            answer = b""
        assert answer == b""
    deadline = time.monotonic() + 5
    while env.closed_total(response_flags="NC") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.closed_total(response_flags="NC", destination_service="nowhere.shop.svc.cluster.local") == 1
    assert env.b["sink"].connections == before


def test_nodeagent_proxy_forward_listener_tcp_split_tls_routes_and_metrics(env, tmp_path):
    """The same configuration through a real `nodeagent proxy` process and its /metrics."""
    from tests.integration.proxy_harness import ProxyProcess, metric_value

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "l4.yaml").write_text(config(env.b))
    (cfg / "web.yaml").write_text("""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: shop}
spec: {address: 127.0.0.9, serviceAccount: web, labels: {app: web, version: v1}}
""")
    proxy = ProxyProcess(cfg, workload="shop/web", extra=(
        "--forward", f"127.0.0.1:0={ECHO}:9000", "--forward", "127.0.0.1:0=api.example.com:443"))
    with proxy:
        echo_port, api_port = proxy.ports[1], proxy.ports[2]
        n = 200
        counts = {"v1": 0, "v2": 0}
        for i in range(n):
            counts[who(plain_call(echo_port, b"p%d" % i))] += 1
        # Binomial(200, 0.2): mean 40, sigma 5.7; +-28 is 5 sigma
        assert abs(counts["v2"] - 40) <= 28, counts
        assert tls_call(api_port, "api.example.com", env.certs["api-v2"][0], b"t") == b"api-v2|tls|t"
        assert tls_call(api_port, None, None, b"d") == b"api-default|tls|d"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = proxy.metrics()
            if metric_value(text, "istio_tcp_connections_closed_total", source_workload="web") >= n + 2:
                break
            time.sleep(0.1)
        for version, count in counts.items():
            labels = dict(source_workload="web", destination_service=ECHO, destination_version=version,
                          destination_app="tcp-echo", request_protocol="tcp", response_flags="-")
            assert metric_value(text, "istio_tcp_connections_opened_total", **labels) == count
            assert metric_value(text, "istio_tcp_connections_closed_total", **labels) == count
            assert metric_value(text, "istio_tcp_received_bytes_total", **labels) >= count * 2
        assert metric_value(text, "istio_tcp_connections_opened_total", source_workload="web",
                            destination_service="api-v2.example.com", destination_version="v2") == 1
        assert metric_value(text, "istio_tcp_connections_opened_total", source_workload="web",
                            destination_service="api.example.com") == 1


def test_client_hello_beyond_the_byte_limit_is_routed_without_sni(env, monkeypatch):
    monkeypatch.setattr(tcp_mod, "SNI_PEEK_MAX", 64)
    monkeypatch.setattr(tcp_mod, "SNI_PEEK_TIMEOUT", 60.0)  # only the byte limit may end the wait
    default, v2 = env.b["api-default"], env.b["api-v2"]
    before = (default.connections, v2.connections)
    # a ClientHello announcing 200 bytes, sent 100 bytes at a time: past 64 bytes the proxy stops
    # looking, routes without SNI (the service itself) and forwards what it has
    hello = b"\x16\x03\x01\x00\xcc" + b"\x01\x00\x00\xc8" + b"\x03\x03" + bytes(98)
    with socket.create_connection(("127.0.0.1", env.ports["api"]), timeout=5) as s:
        s.sendall(hello[:100])
        deadline = time.monotonic() + 3
        while default.connections == before[0] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert (default.connections, v2.connections) == (before[0] + 1, before[1])
