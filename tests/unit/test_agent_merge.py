"""An enrolled workload and a WorkloadEntry with the same address are ONE workload."""
from __future__ import annotations

from types import MappingProxyType

from nodeagent.agent.workload import merge_workloads, spec_from_json
from policy.snapshot import WorkloadRef


def enrolled(name, ip, sa, labels):
    return spec_from_json({"kind": "netns", "target": f"pod-{name}", "name": name, "namespace": "shop",
                           "service_account": sa, "labels": labels, "ips": [ip]})


def ref(name, ip, sa, labels, ports=None, namespace="shop"):
    return WorkloadRef(name=name, namespace=namespace, service_account=sa, labels=MappingProxyType(labels),
                       address=ip, ports=MappingProxyType(ports or {}))


def test_same_address_is_one_workload_with_the_enrolled_identity():
    spec = enrolled("web", "10.250.0.2", "web-sa", {"app": "web", "version": "v2"})
    entry = ref("web-vm", "10.250.0.2", "legacy-sa", {"app": "web", "version": "v1"}, {"http": 8080})
    merged = merge_workloads([entry], [spec])
    assert len(merged) == 1
    (one,) = merged
    assert one.identity("cluster.local") == "spiffe://cluster.local/ns/shop/sa/web-sa"
    assert (one.name, one.labels) == ("web", {"app": "web", "version": "v2"})
    assert one.addresses == ("10.250.0.2",)
    assert one.ports == {"http": 8080}  # the WorkloadEntry's named ports are kept
    assert one.sources == ("enrolled", "WorkloadEntry")
    assert one.spec == spec


def test_ipv6_written_differently_still_matches():
    spec = enrolled("web", "fd00::2", "web-sa", {})
    merged = merge_workloads([ref("web-vm", "fd00:0::0002", "x", {})], [spec])
    assert [w.sources for w in merged] == [("enrolled", "WorkloadEntry")]


def test_distinct_addresses_stay_distinct_enrolled_first():
    spec = enrolled("web", "10.250.0.2", "web-sa", {"app": "web"})
    other = ref("db-vm", "10.250.0.9", "db", {"app": "db"}, {"tcp": 5432}, namespace="data")
    merged = merge_workloads([other], [spec])
    assert [(w.name, w.sources) for w in merged] == [("web", ("enrolled",)), ("db-vm", ("WorkloadEntry",))]
    assert merged[1].identity("td") == "spiffe://td/ns/data/sa/db"
    assert merged[1].spec is None


def test_nothing_enrolled_passes_workload_entries_through():
    entry = ref("db-vm", "10.250.0.9", "", {})
    (one,) = merge_workloads([entry], [])
    assert one.service_account == "default" and one.addresses == ("10.250.0.9",)
