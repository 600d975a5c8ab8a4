"""Regression test (found by writing real-proxy tests; fixed in nodeagent/proxy/tcp.py).

Before the fix, the opaque TCP relay (nodeagent/proxy/tcp.py, TcpRelay._connect) reported every connect
failure to outlier detection (state.record(endpoint, 0, now)) but never a successful
connect, so for TCP services "consecutive" errors are in fact cumulative: an endpoint
whose connects fail one time in two is ejected after consecutive5xxErrors failures in
total. Envoy's tcp_proxy reports a successful connect (LocalOriginConnectSuccessFinal,
counted as a 200 without split_external_local_origin_errors), which resets the
consecutive counters, so it never ejects that endpoint.
"""
from __future__ import annotations

import socket

from tests.integration.proxy_harness import ProxyProcess
from tests.integration.toggle_echo import Toggle

HOST = "127.0.9.60"


def echo_through(port: int) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"ping")
        s.settimeout(5)
        try:
            return s.recv(100)
        except ConnectionResetError:
            return b""
    finally:
        s.close()


def test_a_tcp_endpoint_failing_every_other_connect_is_not_ejected(tmp_path):
    server = Toggle(HOST)
    (tmp_path / "c.yaml").write_text(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: shop}}
spec:
  hosts: [db.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 5432, name: tcp, protocol: TCP}}]
  endpoints: [{{address: {HOST}, ports: {{tcp: {server.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: shop}}
spec:
  host: db.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 3, interval: 0.1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}
""")
    proxy = ProxyProcess(tmp_path, metrics=False, access_log=True,
                         extra=("--forward", "127.0.0.1:0=db.shop.svc.cluster.local:5432")).start()
    try:
        outcomes = []
        for i in range(8):  # refused, served, refused, served, ... never 2 failures in a row
            if i % 2 == 0:
                server.refuse()
                outcomes.append(("refused", echo_through(proxy.ports[1])))
                server.listen()
            else:
                outcomes.append(("served", echo_through(proxy.ports[1])))
        served = [got for kind, got in outcomes if kind == "served"]
        assert served == [b"ping"] * 4, (f"an endpoint with no 3 consecutive failures was ejected: {outcomes}\n"
                                         + "".join(proxy.stdout) + "".join(proxy.stderr))
    finally:
        proxy.stop()
        server.refuse()
