"""redirect.bench's data-path measurement: reading wrk's output and the summary (pure parts)."""
from __future__ import annotations

import pytest

from redirect import bench
from redirect.plan import CaptureError

# Real `wrk -t1 -c2 -d1s --latency` output (an HTTP server answering 404).
WRK_404 = """Running 1s test @ http://127.0.0.1:18999/nonexistent
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.90ms    1.09ms   8.43ms   90.04%
    Req/Sec     2.76k   315.37     3.13k    72.73%
  Latency Distribution
     50%  545.00us
     75%  803.00us
     90%    1.96ms
     99%    6.18ms
  3019 requests in 1.10s, 1.50MB read
  Non-2xx or 3xx responses: 3019
Requests/sec:   2747.47
Transfer/sec:      1.36MB
"""


def test_parse_wrk_reads_rate_latency_and_errors():
    r = bench.parse_wrk(WRK_404)
    assert r == {"rps": 2747.47, "requests": 3019, "p50": pytest.approx(0.545), "errors": 3019}


def test_parse_wrk_counts_socket_errors_and_converts_units():
    out = (WRK_404.replace("  Non-2xx or 3xx responses: 3019\n", "  Socket errors: connect 2, read 3, write 0, timeout 1\n")
           .replace("50%  545.00us", "50%    1.50s"))
    r = bench.parse_wrk(out)
    assert r["errors"] == 6
    assert r["p50"] == pytest.approx(1500.0)


def test_parse_wrk_without_results_names_the_problem():
    with pytest.raises(CaptureError, match="cannot read wrk's output"):
        bench.parse_wrk("unable to connect to 10.250.200.1:80 Connection refused\n")


def test_datapath_summary_medians_and_costs():
    def run(rps, cpu, errors=0):
        return {"rps": rps, "p50": 0.2, "cpu_us": cpu, "requests": int(rps), "errors": errors}

    modes = [mode for mode, _ in bench.DATAPATH_MODES]
    results = {modes[0]: [run(80000, 12.0), run(70000, 10.0), run(90000, 11.0)],
               modes[1]: [run(70000, 12.0)] * 3,
               modes[2]: [run(60000, 14.0), run(60000, 14.0), run(1000, 99.0, errors=2)]}
    text = bench.datapath_summary(results)
    rows = {line[:24].strip(): line.split() for line in text.splitlines()[1:4]}
    assert rows[modes[0]][-4:] == ["80000", "0.200", "11.0", "0"]
    assert rows[modes[2]][-4:] == ["60000", "0.200", "14.0", "2"]
    assert ("conntrack + nat hooks +1.0 us, REDIRECT's NAT +2.0 us more, capture in all +3.0 us (+27% CPU); "
            "req/s 0.75x") in text
