"""VirtualService ``tcp`` routes: per-connection destination choice."""
from __future__ import annotations

import random
from collections import Counter

from policy.cluster import ClusterKey
from policy.loader import load_text
from policy.routing import plan_tcp, tcp_route_table
from policy.snapshot import WorkloadRef, build_snapshot

DB = "db.default.svc.cluster.local"
DB_V2 = "db-v2.default.svc.cluster.local"

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.default.svc.cluster.local]
  addresses: [10.96.0.10]
  ports: [{number: 27017, name: tcp-mongo, protocol: TCP}, {number: 9000, name: tcp-admin, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-v2, namespace: default}
spec:
  hosts: [db-v2.default.svc.cluster.local]
  ports: [{number: 27017, name: tcp-mongo, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: default}
spec:
  host: db
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""

APP = WorkloadRef("app", "default", "app", {"app": "web"}, "10.9.0.1")
BATCH = WorkloadRef("batch", "jobs", "batch", {"app": "batch"}, "10.9.0.2")


def snapshot(tcp: str = ""):
    text = SERVICES
    if tcp:
        text += f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db]
  tcp:
{tcp}"""
    loaded = load_text(text, "tcp.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    return build_snapshot(loaded.resources)


def pick(snap, port=27017, source=APP, ip="10.96.0.10", seed=0):
    return plan_tcp(snap, snap.services[DB], port, source, ip, random.Random(seed))


def test_no_virtual_service_goes_to_the_service():
    d = pick(snapshot())
    assert d.cluster == ClusterKey(DB, None, 27017) and d.known


def test_matches_port_source_and_subnet_in_order():
    snap = snapshot("""  - match: [{port: 9000}]
    route: [{destination: {host: db, subset: v2}}]
  - match: [{sourceNamespace: jobs}]
    route: [{destination: {host: db-v2}}]
  - match: [{sourceLabels: {app: web}, destinationSubnets: [10.96.0.0/16]}]
    route: [{destination: {host: db, subset: v1}}]""")
    assert pick(snap, port=9000).cluster == ClusterKey(DB, "v2", 9000)
    assert pick(snap, source=BATCH).cluster == ClusterKey(DB_V2, None, 27017)
    assert pick(snap).cluster == ClusterKey(DB, "v1", 27017)
    # no rule matches: Istio falls back to the service itself
    assert pick(snap, ip="192.168.1.1").cluster == ClusterKey(DB, None, 27017)
    assert pick(snap, source=None).cluster == ClusterKey(DB, None, 27017)


def test_weighted_tcp_split():
    snap = snapshot("""  - route:
    - {destination: {host: db, subset: v1}, weight: 75}
    - {destination: {host: db, subset: v2}, weight: 25}""")
    r = random.Random(9)
    svc = snap.services[DB]
    counts = Counter(plan_tcp(snap, svc, 27017, APP, None, r).cluster.subset for _ in range(4000))
    assert abs(counts["v1"] / 4000 - 0.75) < 0.03


def test_catch_all_tcp_route_replaces_the_fallback():
    snap = snapshot("""  - route: [{destination: {host: db-v2}}]""")
    table = tcp_route_table(snap, snap.services[DB], 27017, "default")
    assert len(table) == 1
    assert pick(snap).cluster == ClusterKey(DB_V2, None, 27017)


def test_unknown_tcp_destination_is_reported():
    snap = snapshot("""  - route: [{destination: {host: nowhere}}]""")
    assert not pick(snap).known


def test_gateway_only_tcp_match_is_ignored():
    snap = snapshot("""  - match: [{gateways: [edge]}]
    route: [{destination: {host: db-v2}}]""")
    assert pick(snap).cluster == ClusterKey(DB, None, 27017)
