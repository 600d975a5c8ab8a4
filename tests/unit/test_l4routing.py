"""VirtualService ``tls``/``tcp`` routes: per-connection decisions (policy/l4routing.py)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.cluster import ClusterKey
from policy.l4routing import is_tls_port, l4_table, pick_weighted, plan_l4, sni_matches
from policy.loader import load_text
from policy.model import ServicePort
from policy.snapshot import WorkloadRef, build_snapshot

ECHO = "tcp-echo.shop.svc.cluster.local"
EXT = "api.example.com"

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo.shop.svc.cluster.local]
  addresses: [10.96.0.10]
  ports: [{number: 9000, name: tcp, protocol: TCP}, {number: 9001, name: tcp-other, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: shop}
spec:
  host: tcp-echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [10.97.0.1]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 8443, name: other, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: www, namespace: shop}
spec:
  hosts: [www.example.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 10.1.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: sink, namespace: shop}
spec:
  hosts: [sink.shop.svc.cluster.local]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 10.2.0.1}]
"""

WEB = WorkloadRef("web", "shop", "web", {"app": "web", "version": "v1"}, "10.9.0.1")
BATCH = WorkloadRef("batch", "jobs", "batch", {"app": "batch"}, "10.9.0.2")


def snapshot(vs: str = ""):
    text = SERVICES + (("---\n" + vs) if vs else "")
    loaded = load_text(text, "l4.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    return build_snapshot(loaded.resources)


class FixedRandom:
    """A ``random.Random`` stand-in whose draws are given."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def decide(snap, host=ECHO, port=9000, source=WEB, ip="10.96.0.10", sni=None, u=0.0):
    return plan_l4(snap, snap.services[host], port, source, ip, sni, FixedRandom(u, u))


TCP_VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9001}]
    route: [{destination: {host: sink, port: {number: 7000}}}]
  - match: [{sourceNamespace: jobs}]
    route: [{destination: {host: tcp-echo, subset: v2}}]
  - match: [{sourceLabels: {app: web}, destinationSubnets: [10.96.0.0/16]}, {destinationSubnets: ["192.168.7.7"]}]
    route:
    - {destination: {host: tcp-echo, subset: v1}, weight: 80}
    - {destination: {host: tcp-echo, subset: v2}, weight: 20}
  - match: [{gateways: [edge-gateway]}]
    route: [{destination: {host: sink}}]
"""


@pytest.mark.parametrize("case, kwargs, cluster, kind, index", [
    ("port match", dict(port=9001), ClusterKey("sink.shop.svc.cluster.local", None, 7000), "tcp", 0),
    ("sourceNamespace", dict(source=BATCH), ClusterKey(ECHO, "v2", 9000), "tcp", 1),
    ("labels+subnet, u below 0.8", dict(u=0.79), ClusterKey(ECHO, "v1", 9000), "tcp", 2),
    ("labels+subnet, u at 0.8", dict(u=0.8), ClusterKey(ECHO, "v2", 9000), "tcp", 2),
    ("second entry: a /32 written as a bare IP", dict(source=None, ip="192.168.7.7"),
     ClusterKey(ECHO, "v1", 9000), "tcp", 2),
    ("subnet misses: default", dict(ip="10.50.0.1"), ClusterKey(ECHO, None, 9000), "default", None),
    ("unknown destination IP: subnet fails", dict(ip=None), ClusterKey(ECHO, None, 9000), "default", None),
    ("unknown source fails sourceLabels", dict(source=None), ClusterKey(ECHO, None, 9000), "default", None),
    ("label value differs", dict(source=WorkloadRef("w2", "shop", "w2", {"app": "api"}, "")),
     ClusterKey(ECHO, None, 9000), "default", None),
    ("IPv6 destination never in an IPv4 subnet", dict(ip="::ffff:10.96.0.10"),
     ClusterKey(ECHO, None, 9000), "default", None),
])
def test_tcp_route_matching(case, kwargs, cluster, kind, index):
    d = decide(snapshot(TCP_VS), **kwargs)
    assert (d.cluster, d.kind, d.route_index, d.known) == (cluster, kind, index, True), case
    if kind != "default":
        assert d.virtual_service == "shop/tcp-echo"


def test_no_virtual_service_is_the_service_itself():
    d = decide(snapshot())
    assert d.cluster == ClusterKey(ECHO, None, 9000) and d.kind == "default" and d.known


def test_catch_all_tcp_route_wins_over_the_fallback_and_later_routes():
    snap = snapshot("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo]
  tcp:
  - route: [{destination: {host: tcp-echo, subset: v2}}]
  - route: [{destination: {host: tcp-echo, subset: v1}}]
""")
    table = l4_table(snap, snap.services[ECHO], 9000, "shop")
    assert len(table.tcp) == 1
    for src in (WEB, BATCH, None):
        assert decide(snap, source=src, ip=None).cluster == ClusterKey(ECHO, "v2", 9000)


def test_unknown_destination_and_subset_are_reported_not_known():
    snap = snapshot("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9000}]
    route: [{destination: {host: nowhere}}]
  - route: [{destination: {host: tcp-echo, subset: v9}}]
""")
    d = decide(snap)
    assert not d.known and d.cluster.host == "nowhere.shop.svc.cluster.local"
    assert "NC" in d.describe()
    d = decide(snap, port=9001)
    assert not d.known and d.cluster == ClusterKey(ECHO, "v9", 9001)


def test_weights_zero_and_missing_are_never_picked_single_destination_gets_100():
    snap = snapshot("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9001}]
    route: [{destination: {host: tcp-echo, subset: v1}}]
  - route:
    - {destination: {host: tcp-echo, subset: v1}, weight: 0}
    - {destination: {host: sink}}
    - {destination: {host: tcp-echo, subset: v2}, weight: 5}
""")
    for u in (0.0, 0.5, 0.999999):
        assert decide(snap, u=u).cluster == ClusterKey(ECHO, "v2", 9000)
    d = decide(snap, port=9001)
    assert d.weight == 100 and d.cluster == ClusterKey(ECHO, "v1", 9001)


def test_destination_port_rules():
    # destination.port, else the service's only port, else the connection's port
    snap = snapshot("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{sourceNamespace: jobs}]
    route: [{destination: {host: tcp-echo, port: {number: 9001}}}]
  - match: [{port: 9001}]
    route: [{destination: {host: sink}}]
  - route: [{destination: {host: tcp-echo, subset: v1}}]
""")
    assert decide(snap, source=BATCH).cluster == ClusterKey(ECHO, None, 9001)
    assert decide(snap, port=9001).cluster == ClusterKey("sink.shop.svc.cluster.local", None, 7000)
    assert decide(snap).cluster == ClusterKey(ECHO, "v1", 9000)


TLS_VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext, namespace: shop}
spec:
  hosts: [api.example.com, www.example.com, "*.example.org"]
  tls:
  - match: [{port: 443, sniHosts: [api.example.com]}]
    route: [{destination: {host: api.example.com}}]
  - match: [{sniHosts: [www.example.com], sourceLabels: {app: web}}]
    route: [{destination: {host: www.example.com}}]
  - match: [{sniHosts: ["*.example.org"]}]
    route: [{destination: {host: sink, port: {number: 7000}}}]
  tcp:
  - match: [{sourceNamespace: jobs}]
    route: [{destination: {host: sink}}]
"""

SINK = ClusterKey("sink.shop.svc.cluster.local", None, 7000)


@pytest.mark.parametrize("case, kwargs, cluster, kind", [
    ("exact SNI", dict(sni="api.example.com"), ClusterKey(EXT, None, 443), "tls"),
    ("SNI is case-insensitive", dict(sni="API.Example.COM"), ClusterKey(EXT, None, 443), "tls"),
    ("SNI + sourceLabels", dict(sni="www.example.com"), ClusterKey("www.example.com", None, 443), "tls"),
    ("SNI matches, sourceLabels do not: tcp routes, then default",
     dict(sni="www.example.com", source=WorkloadRef("x", "shop", "x", {}, "")), ClusterKey(EXT, None, 443),
     "default"),
    ("wildcard one label", dict(sni="a.example.org"), SINK, "tls"),
    ("wildcard several labels", dict(sni="a.b.example.org"), SINK, "tls"),
    ("wildcard does not match the bare domain", dict(sni="example.org"), ClusterKey(EXT, None, 443), "default"),
    ("unknown SNI: default", dict(sni="other.example.com"), ClusterKey(EXT, None, 443), "default"),
    ("no SNI: default", dict(sni=None), ClusterKey(EXT, None, 443), "default"),
    ("no SNI, tcp route matches", dict(sni=None, source=BATCH), SINK, "tcp"),
    ("SNI not matched, tcp route matches", dict(sni="zzz.example.net", source=BATCH), SINK, "tcp"),
    ("tls route first even when a tcp route matches too", dict(sni="api.example.com", source=BATCH),
     ClusterKey(EXT, None, 443), "tls"),
])
def test_tls_route_matching(case, kwargs, cluster, kind):
    kwargs.setdefault("ip", "10.97.0.1")
    d = decide(snapshot(TLS_VS), host=EXT, port=443, **kwargs)
    assert (d.cluster, d.kind) == (cluster, kind), case


def test_tls_routes_apply_only_to_tls_ports():
    snap = snapshot(TLS_VS)
    # 8443 is a TCP port of the same service: the SNI is not looked at, the tcp routes are
    d = decide(snap, host=EXT, port=8443, sni="api.example.com")
    assert d.cluster == ClusterKey(EXT, None, 8443) and d.kind == "default"
    assert not l4_table(snap, snap.services[EXT], 8443, "shop").needs_sni(WEB, "10.97.0.1")
    assert decide(snap, host=EXT, port=8443, source=BATCH).cluster == SINK


def test_needs_sni_only_when_a_tls_route_could_apply():
    snap = snapshot(TLS_VS.replace("[{port: 443, sniHosts: [api.example.com]}]",
                                   "[{port: 443, sniHosts: [api.example.com], sourceNamespace: shop}]")
                    .replace('[{sniHosts: ["*.example.org"]}]', '[{sniHosts: ["*.example.org"], '
                             'sourceNamespace: shop}]'))
    table = l4_table(snap, snap.services[EXT], 443, "jobs")
    # from "jobs" no tls route's non-SNI fields can match: no need to wait for a ClientHello
    assert not table.needs_sni(BATCH, "10.97.0.1")
    table = l4_table(snap, snap.services[EXT], 443, "shop")
    assert table.needs_sni(WEB, "10.97.0.1")
    assert not l4_table(snapshot(), snap.services[ECHO], 9000, "shop").needs_sni(WEB, None)


def test_gateway_only_matches_are_ignored_mesh_applies():
    snap = snapshot("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext, namespace: shop}
spec:
  hosts: [api.example.com]
  tls:
  - match: [{sniHosts: [api.example.com], gateways: [egress-gateway]}]
    route: [{destination: {host: sink}}]
  - match: [{sniHosts: [api.example.com], gateways: [egress-gateway, mesh]}]
    route: [{destination: {host: www.example.com}}]
""")
    d = decide(snap, host=EXT, port=443, sni="api.example.com")
    assert d.cluster == ClusterKey("www.example.com", None, 443) and d.route_index == 1


def test_virtual_service_bound_only_to_a_gateway_does_not_apply():
    snap = snapshot("""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: shop}
spec:
  hosts: [tcp-echo]
  gateways: [edge-gateway]
  tcp:
  - route: [{destination: {host: sink}}]
""")
    assert decide(snap).kind == "default"


@pytest.mark.parametrize("pattern, sni, expected", [
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "API.EXAMPLE.COM", True),
    ("api.example.com", "x.api.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.com", "example.com", True),
    ("*", "anything.at.all", True),
    ("*", "", False),
])
def test_sni_matches(pattern, sni, expected):
    assert sni_matches(pattern, sni) is expected


@pytest.mark.parametrize("name, protocol, expected", [
    ("tls", "TLS", True), ("https", "HTTPS", True), ("x", "https", True), ("tls-db", "TCP", False),
    ("tls-db", "", True), ("https-web", "", True), ("https", "", True), ("tcp", "", False),
    ("httpsx", "", False), ("http", "HTTP", False),
])
def test_is_tls_port(name, protocol, expected):
    assert is_tls_port(ServicePort(443, protocol, name)) is expected


# --- the weighted split ---------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=8))
def test_pick_weighted_gives_each_destination_exactly_its_share_of_the_unit_interval(weights):
    cum = []
    total = 0
    for w in weights:
        total += w
        cum.append(total)
    cum = tuple(cum)
    # one draw in the middle of each of `total` equal slices of [0, 1): destination i
    # must own exactly weights[i] of them, in order
    picks = [pick_weighted(cum, (k + 0.5) / total) for k in range(total)]
    assert picks == [i for i, w in enumerate(weights) for _ in range(w)]
    assert pick_weighted(cum, 0.0) == 0
    assert pick_weighted(cum, 1.0 - 1e-16) == len(weights) - 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=4), st.integers(0, 2**32))
def test_weighted_tcp_route_split_follows_the_weights(weights, seed):
    if not any(weights):
        weights[0] = 1
    dests = "\n".join(f"    - {{destination: {{host: tcp-echo, port: {{number: {9000 + i % 2}}}, "
                      f"subset: {'v1' if i < 2 else 'v2'}}}, weight: {w}}}"
                      for i, w in enumerate(weights))
    snap = snapshot(f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo, namespace: shop}}
spec:
  hosts: [tcp-echo]
  tcp:
  - route:
{dests}
""")
    svc = snap.services[ECHO]
    rand = random.Random(seed)
    n = 2000
    counts = Counter(plan_l4(snap, svc, 9000, WEB, None, None, rand).weight for _ in range(n))
    # the picked destination's weight is never 0, and each weight value is picked in
    # proportion to the sum of the weights that carry it (5 sigma bound: cannot flake in practice)
    total = sum(weights)
    assert 0 not in counts
    for w in set(weights) - {0}:
        p = sum(x for x in weights if x == w) / total
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(counts[w] - n * p) <= 5 * sigma + 1


EGRESS = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dropbox, namespace: shop}
spec:
  hosts: [api.dropboxapi.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.wild.example"]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  location: MESH_EXTERNAL
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain, namespace: shop}
spec:
  hosts: [plain.example]
  ports: [{number: 8080, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: googleapis, namespace: shop}
spec:
  hosts: [www.googleapis.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: googleapis, namespace: shop}
spec:
  hosts: [www.googleapis.com]
  tls:
  - match: [{port: 443, sniHosts: [www.googleapis.com], sourceNamespace: shop}]
    route: [{destination: {host: api.dropboxapi.com}}]
"""


def test_sni_only_ports_and_routing_by_sni_to_address_less_services():
    from policy.l4routing import plan_by_sni, sni_only_ports
    snap = snapshot(EGRESS)
    # 443: TLS ports of services without addresses; api.example.com (443 with an address) and
    # plain.example (a TCP port) do not count
    assert sni_only_ports(snap) == frozenset({443})

    def by_sni(sni, source=WEB, port=443):
        return plan_by_sni(snap, port, source, "93.184.216.34", sni, FixedRandom(0.0))

    d = by_sni("api.dropboxapi.com")
    assert (d.cluster, d.kind) == (ClusterKey("api.dropboxapi.com", None, 443), "default")
    assert by_sni("API.DropboxAPI.com").cluster.host == "api.dropboxapi.com"
    # resolution NONE without endpoints: Envoy's ORIGINAL_DST cluster, i.e. the address dialled
    assert by_sni("x.wild.example") is None
    # a service with tls routes: its routes decide, and none matching is a passthrough
    d = by_sni("www.googleapis.com")
    assert (d.cluster.host, d.kind, d.route_index) == ("api.dropboxapi.com", "tls", 0)
    assert by_sni("www.googleapis.com", source=BATCH) is None
    # no SNI, an unknown name, a service with addresses, another port: passthrough
    assert by_sni(None) is None
    assert by_sni("unknown.example") is None
    assert by_sni("api.example.com") is None
    assert by_sni("api.dropboxapi.com", port=8443) is None


def test_resolution_none_services_count_for_sni_only_ports_only_with_tls_routes():
    from policy.l4routing import sni_only_ports
    wild_only = EGRESS.split("---")[1].replace("number: 443", "number: 4443")
    # 443 is www.example.com's (STATIC, no addresses); 4443 only the wildcard NONE service's
    assert sni_only_ports(snapshot(wild_only)) == frozenset({443})
    assert sni_only_ports(snapshot(wild_only + "---\n" + TLS_VS)) == frozenset({443, 4443})
