"""Operating `nodeagent proxy`: metrics labels, access log, hot reload, workers,
clean shutdown, bad configuration."""
from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from tests.integration.proxy_harness import PYTHON, REPO, ProxyProcess, catalog_config, metric_value, service_config
from tests.integration.upstream import UpstreamServer

CATALOG = "catalog.shop.svc.cluster.local"


@pytest.fixture
def catalog_dir(tmp_path):
    servers = [UpstreamServer(n, host=h).start() for n, h in
               (("v1a", "127.0.0.61"), ("v1b", "127.0.0.62"), ("v2", "127.0.0.63"))]
    (tmp_path / "catalog.yaml").write_text(catalog_config(*servers))
    yield tmp_path, {s.name: s for s in servers}
    for s in servers:
        s.stop()


def test_metrics_have_istio_names_and_labels(catalog_dir):
    d, _ = catalog_dir
    with ProxyProcess(d) as proxy:
        for _ in range(3):
            assert proxy.request("/newcatalog", body=b"abc", method="POST")[0] == 200
        assert proxy.request("/", host="nowhere.shop")[0] == 404
        text = proxy.metrics()
    labels = dict(
        reporter="source", source_workload="frontend", source_workload_namespace="shop",
        source_app="frontend", source_version="v1",
        destination_workload="catalog-v2", destination_workload_namespace="shop",
        destination_app="catalog", destination_version="v2",
        destination_service=CATALOG, destination_service_name="catalog",
        destination_service_namespace="shop", request_protocol="http",
        response_code="200", response_flags="-",
    )
    assert metric_value(text, "istio_requests_total", **labels) == 3
    assert metric_value(text, "istio_request_duration_milliseconds_count", **labels) == 3
    assert metric_value(text, "istio_request_bytes_sum", **labels) == 9
    assert metric_value(text, "istio_response_bytes_count", **labels) == 3
    assert metric_value(text, "istio_request_duration_milliseconds_bucket", le="+Inf", **labels) == 3
    for name in ("source_principal", "destination_principal", "grpc_response_status", "connection_security_policy"):
        assert f'{name}="' in text
    assert metric_value(text, "istio_requests_total", response_code="404", response_flags="NR") == 1


def test_access_log_line_per_request(catalog_dir):
    d, _ = catalog_dir
    with ProxyProcess(d, access_log=True) as proxy:
        proxy.request("/newcatalog/a", headers={"user-agent": "t1"})
        proxy.request("/x", host="nowhere.shop")
        deadline = time.monotonic() + 3
        while len(proxy.stdout) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    records = [json.loads(line) for line in proxy.stdout]
    ok = next(r for r in records if r["path"] == "/newcatalog/a")
    assert ok["response_code"] == 200 and ok["response_flags"] == "-"
    assert ok["method"] == "GET" and ok["authority"] == CATALOG
    assert ok["upstream_cluster"] == f"outbound|80|v2|{CATALOG}"
    assert ok["upstream_host"].startswith("127.0.0.63:")
    assert ok["user_agent"] == "t1" and ok["duration"] >= 0
    nr = next(r for r in records if r["path"] == "/x")
    assert nr["response_code"] == 404 and nr["response_flags"] == "NR"


def test_no_access_log_by_default(catalog_dir):
    d, _ = catalog_dir
    with ProxyProcess(d) as proxy:
        proxy.request("/")
        time.sleep(0.2)
    assert proxy.stdout == []


def test_config_change_applies_without_restart(catalog_dir):
    d, servers = catalog_dir
    with ProxyProcess(d) as proxy:
        assert proxy.request("/newcatalog")[1]["x-instance"] == "v2"
        text = (d / "catalog.yaml").read_text().replace("prefix: /newcatalog", "prefix: /brandnew")
        (d / "catalog.yaml").write_text(text)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proxy.request("/brandnew")[1]["x-instance"] == "v2":
                break
            time.sleep(0.1)
        assert proxy.request("/brandnew")[1]["x-instance"] == "v2"
        assert proxy.request("/newcatalog")[1]["x-instance"] in ("v1a", "v1b")
        # A broken change is refused; the previous configuration keeps serving.
        (d / "broken.yaml").write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                                       "metadata: {name: b, namespace: shop}\nspec:\n  http: 7\n")
        # the proxy says it refused the file (naming it) ...
        deadline = time.monotonic() + 5
        while not any("broken.yaml" in line for line in proxy.stderr) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("broken.yaml" in line for line in proxy.stderr), "the refused file is named on stderr"
        # ... and the previous configuration keeps serving
        assert proxy.request("/brandnew")[1]["x-instance"] == "v2"
        assert proxy.request("/newcatalog")[1]["x-instance"] in ("v1a", "v1b")


def test_removed_service_releases_its_upstream_connections(catalog_dir):
    d, _ = catalog_dir
    gone = UpstreamServer("gone0", host="127.0.0.64").start()
    try:
        (d / "gone.yaml").write_text(service_config("gone", [gone]))
        with ProxyProcess(d) as proxy:
            assert proxy.request("/", host="gone.shop.svc.cluster.local")[0] == 200
            assert gone.open_connections == 1, "the upstream connection is pooled"
            (d / "gone.yaml").unlink()
            deadline = time.monotonic() + 5
            while proxy.request("/", host="gone.shop.svc.cluster.local")[0] != 404 and time.monotonic() < deadline:
                time.sleep(0.1)
            while gone.open_connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone.open_connections == 0
    finally:
        gone.stop()


def test_two_workers_both_serve(catalog_dir):
    d, _ = catalog_dir
    with ProxyProcess(d, workers=2, access_log=True) as proxy:
        for _ in range(40):
            assert proxy.request("/newcatalog")[0] == 200  # a new connection each time
        # each worker counts a request as it completes, and logs it: poll for all 40
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = proxy.metrics()
            if (len(proxy.stdout) >= 40 and
                    metric_value(text, "istio_requests_total", destination_service=CATALOG, response_code="200") >= 40):
                break
            time.sleep(0.05)
    workers = {json.loads(line)["worker"] for line in proxy.stdout}
    assert len(workers) == 2, f"requests were served by workers {workers}"
    assert metric_value(text, "istio_requests_total", destination_service=CATALOG, response_code="200") == 40
    assert proxy.proc.returncode == 0


def test_sigterm_shuts_down_cleanly(catalog_dir):
    d, _ = catalog_dir
    proxy = ProxyProcess(d).start()
    sock = proxy.raw()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {CATALOG}\r\n\r\n".encode())
    sock.recv(65536)
    assert proxy.stop() == 0
    assert "Traceback" not in "".join(proxy.stderr)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_bad_config_is_a_clear_error_without_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\n  namespace: shop\n"
        "spec:\n  host: r.shop.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n      simple: FASTEST\n")
    res = subprocess.run([PYTHON, "-m", "nodeagent", "proxy", "--config-dir", str(tmp_path),
                          "--listen", "127.0.0.1:0", "--workload", "shop/frontend", "--workers", "1"],
                         capture_output=True, text=True, cwd=str(REPO), timeout=20)
    assert res.returncode == 1
    assert "bad.yaml" in res.stderr and "FASTEST" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([PYTHON, "-m", "nodeagent", "proxy", "--config-dir", str(tmp_path / "missing"),
                          "--workload", "shop/frontend"], capture_output=True, text=True, cwd=str(REPO), timeout=20)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
