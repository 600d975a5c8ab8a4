"""Helpers for the proxy integration tests: config files and a real `nodeagent proxy` process."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def catalog_config(v1a, v1b, v2, *, consecutive_errors: int = 5, interval: str = "1s",
                   base_ejection: str = "2s", extra: str = "") -> str:
    """The catalog example: ServiceEntry + WorkloadEntries v1a/v1b/v2 + VS (/newcatalog -> v2) + DR."""
    def we(name, server, version):
        host, port = server.address
        return f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: shop
spec:
  address: {host}
  ports:
    http: {port}
  labels:
    app: catalog
    version: {version}
"""
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: catalog
  namespace: shop
spec:
  hosts:
  - catalog.shop.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  workloadSelector:
    labels:
      app: catalog
{we("catalog-v1a", v1a, "v1")}{we("catalog-v1b", v1b, "v1")}{we("catalog-v2", v2, "v2")}---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: frontend
  namespace: shop
spec:
  address: 127.0.0.1
  serviceAccount: frontend
  labels:
    app: frontend
    version: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: shop
spec:
  hosts:
  - catalog.shop.svc.cluster.local
  http:
  - match:
    - uri:
        prefix: /newcatalog
    route:
    - destination:
        host: catalog.shop.svc.cluster.local
        subset: v2
  - route:
    - destination:
        host: catalog.shop.svc.cluster.local
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: catalog
  namespace: shop
spec:
  host: catalog.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_CONN
    outlierDetection:
      consecutiveErrors: {consecutive_errors}
      interval: {interval}
      baseEjectionTime: {base_ejection}
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
{extra}"""


def service_config(name: str, servers, *, protocol: str = "HTTP", port_name: str = "http",
                   number: int = 80, namespace: str = "shop", labels: dict | None = None) -> str:
    """A ServiceEntry ``name.namespace.svc.cluster.local`` with one WorkloadEntry per server."""
    out = [f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {namespace}
spec:
  hosts:
  - {name}.{namespace}.svc.cluster.local
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: {number}
    name: {port_name}
    protocol: {protocol}
  workloadSelector:
    labels:
      app: {name}
"""]
    for i, server in enumerate(servers):
        host, port = server.address
        extra = "".join(f"\n    {k}: {v}" for k, v in (labels or {}).items())
        out.append(f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}-{i}
  namespace: {namespace}
spec:
  address: {host}
  ports:
    {port_name}: {port}
  labels:
    app: {name}
    instance: i{i}{extra}
""")
    return "".join(out)


class ProxyProcess:
    """`nodeagent proxy` as a subprocess on 127.0.0.1:0; stop() sends SIGTERM."""

    def __init__(self, config_dir: Path, workload: str = "shop/frontend", workers: int = 1,
                 metrics: bool = True, access_log: bool = False, extra: tuple = ()) -> None:
        self.cmd = [PYTHON, "-m", "nodeagent", "proxy", "--config-dir", str(config_dir),
                    "--listen", "127.0.0.1:0", "--workload", workload, "--workers", str(workers)]
        if metrics:
            self.cmd += ["--metrics", "127.0.0.1:0"]
        if access_log:
            self.cmd.append("--access-log")
        self.cmd += list(extra)
        self.proc = None
        self.port = 0
        self.ports: list[int] = []
        self.metrics_port = 0
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def start(self, timeout: float = 15.0) -> "ProxyProcess":
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=str(REPO), env=env)
        ready = threading.Event()

        def pump(stream, sink, watch):
            for line in stream:
                sink.append(line)
                if watch and "listening on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, args=(self.proc.stdout, self.stdout, False), daemon=True).start()
        threading.Thread(target=pump, args=(self.proc.stderr, self.stderr, True), daemon=True).start()
        ready.wait(timeout)
        line = next((l for l in self.stderr if "listening on" in l), None)
        if line is None:
            self.stop()
            raise RuntimeError("proxy did not start:\n" + "".join(self.stderr))
        self.ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+) \(", line)]
        self.port = self.ports[0]
        m = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", line)
        self.metrics_port = int(m.group(1)) if m else 0
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def access_log(self) -> list[dict]:
        """The JSON access-log records written to stdout so far (other lines skipped)."""
        out = []
        for line in list(self.stdout):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_access_log(self, predicate, want: int = 1, timeout: float = 3.0) -> list[dict]:
        """The records satisfying ``predicate``, once at least ``want`` are there (polled;
        what there is at ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [rec for rec in self.access_log() if predicate(rec)]
            if len(found) >= want or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # clients
    def request(self, path: str = "/", host: str = "catalog.shop.svc.cluster.local", method: str = "GET",
                headers: dict | None = None, body: bytes | None = None, timeout: float = 10.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = {"Host": host}
            hdrs.update(headers or {})
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def raw(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock


def read_until_closed(sock: socket.socket, limit: float = 5.0) -> bytes:
    sock.settimeout(limit)
    out = bytearray()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            part = sock.recv(65536)
        except socket.timeout:
            break
        if not part:
            break
        out += part
    return bytes(out)


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in body for k, v in labels.items()):
            total += float(value)
    return total
