"""Istio's own sample YAML, loaded unchanged, through routing and cluster policy."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from policy.cluster import ClusterKey, HashPolicy, LbPolicy, cluster_policy
from nodeagent.configfiles import load_paths
from policy.loader import load_text
from policy.outlier import OutlierPolicy
from policy.retry import RetryPolicy, DEFAULT_RETRY_POLICY
from policy.routing import Reject, RequestAttrs, RoutePlan, plan_request
from policy.snapshot import WorkloadRef, build_snapshot

# The Kubernetes Services the bookinfo samples assume, as ServiceEntries.
SERVICES = "\n---\n".join(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - {{address: 10.1.{i}.1, labels: {{version: v1}}}}
  - {{address: 10.1.{i}.2, labels: {{version: v2}}}}
  - {{address: 10.1.{i}.3, labels: {{version: v3}}}}
""" for i, (name, port) in enumerate([("reviews", 9080), ("ratings", 9080), ("httpbin", 8000)]))

HTTPBIN_SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: default}
spec:
  host: httpbin
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

PRODUCTPAGE = WorkloadRef("productpage-v1", "default", "bookinfo-productpage",
                          {"app": "productpage", "version": "v1"}, "10.9.0.1")


def snapshot(samples_dir, *files: str, services: bool = True, extra_yaml: str = ""):
    loaded = load_paths([samples_dir / f for f in files])
    assert loaded.ok, [str(e) for e in loaded.errors]
    resources = list(loaded.resources)
    if services:
        extra = load_text(SERVICES + extra_yaml, "services.yaml")
        assert extra.ok, [str(e) for e in extra.errors]
        resources = extra.resources + resources
    return build_snapshot(resources)


def req(authority: str, path: str = "/", headers=None, source=PRODUCTPAGE, port: int = 9080) -> RequestAttrs:
    return RequestAttrs("GET", "http", authority, path, headers or {}, port, source)


def test_reviews_jason_v2_others_v3(samples_dir):
    snap = snapshot(samples_dir, "bookinfo-networking/virtual-service-reviews-jason-v2-v3.yaml",
                    "bookinfo-networking/destination-rule-all.yaml")
    r = random.Random(0)
    assert plan_request(snap, req("reviews", headers={"end-user": "jason"}), r).cluster.subset == "v2"
    assert plan_request(snap, req("reviews", headers={"end-user": "alice"}), r).cluster.subset == "v3"
    assert plan_request(snap, req("reviews"), r).cluster.subset == "v3"


def test_reviews_80_20(samples_dir):
    snap = snapshot(samples_dir, "bookinfo-networking/virtual-service-reviews-80-20.yaml",
                    "bookinfo-networking/destination-rule-all.yaml")
    r = random.Random(1)
    counts = Counter(plan_request(snap, req("reviews:9080"), r).cluster.subset for _ in range(5000))
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v1"] / 5000 - 0.8) < 0.03


def test_ratings_delay_for_jason(samples_dir):
    snap = snapshot(samples_dir, "bookinfo-networking/virtual-service-ratings-test-delay.yaml",
                    "bookinfo-networking/destination-rule-all.yaml")
    r = random.Random(0)
    jason = plan_request(snap, req("ratings", headers={"end-user": "jason"}), r)
    assert jason.fault_delay == 7.0 and jason.cluster == ClusterKey("ratings.default.svc.cluster.local", "v1", 9080)
    assert plan_request(snap, req("ratings"), r).fault_delay is None


def test_ratings_abort_for_jason(samples_dir):
    snap = snapshot(samples_dir, "bookinfo-networking/virtual-service-ratings-test-abort.yaml",
                    "bookinfo-networking/destination-rule-all.yaml")
    r = random.Random(0)
    assert plan_request(snap, req("ratings", headers={"end-user": "jason"}), r).fault_abort == 500
    assert plan_request(snap, req("ratings"), r).fault_abort is None


def test_mirror(samples_dir):
    snap = snapshot(samples_dir, "more/virtual-service-mirror.yaml", extra_yaml="\n---\n" + HTTPBIN_SUBSETS)
    p = plan_request(snap, req("httpbin:8000", port=8000), random.Random(0))
    assert p.cluster == ClusterKey("httpbin.default.svc.cluster.local", "v1", 8000)
    assert p.mirrors == (ClusterKey("httpbin.default.svc.cluster.local", "v2", 8000),)


def test_timeout_and_retries(samples_dir):
    snap = snapshot(samples_dir, "more/virtual-service-timeout.yaml", "more/virtual-service-retries.yaml",
                    "bookinfo-networking/destination-rule-all.yaml")
    r = random.Random(0)
    reviews = plan_request(snap, req("reviews"), r)
    assert (reviews.timeout, reviews.retry) == (0.5, DEFAULT_RETRY_POLICY)
    ratings = plan_request(snap, req("ratings"), r)
    assert ratings.timeout is None
    assert ratings.retry == RetryPolicy(3, 2.0, DEFAULT_RETRY_POLICY.retry_on, frozenset({503}))


def test_fault_injection_sample_matches_on_header_and_source_labels(samples_dir):
    snap = snapshot(samples_dir, "more/virtual-service-fault-injection.yaml", services=False)
    v1_client = WorkloadRef("client", "testns", "client", {"version": "v1"}, "10.9.0.2")
    r = random.Random(0)
    # matched: the route's destination host "c" exists nowhere, so Envoy has no cluster for it
    assert plan_request(snap, req("fault.test.istio.io:8080", headers={"version": "v2"},
                                  source=v1_client, port=8080), r) == Reject(503, "NC")
    # no match (source labels differ): the VirtualService has no other rule
    other = WorkloadRef("client", "testns", "client", {"version": "v2"}, "10.9.0.3")
    assert plan_request(snap, req("fault.test.istio.io:8080", headers={"version": "v2"},
                                  source=other, port=8080), r) == Reject(404, "NR")


def test_destination_rule_all_fields_sample(samples_dir):
    snap = snapshot(samples_dir, "more/destination-rule-all-connectionpool-outlier-consistenthash.yaml",
                    services=False)
    host = "destall.default.svc.cluster.local"
    p = cluster_policy(snap, ClusterKey(host, None, 81), "testns")
    assert p.lb == LbPolicy("ROUND_ROBIN")
    assert (p.max_connections, p.connect_timeout) == (99, 6.0)
    assert (p.max_requests, p.max_requests_per_connection, p.max_retries, p.max_pending_requests) == (33, 65, 4, 14)
    assert p.outlier == OutlierPolicy(consecutive_5xx=5, consecutive_gateway=0, interval=0.008,
                                      base_ejection_time=60.0, max_ejection_percent=11.0)
    assert p.tls_mode == "DISABLE"
    v2 = cluster_policy(snap, ClusterKey(host, "v2", 81), "testns")
    assert v2.lb == LbPolicy("RING_HASH", HashPolicy("cookie", "Cookie", None, 30.0), 42)
    assert v2.max_connections == 99


def test_circuit_breaking_sample(samples_dir):
    snap = snapshot(samples_dir, "more/destination-rule-circuit-breaking.yaml")
    p = cluster_policy(snap, ClusterKey("httpbin.default.svc.cluster.local", None, 8000), "default")
    assert (p.max_connections, p.max_pending_requests, p.max_requests_per_connection) == (1, 1, 1)
    assert p.outlier == OutlierPolicy(consecutive_5xx=1, consecutive_gateway=0, interval=1.0,
                                      base_ejection_time=180.0, max_ejection_time=300.0,
                                      max_ejection_percent=100.0)


@pytest.mark.parametrize("name", ["virtual-service-all-v1.yaml", "virtual-service-reviews-v3.yaml",
                                  "virtual-service-reviews-test-v2.yaml", "virtual-service-reviews-90-10.yaml",
                                  "virtual-service-reviews-50-v3.yaml", "virtual-service-reviews-v2-v3.yaml",
                                  "virtual-service-details-v2.yaml"])
def test_every_bookinfo_virtual_service_plans(samples_dir, name):
    snap = snapshot(samples_dir, f"bookinfo-networking/{name}", "bookinfo-networking/destination-rule-all.yaml")
    r = random.Random(0)
    for vs in snap.virtual_services:
        host = vs.spec.hosts[0]
        svc = snap.resolve_host(host, "default")
        if svc is None:
            continue        # productpage/details have no ServiceEntry here
        p = plan_request(snap, req(host, headers={"end-user": "jason"}), r)
        assert isinstance(p, RoutePlan) and p.cluster.subset in {"v1", "v2", "v3"}
