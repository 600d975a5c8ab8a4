"""MeshTelemetry adds connection_security_policy to every series and otherwise counts exactly
as the engine's Telemetry: the exported series equal counting everything per request."""
from __future__ import annotations

import random

from nodeagent.proxy.context import ListenerContext, WorkloadIdentity
from nodeagent.proxy.inbound import InboundContext
from nodeagent.proxy.tunnel import MeshTelemetry
from tests.unit.test_telemetry import reference

PLAIN = ("a", "ns", "unknown", "a", "v1", "a.ns.svc.cluster.local", "a", "ns", "http")  # no principal
TUNNEL = ("b", "ns", "cluster.local/ns/ns/sa/b", "b", "v1", "b.ns.svc.cluster.local", "b", "ns", "http")
SHORT = ("x", "y")  # a destination without a principal slot


def test_series_carry_the_policy_and_count_like_plain_counting():
    rand = random.Random(5)
    src_wl = WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}, "cluster.local/ns/shop/sa/frontend")
    outbound = ListenerContext("outbound", src_wl)
    mtls_in = InboundContext("inbound", src_wl, "destination", security_policy="mutual_tls")
    plain_in = InboundContext("inbound", None, "destination", security_policy="none")
    odd_in = InboundContext("inbound", None, "destination", security_policy="something-else")
    telemetry = MeshTelemetry()
    records = {}
    sizes = [0, 1, 9, 10, 999, 1024, 5000, 10 ** 7]
    for i in range(800):
        ctx = (outbound, mtls_in, plain_in, odd_in)[i % 4]
        dest = (PLAIN, TUNNEL, SHORT)[i % 3]
        status = (200, 200, 403, 503)[i % 4 if i % 5 else 0]
        flags = "-" if status == 200 else "RBAC" if status == 403 else "UF"
        rec = (dest, status, flags, rand.choice([0.2, 0.5, 3.0, 70.0, 5000.0]), rand.choice(sizes), rand.choice(sizes))
        records.setdefault(id(ctx), (ctx, []))[1].append(rec)
        telemetry.record_http(ctx, *rec)
    exported = telemetry.export()["http"]
    total = 0
    for ctx, recs in records.values():
        src = (ctx.reporter,) + ((src_wl.name, src_wl.namespace, src_wl.principal, "frontend", "unknown")
                                 if ctx.source is not None else ("unknown",) * 5)
        for (dest, status, flags), v in reference(recs).items():
            if ctx is outbound:
                policy = "mutual_tls" if dest is TUNNEL else "unknown"
            else:
                policy = {"mutual_tls": "mutual_tls", "none": "none"}.get(ctx.security_policy, "unknown")
            got = exported[src + dest + (str(status), "", flags, policy)]
            assert got[0] == v[0] and got[2:4] == v[2:4] and got[4:] == v[4:], (ctx.name, dest, status)
            assert abs(got[1] - v[1]) < 1e-6
            total += 1
    assert len(exported) == total


def test_tcp_entries_carry_the_policy():
    telemetry = MeshTelemetry()
    ctx = ListenerContext("outbound", None)
    telemetry.tcp_entry(ctx, TUNNEL[:-1] + ("tcp",))[0] += 2
    telemetry.tcp_entry(ctx, PLAIN[:-1] + ("tcp",), "UF")[0] += 1
    tcp = telemetry.export()["tcp"]
    assert tcp[("source",) + ("unknown",) * 5 + TUNNEL[:-1] + ("tcp", "-", "mutual_tls")][0] == 2
    assert tcp[("source",) + ("unknown",) * 5 + PLAIN[:-1] + ("tcp", "UF", "unknown")][0] == 1
