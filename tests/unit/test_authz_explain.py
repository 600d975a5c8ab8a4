"""`nodeagent explain`: the verdict, deciding policy, mTLS mode and route for a described request."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from nodeagent.cli import UserError
from nodeagent.commands import explain as explain_cmd

DATA = Path(__file__).resolve().parent.parent / "data" / "authz"

WORKLOADS = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: httpbin-v1
  namespace: foo
spec:
  address: 10.0.1.1
  serviceAccount: httpbin
  labels:
    app: httpbin
    version: v1
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: sleep
  namespace: dev
spec:
  address: 10.0.0.7
  serviceAccount: sleep
  labels:
    app: sleep
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
  namespace: foo
spec:
  hosts: ["httpbin.foo.svc.cluster.local"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 8000
    name: http
    protocol: HTTP
    targetPort: 80
  workloadSelector:
    labels:
      app: httpbin
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
  namespace: foo
spec:
  hosts: ["httpbin.foo.svc.cluster.local"]
  http:
  - name: to-v1
    route:
    - destination:
        host: httpbin.foo.svc.cluster.local
        port:
          number: 8000
    timeout: 3s
"""


@pytest.fixture
def config_dir(tmp_path):
    for name in ("deny-plaintext.yaml", "peer-authn-finance.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "workloads.yaml").write_text(WORKLOADS)
    (tmp_path / "allow.yaml").write_text("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-dev-get
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  rules:
  - from:
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
""")
    return tmp_path


def run(argv: list[str]):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    explain_cmd.register(sub)
    return parser.parse_args(["explain", *argv])


def test_denied_request_with_route(config_dir, capsys):
    args = run(["--config-dir", str(config_dir), "--from", "dev/sleep", "--to", "foo/httpbin-v1",
                "--port", "80", "--method", "GET", "--path", "/admin/x", "--host", "httpbin.foo:8000",
                "-o", "json"])
    assert explain_cmd.cmd_explain(args) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["verdict"]["allowed"] is False   # httpbin-deny: /admin* from outside foo
    assert e["verdict"]["policy"] == "foo/httpbin-deny"
    assert e["verdict"]["response"] == {"status": 403, "body": "RBAC: access denied", "response_flags": "RBAC"}
    assert e["peer_authentication"]["mode"] == "PERMISSIVE"
    assert e["source"] == {"principal": "cluster.local/ns/dev/sa/sleep", "mtls": True, "ip": "10.0.0.7"}
    assert e["route"]["virtual_service"] == "foo/httpbin"
    assert e["route"]["route"] == "to-v1"
    assert e["route"]["timeout"] == 3.0
    # listed in evaluation order: CUSTOM, DENY, ALLOW, AUDIT
    assert [(p["action"], p["name"]) for p in e["policies"]] == [
        ("DENY", "foo/require-mtls"), ("DENY", "foo/httpbin-deny"), ("ALLOW", "foo/allow-dev-get")]


def test_text_output_explains_allow(config_dir, capsys):
    args = run(["--config-dir", str(config_dir), "--from", "dev/sleep", "--to", "10.0.1.1:80",
                "--method", "GET", "--path", "/get", "--host", "httpbin.foo:8000"])
    explain_cmd.cmd_explain(args)
    out = capsys.readouterr().out
    assert "Verdict: ALLOWED: allowed by ALLOW policy foo/allow-dev-get rules[0]" in out
    assert "from cluster.local/ns/dev/sa/sleep (10.0.0.7) over mTLS" in out
    assert "Route: VirtualService foo/httpbin, route to-v1 -> httpbin.foo.svc.cluster.local:8000" in out
    assert "ALLOW  foo/allow-dev-get" in out
    assert "rewritten" not in out and "(TCP)" not in out
    assert "decided per request" in out   # foo's policies read methods and paths


def test_route_uses_the_normalized_path(config_dir, capsys):
    args = run(["--config-dir", str(config_dir), "--from", "dev/sleep", "--to", "foo/httpbin-v1",
                "--port", "80", "--path", "/public/../admin?x=1", "--host", "httpbin.foo:8000", "-o", "json"])
    explain_cmd.cmd_explain(args)
    e = json.loads(capsys.readouterr().out)
    assert e["request"]["path"] == "/admin"
    assert e["verdict"]["policy"] == "foo/httpbin-deny"
    assert (e["route"]["path"], e["route"]["rewritten"]) == ("/admin?x=1", False)


def test_plaintext_tcp_is_denied_by_require_mtls(config_dir, capsys):
    args = run(["--config-dir", str(config_dir), "--from", "plaintext", "--to", "foo/httpbin-v1",
                "--port", "80", "--source-ip", "192.168.0.9"])
    explain_cmd.cmd_explain(args)
    out = capsys.readouterr().out
    assert "TCP connection" in out
    assert "Verdict: DENIED: denied by DENY policy foo/require-mtls rules[0]" in out
    assert "decided per connection" in out


def test_strict_refuses_plaintext_before_authorization(config_dir, capsys):
    args = run(["--config-dir", str(config_dir), "--from", "plaintext", "--to", "foo/finance-pod",
                "--labels", "app=finance", "--port", "9090", "-o", "json"])
    explain_cmd.cmd_explain(args)
    e = json.loads(capsys.readouterr().out)
    assert e["peer_authentication"]["accepted"] is False
    assert e["verdict"]["allowed"] is False
    assert e["verdict"]["reason"] == ("plaintext refused before authorization: STRICT: set by workload-level "
                                      "PeerAuthentication foo/finance")
    # port 8080 of finance is DISABLE: plaintext admitted, then require-mtls denies it
    args = run(["--config-dir", str(config_dir), "--from", "plaintext", "--to", "foo/finance-pod",
                "--labels", "app=finance", "--port", "8080", "-o", "json"])
    explain_cmd.cmd_explain(args)
    e = json.loads(capsys.readouterr().out)
    assert e["peer_authentication"] == {"mode": "DISABLE", "policy": "foo/finance", "level": "port",
                                        "reason": "DISABLE: set by port-level PeerAuthentication foo/finance",
                                        "accepted": True}
    assert e["verdict"]["policy"] == "foo/require-mtls"


@pytest.mark.parametrize("argv,message", [
    (["--from", "dev", "--to", "foo/httpbin-v1"], "--from 'dev': expected NAMESPACE/SERVICEACCOUNT"),
    (["--from", "dev/sleep", "--to", "foo/nope"], "no WorkloadEntry foo/nope in the configuration (known: "
                                                  "dev/sleep, foo/httpbin-v1)"),
    (["--from", "dev/sleep", "--to", "10.9.9.9"], "no WorkloadEntry has address 10.9.9.9"),
    (["--from", "dev/sleep", "--to", "foo/httpbin-v1", "--labels", "a=b"], "is a WorkloadEntry"),
    (["--from", "dev/sleep", "--to", "foo/x", "--labels", "oops"], "--labels: expected KEY=VALUE"),
    (["--from", "dev/sleep", "--to", "foo/httpbin-v1", "--header", "novalue"], "--header: expected NAME=VALUE"),
    (["--from", "dev/sleep", "--to", "foo/httpbin-v1", "--path", "/a%00"], "contains %00; the proxy answers 400"),
])
def test_user_errors(config_dir, argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        explain_cmd.cmd_explain(run(["--config-dir", str(config_dir), *argv]))


def test_broken_configuration_is_reported_not_explained(tmp_path):
    (tmp_path / "bad.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                                       "metadata: {name: x, namespace: foo}\nspec: {action: MAYBE}\n")
    with pytest.raises(UserError, match="does not load; fix these first:\n.*bad.yaml:4"):
        explain_cmd.cmd_explain(run(["--config-dir", str(tmp_path), "--from", "a/b", "--to", "foo/x",
                                     "--labels", ""]))
