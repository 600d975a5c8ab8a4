"""Telemetry's per-request accounting leaves derivable numbers to export(): the
request count and the size histograms' first bucket. The exported series must be
exactly what counting everything per request gives."""
from __future__ import annotations

import random
from bisect import bisect_left

from nodeagent.proxy.context import ListenerContext, WorkloadIdentity
from nodeagent.telemetry import DURATION_BUCKETS_MS, SIZE_BUCKETS, Telemetry, merge_exports

DEST_A = ("a", "ns", "unknown", "a", "v1", "a.ns.svc.cluster.local", "a", "ns", "http")
DEST_B = ("b", "ns", "unknown", "b", "v1", "b.ns.svc.cluster.local", "b", "ns", "http")


def reference(records):
    """Every number counted per request, the plain way."""
    out = {}
    for dest, status, flags, dur, req, resp in records:
        v = out.setdefault((dest, status, flags), [0, 0.0, 0, 0, [0] * 20, [0] * 9, [0] * 9])
        v[0] += 1
        v[1] += dur
        v[2] += req
        v[3] += resp
        v[4][bisect_left(DURATION_BUCKETS_MS, dur)] += 1
        v[5][bisect_left(SIZE_BUCKETS, req)] += 1
        v[6][bisect_left(SIZE_BUCKETS, resp)] += 1
    return out


def test_export_matches_counting_everything():
    rand = random.Random(3)
    ctx = ListenerContext("explicit", WorkloadIdentity("shop", "frontend", "frontend", {"app": "frontend"}))
    telemetry = Telemetry()
    sizes = [0, 0, 0, 1, 2, 9, 10, 11, 100, 101, 999, 1000, 1001, 1023, 1024, 5000, 10 ** 7, 10 ** 8]
    records = []
    for i in range(600):
        dest = DEST_A if i % 3 else DEST_B
        status = (200, 200, 503, 404)[i % 4]
        flags = "-" if status != 503 else "UF"
        dur = rand.choice([0.1, 0.5, 0.7, 1.0, 3.0, 30.0, 700.0, 4_000_000.0])
        rec = (dest, status, flags, dur, rand.choice(sizes), rand.choice(sizes))
        records.append(rec)
        telemetry.record_http(ctx, *rec)
    exported = telemetry.export()["http"]
    want = reference(records)
    assert len(exported) == len(want)
    src = ("source", "frontend", "shop", "unknown", "frontend", "unknown")
    for (dest, status, flags), v in want.items():
        got = exported[src + dest + (str(status), "", flags, "unknown")]
        assert got[0] == v[0] and got[2:4] == v[2:4] and got[4:] == v[4:]
        assert abs(got[1] - v[1]) < 1e-6
    # merging two workers' exports adds them up
    merged = merge_exports([telemetry.export(), telemetry.export()])["http"]
    key = src + DEST_A + ("200", "", "-", "unknown")
    assert merged[key][0] == 2 * exported[key][0]
    assert merged[key][5] == [2 * n for n in exported[key][5]]
