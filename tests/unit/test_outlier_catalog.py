"""The shipped catalog config end to end through the pure core: YAML -> snapshot
-> route -> cluster policy -> picker + outlier detector, with a fake clock."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from policy.cluster import ClusterKey, LbPolicy, cluster_endpoints, cluster_policy
from policy.lb import LeastRequestPicker, make_picker
from nodeagent.configfiles import load_file
from policy.outlier import OutlierDetector
from policy.routing import RequestAttrs, RoutePlan, plan_request
from policy.snapshot import WorkloadRef, build_snapshot

CATALOG = Path(__file__).resolve().parents[2] / "nodeagent" / "defaults" / "catalog.yaml"
HOST = "catalog.shop.svc.cluster.local"
CLIENT = WorkloadRef(name="web", namespace="shop", service_account="web", labels={"app": "web"},
                     address="127.0.5.1")


@pytest.fixture(scope="module")
def snap():
    loaded = load_file(CATALOG)
    assert loaded.ok, loaded.errors
    return build_snapshot(loaded.resources)


def request(path: str) -> RequestAttrs:
    return RequestAttrs("GET", "http", "catalog", path, {}, 80, CLIENT)


def test_catalog_routes_by_prefix(snap):
    r = random.Random(0)
    new = plan_request(snap, request("/newcatalog/items?page=2"), r)
    assert isinstance(new, RoutePlan) and new.route_name == "new-catalog"
    assert new.cluster == ClusterKey(HOST, "v2", 80)
    old = plan_request(snap, request("/items"), r)
    assert old.route_name == "default" and old.cluster == ClusterKey(HOST, "v1", 80)
    assert old.virtual_service == "shop/catalog"


def test_catalog_cluster_policy(snap):
    p = cluster_policy(snap, ClusterKey(HOST, "v1", 80), "shop")
    assert p.lb == LbPolicy("LEAST_REQUEST")          # LEAST_CONN
    o = p.outlier
    assert (o.consecutive_gateway, o.consecutive_5xx) == (5, 0)
    assert (o.interval, o.base_ejection_time, o.max_ejection_percent) == (300.0, 900.0, 10.0)
    eps = cluster_endpoints(snap, ClusterKey(HOST, "v1", 80), "shop")
    assert [e.id for e in eps] == ["127.0.1.1:8080", "127.0.1.2:8080"]


def test_catalog_replica_failing_5_times_is_out_for_15_minutes(snap):
    key = ClusterKey(HOST, "v1", 80)
    policy = cluster_policy(snap, key, "shop")
    eps = cluster_endpoints(snap, key, "shop")
    picker = make_picker(policy.lb)
    assert isinstance(picker, LeastRequestPicker)
    det = OutlierDetector(policy.outlier, now=0.0, endpoint_ids=[e.id for e in eps])
    bad = eps[0].id
    r = random.Random(4)

    now = 30.0
    events = [det.record_result(bad, 503, now + i) for i in range(5)]
    assert events[:4] == [None] * 4 and events[4].endpoint_id == bad
    # 15 minutes of traffic, sweeping every 5 minutes: the bad replica gets nothing
    t = now + 5
    while t < 1200.0:
        if t >= det.next_sweep:
            assert det.sweep(det.next_sweep) == []
        assert picker.pick(eps, None, r, exclude=det.ejected()).id != bad
        t += 7.0
    # the first sweep after 15 minutes readmits it, and it receives requests again
    assert det.next_sweep == 1200.0
    assert det.sweep(1200.0) == [bad]
    assert bad in {picker.pick(eps, None, r, exclude=det.ejected()).id for _ in range(50)}
