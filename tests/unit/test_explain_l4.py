"""`nodeagent explain --service HOST:PORT`: the VirtualService tcp/tls route of a TCP connection."""
from __future__ import annotations

import argparse
import json

import pytest

from nodeagent.cli import UserError
from nodeagent.commands import explain as explain_cmd

CONFIG = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.svc.cluster.local]
  addresses: [10.96.0.10]
  ports: [{number: 5432, name: tcp, protocol: TCP}, {number: 5433, name: tls, protocol: TLS}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-1, namespace: shop}
spec: {address: 10.0.0.5, labels: {app: db, version: v1}, serviceAccount: db}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: shop}
spec: {address: 10.0.0.7, labels: {app: web}, serviceAccount: web}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db, replica.db.example]
  tls:
  - match: [{sniHosts: [replica.db.example]}]
    route: [{destination: {host: db, subset: v2, port: {number: 5433}}}]
  tcp:
  - match: [{sourceLabels: {app: web}, port: 5432}]
    route:
    - {destination: {host: db, subset: v1}, weight: 80}
    - {destination: {host: db, subset: v2}, weight: 20}
"""


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "db.yaml").write_text(CONFIG)
    return tmp_path


def run(config_dir, *argv: str):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    explain_cmd.register(sub)
    return parser.parse_args(["explain", "--config-dir", str(config_dir), "--from", "shop/web",
                              "--to", "shop/db-1", "--port", "5432", *argv])


def test_tcp_weighted_route_json(config_dir, capsys):
    assert explain_cmd.cmd_explain(run(config_dir, "--service", "db.shop:5432", "-o", "json")) == 0
    rt = json.loads(capsys.readouterr().out)["route"]
    assert (rt["virtual_service"], rt["route"], rt["kind"]) == ("shop/db", "tcp[0]", "tcp")
    assert rt["destinations"] == [
        {"cluster": "outbound|5432|v1|db.shop.svc.cluster.local", "weight": 80, "known": True},
        {"cluster": "outbound|5432|v2|db.shop.svc.cluster.local", "weight": 20, "known": True}]


def test_tls_route_by_sni_and_default_text(config_dir, capsys):
    explain_cmd.cmd_explain(run(config_dir, "--service", "10.96.0.10:5433", "--sni", "replica.db.example"))
    out = capsys.readouterr().out
    assert "Route: VirtualService shop/db tls[0] (db.shop.svc.cluster.local:5433)" in out
    assert "outbound|5433|v2|db.shop.svc.cluster.local  weight 100" in out
    assert "reads the ClientHello's SNI first: replica.db.example" in out
    explain_cmd.cmd_explain(run(config_dir, "--service", "10.96.0.10:5433"))
    out = capsys.readouterr().out
    assert "Route: no tcp/tls route applies -> the service itself, db.shop.svc.cluster.local:5433" in out
    assert "none given (--sni)" in out


def test_not_a_service_and_bad_argument(config_dir, capsys):
    explain_cmd.cmd_explain(run(config_dir, "--service", "192.0.2.1:443"))
    assert "Route: 192.0.2.1:443 is no service port of the configuration" in capsys.readouterr().out
    with pytest.raises(UserError, match="--service 'db.shop': expected HOST:PORT"):
        explain_cmd.cmd_explain(run(config_dir, "--service", "db.shop"))
