"""Effective cluster policy (DestinationRule merge) and cluster endpoints."""
from __future__ import annotations

from policy.cluster import (DEFAULT_LB, UNLIMITED, ClusterKey, HashPolicy, LbPolicy, cluster_endpoints,
                            cluster_policy, lb_policy_from)
from policy.model import (EMPTY_MAP, ClientTLSSettings, ConnectionPoolSettings, ConsistentHashLB,
                          DestinationRule, HTTPCookie, HTTPSettings, LoadBalancerSettings,
                          OutlierDetection, PortTrafficPolicy, Resource, RingHash, ServiceEntry,
                          ServicePort, SourceRef, Subset, TCPSettings, TrafficPolicy, WorkloadEntry,
                          frozen_map)
from policy.outlier import OutlierPolicy
from policy.snapshot import build_snapshot

HOST = "ratings.prod.svc.cluster.local"


def res(kind: str, name: str, ns: str, spec, line: int = 1) -> Resource:
    return Resource(kind, "networking.istio.io/v1", name, ns, EMPTY_MAP, EMPTY_MAP, spec,
                    SourceRef(f"{name}.yaml", line))


def service_entry(location: str = "MESH_INTERNAL") -> Resource:
    return res("ServiceEntry", "ratings", "prod", ServiceEntry(
        hosts=(HOST,),
        ports=(ServicePort(9080, "HTTP", "http"), ServicePort(9090, "GRPC", "grpc", target_port=19090)),
        location=location, resolution="STATIC",
        endpoints=(
            WorkloadEntry(address="10.0.0.1", labels=frozen_map({"version": "v1"})),
            WorkloadEntry(address="10.0.0.2", labels=frozen_map({"version": "v2"}),
                          ports=frozen_map({"http": 8080}), weight=3),
            WorkloadEntry(address="10.0.0.3", labels=frozen_map({"version": "v2", "canary": "yes"})),
        )))


def snapshot(dr: DestinationRule | None = None, location: str = "MESH_INTERNAL", dr_ns: str = "prod"):
    resources = [service_entry(location)]
    if dr is not None:
        resources.append(res("DestinationRule", "ratings", dr_ns, dr, 2))
    return build_snapshot(resources)


# -- endpoints -----------------------------------------------------------------

def test_all_endpoints_with_ports_and_weights():
    snap = snapshot()
    eps = cluster_endpoints(snap, ClusterKey(HOST, None, 9080), "prod")
    assert [(e.id, e.weight) for e in eps] == [("10.0.0.1:9080", 1), ("10.0.0.2:8080", 3),
                                               ("10.0.0.3:9080", 1)]
    grpc = cluster_endpoints(snap, ClusterKey(HOST, None, 9090), "prod")
    assert [e.port for e in grpc] == [19090, 19090, 19090]     # targetPort


def test_subset_selects_by_labels():
    dr = DestinationRule(host="ratings", subsets=(
        Subset("v2", frozen_map({"version": "v2"})),
        Subset("canary", frozen_map({"version": "v2", "canary": "yes"}))))
    snap = snapshot(dr)
    v2 = cluster_endpoints(snap, ClusterKey(HOST, "v2", 9080), "prod")
    assert [e.address for e in v2] == ["10.0.0.2", "10.0.0.3"]
    canary = cluster_endpoints(snap, ClusterKey(HOST, "canary", 9080), "prod")
    assert [e.address for e in canary] == ["10.0.0.3"]


def test_unknown_subset_port_or_host_has_no_endpoints():
    snap = snapshot(DestinationRule(host="ratings", subsets=(Subset("v1", frozen_map({"version": "v1"})),)))
    assert cluster_endpoints(snap, ClusterKey(HOST, "v9", 9080), "prod") == ()
    assert cluster_endpoints(snap, ClusterKey(HOST, None, 1234), "prod") == ()
    assert cluster_endpoints(snap, ClusterKey("nope.prod.svc.cluster.local", None, 9080), "prod") == ()


def test_endpoints_tuple_is_cached_per_snapshot():
    snap = snapshot()
    key = ClusterKey(HOST, None, 9080)
    assert cluster_endpoints(snap, key, "prod") is cluster_endpoints(snap, key, "prod")
    other = snapshot()
    assert cluster_endpoints(other, key, "prod") is not cluster_endpoints(snap, key, "prod")


# -- policy defaults -------------------------------------------------------------

def test_defaults_without_destination_rule():
    p = cluster_policy(snapshot(), ClusterKey(HOST, None, 9080), "prod")
    assert p.lb == DEFAULT_LB == LbPolicy("LEAST_REQUEST")
    assert (p.max_connections, p.max_pending_requests, p.max_requests, p.max_retries) == (UNLIMITED,) * 4
    assert p.max_requests_per_connection == 0
    assert p.connect_timeout == 10.0 and p.idle_timeout == 3600.0
    assert p.outlier is None
    assert p.tls_mode == "ISTIO_MUTUAL"
    assert p.destination_rule is None


def test_external_service_defaults_to_plaintext():
    p = cluster_policy(snapshot(location="MESH_EXTERNAL"), ClusterKey(HOST, None, 9080), "prod")
    assert p.tls_mode == "DISABLE"


def test_policy_is_cached():
    snap = snapshot()
    k = ClusterKey(HOST, None, 9080)
    assert cluster_policy(snap, k, "prod") is cluster_policy(snap, k, "prod")


# -- merging host / subset / port -------------------------------------------------

def full_dr() -> DestinationRule:
    return DestinationRule(
        host="ratings",
        traffic_policy=TrafficPolicy(
            load_balancer=LoadBalancerSettings(simple="ROUND_ROBIN"),
            connection_pool=ConnectionPoolSettings(
                tcp=TCPSettings(max_connections=99, connect_timeout=6.0),
                http=HTTPSettings(http2_max_requests=33, max_requests_per_connection=65, max_retries=4,
                                  http1_max_pending_requests=14, idle_timeout=120.0)),
            outlier_detection=OutlierDetection(interval=0.008, base_ejection_time=60.0, max_ejection_percent=11),
            tls=ClientTLSSettings(mode="DISABLE"),
            port_level_settings=(PortTrafficPolicy(
                port=9090, load_balancer=LoadBalancerSettings(simple="RANDOM")),),
        ),
        subsets=(
            Subset("v1", frozen_map({"version": "v1"})),
            Subset("v2", frozen_map({"version": "v2"}), TrafficPolicy(
                load_balancer=LoadBalancerSettings(consistent_hash=ConsistentHashLB(
                    http_cookie=HTTPCookie(name="Cookie", ttl=30.0), minimum_ring_size=42)),
                port_level_settings=(PortTrafficPolicy(
                    port=9090, connection_pool=ConnectionPoolSettings(tcp=TCPSettings(max_connections=7))),),
            )),
        ))


def test_host_level_policy():
    p = cluster_policy(snapshot(full_dr()), ClusterKey(HOST, None, 9080), "prod")
    assert p.lb == LbPolicy("ROUND_ROBIN")
    assert (p.max_connections, p.connect_timeout) == (99, 6.0)
    assert (p.max_requests, p.max_requests_per_connection, p.max_retries, p.max_pending_requests) == (33, 65, 4, 14)
    assert p.idle_timeout == 120.0
    assert p.outlier == OutlierPolicy(consecutive_5xx=5, consecutive_gateway=0, interval=0.008,
                                      base_ejection_time=60.0, max_ejection_percent=11.0)
    assert p.tls_mode == "DISABLE"
    assert p.destination_rule == "prod/ratings"


def test_subset_without_policy_inherits_host_level():
    p = cluster_policy(snapshot(full_dr()), ClusterKey(HOST, "v1", 9080), "prod")
    assert p.lb == LbPolicy("ROUND_ROBIN") and p.max_connections == 99


def test_subset_replaces_only_the_sections_it_sets():
    p = cluster_policy(snapshot(full_dr()), ClusterKey(HOST, "v2", 9080), "prod")
    assert p.lb == LbPolicy("RING_HASH", HashPolicy("cookie", "Cookie", None, 30.0), 42)
    assert p.max_connections == 99 and p.outlier is not None and p.tls_mode == "DISABLE"


def test_port_level_settings_replace_all_sections_with_defaults():
    # host-level port 9090 sets only loadBalancer: connectionPool/outlier/tls fall back to defaults
    p = cluster_policy(snapshot(full_dr()), ClusterKey(HOST, None, 9090), "prod")
    assert p.lb == LbPolicy("RANDOM")
    assert p.max_connections == UNLIMITED and p.connect_timeout == 10.0
    assert p.outlier is None
    assert p.tls_mode == "ISTIO_MUTUAL"


def test_subset_port_level_wins_over_everything():
    p = cluster_policy(snapshot(full_dr()), ClusterKey(HOST, "v2", 9090), "prod")
    assert p.max_connections == 7
    assert p.lb == DEFAULT_LB and p.outlier is None


def test_subset_port_level_for_another_port_does_not_apply():
    p = cluster_policy(snapshot(full_dr()), ClusterKey(HOST, "v2", 9080), "prod")
    assert p.max_connections == 99


def test_destination_rule_in_another_namespace_is_found_from_the_client_namespace():
    dr = DestinationRule(host=HOST, traffic_policy=TrafficPolicy(
        load_balancer=LoadBalancerSettings(simple="RANDOM")))
    snap = snapshot(dr, dr_ns="client")
    assert cluster_policy(snap, ClusterKey(HOST, None, 9080), "client").lb == LbPolicy("RANDOM")


# -- load balancer settings ---------------------------------------------------------

def test_lb_policy_translation():
    assert lb_policy_from(None) == DEFAULT_LB
    assert lb_policy_from(LoadBalancerSettings(simple="LEAST_CONN")) == LbPolicy("LEAST_REQUEST")
    assert lb_policy_from(LoadBalancerSettings(simple="UNSPECIFIED")) == LbPolicy("LEAST_REQUEST")
    assert lb_policy_from(LoadBalancerSettings(simple="PASSTHROUGH")) == LbPolicy("PASSTHROUGH")
    ch = lambda **kw: lb_policy_from(LoadBalancerSettings(consistent_hash=ConsistentHashLB(**kw)))
    assert ch(http_header_name="X-User") == LbPolicy("RING_HASH", HashPolicy("header", "x-user"), 1024)
    assert ch(use_source_ip=True) == LbPolicy("RING_HASH", HashPolicy("source_ip", None), 1024)
    assert ch(http_query_parameter_name="u") == LbPolicy("RING_HASH", HashPolicy("query", "u"), 1024)
    assert ch(http_header_name="h", ring_hash=RingHash(2048)).minimum_ring_size == 2048
    assert ch(http_header_name="h", minimum_ring_size=64).minimum_ring_size == 64


def test_cluster_key_renders_as_envoy_cluster_name():
    assert str(ClusterKey(HOST, "v1", 9080)) == f"outbound|9080|v1|{HOST}"
    assert str(ClusterKey(HOST, None, 9080)) == f"outbound|9080||{HOST}"


def test_explicit_client_tls_settings():
    dr = DestinationRule(host="ratings", traffic_policy=TrafficPolicy(tls=ClientTLSSettings(
        mode="SIMPLE", sni="ratings.example.com", subject_alt_names=("spiffe://x/ns/prod/sa/ratings",))))
    p = cluster_policy(snapshot(dr), ClusterKey(HOST, None, 9080), "prod")
    assert (p.tls_mode, p.sni, p.subject_alt_names) == ("SIMPLE", "ratings.example.com",
                                                         ("spiffe://x/ns/prod/sa/ratings",))


def test_http_idle_timeout_wins_over_tcp_idle_timeout():
    dr = DestinationRule(host="ratings", traffic_policy=TrafficPolicy(connection_pool=ConnectionPoolSettings(
        tcp=TCPSettings(idle_timeout=50.0))))
    assert cluster_policy(snapshot(dr), ClusterKey(HOST, None, 9080), "prod").idle_timeout == 50.0
    dr = DestinationRule(host="ratings", traffic_policy=TrafficPolicy(connection_pool=ConnectionPoolSettings(
        tcp=TCPSettings(idle_timeout=50.0), http=HTTPSettings(idle_timeout=20.0))))
    assert cluster_policy(snapshot(dr), ClusterKey(HOST, None, 9080), "prod").idle_timeout == 20.0
