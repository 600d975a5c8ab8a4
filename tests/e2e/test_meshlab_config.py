"""The mesh's configuration is the shipped sample with only addresses changed
(no root needed): every other field of every object is the sample's own."""
from __future__ import annotations

import copy

import yaml

from nodeagent import meshlab
from policy.loader import load_text
from policy.snapshot import build_snapshot


def test_only_addresses_are_rewritten_and_the_result_loads():
    docs = meshlab.load_documents()
    pods = {name: f"10.250.{1 + i % 2}.{10 + i}" for i, name in enumerate(meshlab.SHOP_PLACEMENT)}
    vips = {name: f"10.250.200.{i + 1}" for i, name in enumerate(sorted(meshlab.service_ports(docs)))}
    text, dropped = meshlab.mesh_config(docs, pods, vips)
    assert dropped == []  # every WorkloadEntry of the sample has a pod
    out = [d for d in yaml.safe_load_all(text) if d]
    assert len(out) == len(docs)
    for (_, original), generated in zip(docs, out):
        expected = copy.deepcopy(original)
        name = expected["metadata"]["name"]
        if expected["kind"] == "WorkloadEntry":
            expected["spec"]["address"] = pods[name]
        elif expected["kind"] == "ServiceEntry":
            expected["spec"]["addresses"] = [vips[name]]
        assert generated == expected, name
    snapshot = build_snapshot(load_text(text, "mesh.yaml").resources)
    catalog = snapshot.services["catalog.shop.svc.cluster.local"]
    assert catalog.addresses == (vips["catalog"],)
    assert sorted(e.address for e in catalog.endpoints) == sorted(
        pods[n] for n in ("catalog-v1a", "catalog-v1b", "catalog-v2"))


def test_a_workload_without_a_pod_is_left_out_and_named():
    docs = meshlab.load_documents()
    text, dropped = meshlab.mesh_config(docs, {"catalog-v2": "10.250.2.2"}, {})
    assert "WorkloadEntry catalog-v1a (catalog.yaml)" in dropped
    kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
    assert kinds.count("WorkloadEntry") == 1 and kinds.count("AuthorizationPolicy") == 3


def test_pods_come_from_the_samples_workload_entries():
    workloads = meshlab.sample_workloads(meshlab.load_documents())
    assert set(workloads) == set(meshlab.SHOP_PLACEMENT)
    r2 = workloads["reviews-v2"]
    assert (r2.namespace, r2.service_account, r2.port, r2.service, r2.version) == \
        ("shop", "bookinfo-reviews", 9080, "reviews", "v2")
    assert workloads["catalog-v1b"].port == 8080 and workloads["catalog-v1b"].service == "catalog"
