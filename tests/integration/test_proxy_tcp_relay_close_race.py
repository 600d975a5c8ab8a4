"""Regression test (found by writing real-proxy tests; fixed in nodeagent/proxy/tcp.py).

Before the fix, an opaque TCP relay whose upstream sends and closes (server-first protocol, e.g. an SMTP
banner then close), and whose client closes as soon as it sees that EOF, is never closed
when both EOFs arrive before TcpRelay._connect has resumed from ``connector.connect``:
no access-log line, ``istio_tcp_connections_closed_total`` not counted, both sockets'
file descriptors held, ``pool.tcp_open`` not released (until the 1 h TCP idle timeout).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from tests.integration.proxy_harness import ProxyProcess, metric_value, read_until_closed

GREETING = b"220 banner\r\n"


def test_every_server_first_relay_is_closed_and_logged(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.9.50", 0))
    srv.listen(512)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(GREETING)  # at once, then close

    threading.Thread(target=serve, daemon=True).start()
    host, port = srv.getsockname()
    (tmp_path / "c.yaml").write_text(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: smtp, namespace: shop}}
spec:
  hosts: [smtp.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 25, name: tcp, protocol: TCP}}]
  endpoints: [{{address: {host}, ports: {{tcp: {port}}}}}]
""")
    proxy = ProxyProcess(tmp_path, access_log=True,
                         extra=("--forward", "127.0.0.1:0=smtp.shop.svc.cluster.local:25")).start()
    mine, lock = [], threading.Lock()

    def client(n):
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", proxy.ports[1]), timeout=5)
            with lock:
                mine.append("%s:%d" % s.getsockname())
            try:
                assert read_until_closed(s, 5) == GREETING
            finally:
                s.close()

    try:
        fds_before = len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))
        threads = [threading.Thread(target=client, args=(100,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            logged = {json.loads(l)["downstream_remote_address"] for l in list(proxy.stdout)}
            if logged >= set(mine):
                break
            time.sleep(0.1)
        text = proxy.metrics()
        opened = metric_value(text, "istio_tcp_connections_opened_total")
        closed = metric_value(text, "istio_tcp_connections_closed_total")
        fds_after = len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))
        missing = set(mine) - logged
        assert not missing, (f"{len(missing)} of {len(mine)} relays never closed: no access-log line; "
                             f"opened {opened}, closed {closed}; proxy fds {fds_before} -> {fds_after}")
        assert opened == closed == len(mine)
        assert fds_after <= fds_before + 2
    finally:
        proxy.stop()
        stop.set()
        srv.close()
