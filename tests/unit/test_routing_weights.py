"""Property tests of the weighted destination split."""
from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from policy.model import (EMPTY_MAP, Destination, DestinationRule, HTTPRoute, HTTPRouteDestination,
                          Resource, ServiceEntry, ServicePort, SourceRef, Subset, VirtualService,
                          WorkloadEntry, frozen_map)
from policy.routing import RequestAttrs, plan_request
from policy.snapshot import build_snapshot

HOST = "svc.default.svc.cluster.local"
N_SUBSETS = 5


def res(kind, name, spec):
    return Resource(kind, "networking.istio.io/v1", name, "default", EMPTY_MAP, EMPTY_MAP, spec,
                    SourceRef("w.yaml", 1))


def snapshot(weights: list[int]):
    se = ServiceEntry(hosts=(HOST,), ports=(ServicePort(80, "HTTP", "http"),), location="MESH_INTERNAL",
                      resolution="STATIC",
                      endpoints=tuple(WorkloadEntry(address=f"10.0.0.{i + 1}", labels=frozen_map({"v": str(i)}))
                                      for i in range(N_SUBSETS)))
    dr = DestinationRule(host=HOST, subsets=tuple(Subset(f"s{i}", frozen_map({"v": str(i)}))
                                                  for i in range(N_SUBSETS)))
    vs = VirtualService(hosts=(HOST,), http=(HTTPRoute(route=tuple(
        HTTPRouteDestination(Destination(HOST, f"s{i}"), w) for i, w in enumerate(weights))),))
    return build_snapshot([res("ServiceEntry", "svc", se), res("DestinationRule", "svc", dr),
                           res("VirtualService", "svc", vs)])


@st.composite
def weights_summing_to_100(draw):
    n = draw(st.integers(min_value=2, max_value=N_SUBSETS))
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=n - 1, max_size=n - 1)))
    bounds = [0] + cuts + [100]
    return [bounds[i + 1] - bounds[i] for i in range(n)]


REQ = RequestAttrs("GET", "http", HOST, "/", {}, 80, None)


@settings(max_examples=30, deadline=None)
@given(weights_summing_to_100())
def test_split_frequencies_converge_to_weights_and_zero_is_never_chosen(weights):
    snap = snapshot(weights)
    r = random.Random(",".join(map(str, weights)))    # deterministic per example
    n = 3000
    counts = Counter(plan_request(snap, REQ, r).cluster.subset for _ in range(n))
    for i, w in enumerate(weights):
        share = counts.get(f"s{i}", 0) / n
        if w == 0:
            assert share == 0
        else:
            # 3000 draws: standard deviation <= 0.92 percentage points; allow ~5 sigma
            assert abs(share - w / 100) < 0.045, (weights, counts)


def test_single_destination_without_weight_gets_everything():
    se_only = snapshot([100])
    r = random.Random(0)
    assert {plan_request(se_only, REQ, r).cluster.subset for _ in range(100)} == {"s0"}
    snap = build_snapshot([r_ for r_ in se_only.resources if r_.kind != "VirtualService"] + [
        res("VirtualService", "svc", VirtualService(hosts=(HOST,), http=(HTTPRoute(
            route=(HTTPRouteDestination(Destination(HOST, "s3")),)),)))])
    assert {plan_request(snap, REQ, r).cluster.subset for _ in range(100)} == {"s3"}
