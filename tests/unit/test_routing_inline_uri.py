"""select_route tests a match on the uri alone (exact or prefix, case-sensitive) inline
instead of calling its compiled check: both must decide the same for every path."""
from __future__ import annotations

import random

from policy.loader import load_text
from policy.routing import RequestAttrs, Reject, route_table, select_route
from policy.snapshot import build_snapshot

CONFIG = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - name: exact
    match: [{uri: {exact: /exact}}]
    route: [{destination: {host: web}}]
  - name: prefix
    match: [{uri: {prefix: /pre}}]
    route: [{destination: {host: web}}]
  - name: nocase
    match: [{uri: {prefix: /Case}, ignoreUriCase: true}]
    route: [{destination: {host: web}}]
  - name: uri-and-method
    match: [{uri: {prefix: /both}, method: {exact: POST}}]
    route: [{destination: {host: web}}]
  - name: regex
    match: [{uri: {regex: "/r[0-9]+"}}]
    route: [{destination: {host: web}}]
"""


def test_inline_uri_tests_decide_as_the_compiled_checks():
    loaded = load_text(CONFIG, "web.yaml")
    assert loaded.ok, loaded.errors
    snapshot = build_snapshot(loaded.resources)
    service = snapshot.services["web.default.svc.cluster.local"]
    table = route_table(snapshot, service, 80, "default")
    kinds = {route.name: [m.uri_only for m in route.matches] for route in table}
    assert kinds == {"exact": [1], "prefix": [2], "nocase": [0], "uri-and-method": [0], "regex": [0]}
    paths = ["/exact", "/exact/", "/exac", "/pre", "/prefix", "/pr", "/case/x", "/CASE", "/Case",
             "/both", "/both/x", "/r12", "/r", "/", "/EXACT", "/Pre"]
    for method in ("GET", "POST"):
        for path in paths:
            req = RequestAttrs(method=method, path=path, authority="web", port=80, scheme="http", headers={}, source=None)
            hit = select_route(table, req, path, random.Random(1))
            expected = next((route.name for route in table if any(m.test(req, path) for m in route.matches)), None)
            got = None if hit.__class__ is Reject else hit[0].name
            assert got == expected, (method, path)
