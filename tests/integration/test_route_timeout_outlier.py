"""Regression test: a route ``timeout`` that expires while the upstream has not answered must be
reported to outlier detection (nodeagent/proxy/http.py, Exchange._route_timeout; before the
fix only a per-try timeout, _try_timeout, recorded its 504).
Envoy's Router::Filter::onResponseTimeout records LocalOriginTimeout with the timeout
response code (504) for every upstream request still awaiting headers, so an endpoint
that keeps timing out is ejected (504 counts for consecutive5xxErrors and
consecutiveGatewayErrors). Before the fix it kept receiving its share of requests, each a 504.

"""
from __future__ import annotations

import http.client

from tests.integration.proxy_harness import ProxyProcess
from tests.integration.upstream import UpstreamServer


def test_an_endpoint_that_trips_the_route_timeout_is_ejected(tmp_path):
    slow = UpstreamServer("slow", host="127.0.9.70").start()
    slow.delay = 2.0
    good = UpstreamServer("good", host="127.0.9.71").start()
    eps = "".join(f"  - {{address: {s.host}, ports: {{http: {s.port}}}}}\n" for s in (slow, good))
    (tmp_path / "c.yaml").write_text(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
{eps}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: shop}}
spec:
  host: web.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 2, interval: 0.1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - timeout: 0.3s
    retries: {{attempts: 0}}
    route:
    - destination: {{host: web.shop.svc.cluster.local}}
""")
    proxy = ProxyProcess(tmp_path, metrics=False).start()
    try:
        statuses = []
        for i in range(10):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", f"/{i}", headers={"Host": "web.shop.svc.cluster.local"})
            statuses.append(conn.getresponse().status)
            conn.close()
        assert statuses.count(504) == 2, f"2 timeouts eject the slow endpoint (Envoy); got {statuses}"
        assert slow.hits == 2
    finally:
        proxy.stop()
        slow.stop()
        good.stop()
